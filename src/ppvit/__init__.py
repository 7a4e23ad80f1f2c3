"""ppvit: privacy-preserving fine-tuning of Vision Transformers on block-wise encrypted images.

The library API a notebook user calls; the ``ppvit`` command is a thin layer over it.
Names load on first use (PEP 562), so ``import ppvit`` and ``ppvit --help`` cost no torch import.
The subpackages, lowest first (a module imports only from its own layer or lower ones):
``crypto`` keys and ciphers, ``data`` sources and datasets, ``models`` backbones, methods,
adapters, key-based model transformation, ``train`` config, loop, runs, inference,
``attacks`` the security audit, ``experiments`` presets and reproduction, ``serve`` the
multi-tenant server and its client, ``cli`` the command.
"""

from __future__ import annotations

import importlib
from typing import Any

from ppvit import _compat

__version__ = "0.3.0"

_API = {
    "Key": "crypto.keys",
    "KeyFileError": "crypto.keys",
    "BlockCipher": "crypto.ciphers",
    "EncryptTransform": "crypto.ciphers",
    "Plan": "crypto.ciphers",
    "Scheme": "crypto.ciphers",
    "decrypt_collection": "data.encrypt",
    "encrypt_collection": "data.encrypt",
    "create_backbone": "models.backbones",
    "METHODS": "models.configs",
    "FullConfig": "models.configs",
    "LinearConfig": "models.configs",
    "LoraPEConfig": "models.configs",
    "MeloConfig": "models.configs",
    "MethodConfig": "models.configs",
    "apply_method": "models.methods",
    "count_params": "models.methods",
    "merge_adapters": "models.methods",
    "method_config": "models.configs",
    "param_report": "models.methods",
    "AdapterMeta": "models.adapters",
    "load_adapter": "models.adapters",
    "merge_to_file": "models.adapters",
    "save_adapter": "models.adapters",
    "transform_model": "models.transform",
    "BackboneConfig": "train.config",
    "CryptoConfig": "train.config",
    "DataConfig": "train.config",
    "OptimConfig": "train.config",
    "RunConfig": "train.config",
    "TrainConfig": "train.config",
    "RunResult": "train.runs",
    "train": "train.loop",
    "evaluate_adapter": "train.inference",
    "predict_files": "train.inference",
    "known_plaintext_attack": "attacks.known_plaintext",
    "run_audit": "attacks.audit",
    "weight_matching_attack": "attacks.weight_matching",
    "PRESETS": "experiments.presets",
    "Preset": "experiments.presets",
    "reproduce": "experiments.reproduce",
}
"""Public name -> the module that defines it."""

__all__ = ["__version__", *sorted(_API)]

_compat.install()


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(f"ppvit.{_API[name]}"), name)
        globals()[name] = value
        return value
    if name in _compat.MOVED:  # ppvit.keys as an attribute: the deprecated module
        return importlib.import_module(f"ppvit.{name}")
    raise AttributeError(f"module 'ppvit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
