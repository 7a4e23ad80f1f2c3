"""Old flat module paths (``ppvit.keys``, ``ppvit.training``...) kept importable for one release.

Through the 0.3 releases ``import ppvit.keys`` gives a module that forwards every name to its new home
(``ppvit.crypto.keys``) with a DeprecationWarning; new code imports the new paths.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings

MOVED: dict[str, str | tuple[str, ...]] = {
    "keys": "crypto.keys",
    "ciphers": "crypto.ciphers",
    "backbones": ("models.backbones", "models.weights"),
    "methods": ("models.methods", "models.configs"),
    "adapters": "models.adapters",
    "model_transform": "models.transform",
    "dataset_io": (
        "data.encrypt",
        "data.manifest",
        "data.sources.base",
        "data.sources.encrypted_wds",
        "data.workers",
        "data.legacy",
    ),
    "sources": ("data.sources.base", "data.sources.hf", "data.sources.wds", "data.legacy"),
    "streaming": "data.streaming",
    "config": "train.config",
    "runtime": "train.runtime",
    "runs": "train.runs",
    "training": ("train.loop", "train.session", "train.build"),
    "inference": ("train.inference", "data.images"),
    "audit": (
        "attacks.audit",
        "attacks.known_plaintext",
        "attacks.weight_matching",
        "attacks.ciphertext_stats",
        "attacks.metrics",
        "attacks.report",
    ),
    "key_recovery": (
        "attacks.ciphertext_only",
        "attacks.orientation",
        "attacks.pixel_layout",
        "attacks.jigsaw",
        "attacks.block_alignment",
        "attacks.ciphertext_only_audit",
        "attacks.metrics",
        "attacks.report",
    ),
    "presets": ("experiments.reproduce", "experiments.cells", "experiments.budget", "experiments.presets"),
    "results": "experiments.results",
    "preview": "experiments.preview",
    "routing": "models.routing",
    "tenants": "serve.tenants",
    "server": (
        "serve.app",
        "serve.server",
        "serve.auth",
        "serve.cache",
        "serve.batcher",
        "serve.codec",
        "serve.metrics",
    ),
    "client": ("serve.client", "serve.bodies"),
    "commands_serve": ("cli.serve", "cli.client"),
}
"""Old module name -> its path(s) under ``ppvit`` now, searched in order. (``ppvit.data`` and ``ppvit.cli`` are packages
whose ``__init__`` forwards the old modules' names.)"""

RENAMED: dict[str, str] = {
    "key_recovery.write_ciphertext_only_report": "attacks.report.write_report",
    "key_recovery.format_ciphertext_only": "attacks.report.format_report",
    "data.cifar10_path": "data.datasets.resolve_data",
    "data.load_image_folder": "data.datasets.load_source_split",
    "streaming.count_keys": "data.sources.wds.count_samples",
}
"""Old ``module.name`` -> ``module.name`` now under ``ppvit``, for names that changed (the same call works)."""


def forward(module: types.ModuleType, targets: str | tuple[str, ...], old: str) -> None:
    """Make ``module``'s unknown attributes resolve in ``targets`` (the first that has the name), with a warning."""

    def __getattr__(name: str) -> object:
        if name.startswith("__") or (hasattr(module, "__path__") and _is_submodule(f"{module.__name__}.{name}")):
            raise AttributeError(name)  # a submodule is imported, not forwarded
        renamed = RENAMED.get(f"{old.removeprefix('ppvit.')}.{name}")
        if renamed:
            where, _, new_name = f"ppvit.{renamed}".rpartition(".")
            warnings.warn(f"{old}.{name} is now {where}.{new_name}; use that", DeprecationWarning, stacklevel=2)
            return getattr(importlib.import_module(where), new_name)
        for target in (targets,) if isinstance(targets, str) else targets:
            new = importlib.import_module(target)
            if hasattr(new, name):
                warnings.warn(f"{old}.{name} moved to {target}; import it from there", DeprecationWarning, stacklevel=2)
                return getattr(new, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r}")

    module.__getattr__ = __getattr__  # type: ignore[method-assign]


def _is_submodule(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        prefix, _, rest = name.partition(".")
        if prefix == "ppvit" and rest in MOVED:
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        moved = MOVED[module.__name__.partition(".")[2]]
        forward(module, tuple(f"ppvit.{m}" for m in ((moved,) if isinstance(moved, str) else moved)), module.__name__)


def install() -> None:
    if not any(isinstance(f, _OldPaths) for f in sys.meta_path):
        sys.meta_path.append(_OldPaths())
