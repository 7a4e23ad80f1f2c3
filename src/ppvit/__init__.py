"""ppvit: privacy-preserving fine-tuning of Vision Transformers on block-wise encrypted images."""

__version__ = "0.1.0"  # before the imports: modules may read it while the package loads

from .ciphers import BlockCipher, EncryptTransform, Plan, Scheme
from .keys import Key, KeyFileError

__all__ = ["BlockCipher", "EncryptTransform", "Key", "KeyFileError", "Plan", "Scheme", "__version__"]
