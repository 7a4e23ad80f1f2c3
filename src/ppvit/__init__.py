"""ppvit: privacy-preserving fine-tuning of Vision Transformers on block-wise encrypted images.

The library API a notebook user calls; the ``ppvit`` command is a thin layer over it.
"""

__version__ = "0.2.0"  # before the imports: modules may read it while the package loads

from .adapters import AdapterMeta, load_adapter, merge_to_file, save_adapter
from .audit import known_plaintext_attack, run_audit, weight_matching_attack
from .backbones import create_backbone
from .ciphers import BlockCipher, EncryptTransform, Plan, Scheme
from .config import BackboneConfig, CryptoConfig, DataConfig, OptimConfig, RunConfig, TrainConfig
from .dataset_io import decrypt_collection, encrypt_collection
from .inference import evaluate_adapter, predict_files
from .keys import Key, KeyFileError
from .methods import (
    METHODS,
    FullConfig,
    LinearConfig,
    LoraPEConfig,
    MeloConfig,
    MethodConfig,
    apply_method,
    count_params,
    merge_adapters,
    method_config,
    param_report,
)
from .model_transform import transform_model
from .presets import PRESETS, Preset, reproduce
from .runs import RunResult
from .training import train

__all__ = [
    "METHODS",
    "PRESETS",
    "AdapterMeta",
    "BackboneConfig",
    "BlockCipher",
    "CryptoConfig",
    "DataConfig",
    "EncryptTransform",
    "FullConfig",
    "Key",
    "KeyFileError",
    "LinearConfig",
    "LoraPEConfig",
    "MeloConfig",
    "MethodConfig",
    "OptimConfig",
    "Plan",
    "Preset",
    "RunConfig",
    "RunResult",
    "Scheme",
    "TrainConfig",
    "__version__",
    "apply_method",
    "count_params",
    "create_backbone",
    "decrypt_collection",
    "encrypt_collection",
    "evaluate_adapter",
    "known_plaintext_attack",
    "load_adapter",
    "merge_adapters",
    "merge_to_file",
    "method_config",
    "param_report",
    "predict_files",
    "reproduce",
    "run_audit",
    "save_adapter",
    "train",
    "transform_model",
    "weight_matching_attack",
]
