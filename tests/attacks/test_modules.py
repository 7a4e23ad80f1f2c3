"""The attacks package's shape: the numpy attacks import nothing heavy, and the old module paths still resolve."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from ppvit import _compat

HEAVY = {"torch", "timm", "peft", "accelerate", "scipy", "matplotlib", "skimage", "ppvit.train", "ppvit.models"}


@pytest.mark.parametrize(
    "module",
    ["ppvit.attacks.metrics", "ppvit.attacks.ciphertext_only", "ppvit.attacks.ciphertext_only_audit"],
)
def test_numpy_attacks_import_no_heavy_dependency(module: str) -> None:
    """Checked in a fresh interpreter: importing them (the CLI reads CIPHERTEXT_ONLY_SCHEMES) loads none of HEAVY."""
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    loaded = set(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    )
    assert module in loaded  # the check itself worked
    assert not {m for m in loaded if m in HEAVY or m.split(".")[0] in HEAVY}


OLD_NAMES = {
    "audit": [
        "AuditConfig", "MapScore", "audit_scheme", "block_mean_image", "ciphertext_stats", "format_report",
        "jigsaw_neighbours", "known_plaintext_attack", "leakage_during_training", "match_blocks", "match_values",
        "plan_accuracy", "plan_from_maps", "psnr", "run_audit", "source_blocks", "ssim", "to_blocks", "upscale",
        "weight_leakage_adapter", "weight_leakage_transformed", "weight_matching_attack", "write_report",
    ],
    "key_recovery": [
        "CIPHERTEXT_ONLY_SCHEMES", "CiphertextOnlyConfig", "DIHEDRAL_NAMES", "RecoveryScore", "align_blocks",
        "balanced_kmeans", "block_group", "block_symmetry_index", "channel_candidates", "ciphertext_only_audit",
        "colour_order", "dihedral_index", "format_ciphertext_only", "graduated_layout", "image_symmetry_index",
        "layout_pixels", "match_block_maps", "natural_score", "negated_blocks", "orient_blocks", "partial_correlation",
        "pixel_coherence", "pixel_similarity", "pixel_triplets", "recover_pixel_map", "recover_plan", "refine_layout",
        "score_recovery", "seam_cost", "solve_jigsaw", "spectral_layout", "symmetries", "synchronise_channels",
        "then", "triplets_by_partial_correlation", "unsupported", "write_ciphertext_only_report",
        "plan_accuracy", "plan_from_maps", "psnr", "ssim", "to_blocks", "upscale",
    ],
}  # fmt: skip
"""Every public name of ``ppvit.audit`` and ``ppvit.key_recovery`` before the attacks were split (0.3.0)."""


@pytest.mark.parametrize(("old", "name"), [(old, n) for old, names in OLD_NAMES.items() for n in names])
def test_old_paths_resolve_every_public_name(old: str, name: str) -> None:
    module = importlib.import_module(f"ppvit.{old}")
    with pytest.warns(DeprecationWarning, match=f"ppvit.{old}.{name} "):
        value = getattr(module, name)
    renamed = _compat.RENAMED.get(f"{old}.{name}", "")
    where, _, new_name = f"ppvit.{renamed}".rpartition(".")
    if renamed:  # the same object as at its new home
        assert value is getattr(importlib.import_module(where), new_name)
    assert getattr(value, "__module__", "ppvit.attacks").startswith("ppvit.attacks")
