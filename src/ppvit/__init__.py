"""ppvit: privacy-preserving fine-tuning of Vision Transformers on block-wise encrypted images."""

from .ciphers import BlockCipher, EncryptTransform, Plan, Scheme
from .keys import Key, KeyFileError

__version__ = "0.1.0"

__all__ = ["BlockCipher", "EncryptTransform", "Key", "KeyFileError", "Plan", "Scheme", "__version__"]
