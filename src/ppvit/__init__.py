"""ppvit: privacy-preserving fine-tuning of Vision Transformers on block-wise encrypted images."""

__version__ = "0.1.0"  # before the imports: modules may read it while the package loads

from .adapters import AdapterMeta, load_adapter, save_adapter
from .ciphers import BlockCipher, EncryptTransform, Plan, Scheme
from .keys import Key, KeyFileError
from .methods import METHODS, apply_method, count_params, merge_adapters, method_config, param_report

__all__ = [
    "METHODS",
    "AdapterMeta",
    "BlockCipher",
    "EncryptTransform",
    "Key",
    "KeyFileError",
    "Plan",
    "Scheme",
    "__version__",
    "apply_method",
    "count_params",
    "load_adapter",
    "merge_adapters",
    "method_config",
    "param_report",
    "save_adapter",
]
