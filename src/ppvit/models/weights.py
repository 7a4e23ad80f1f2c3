"""Pretrained weights files: where they come from (``PPVIT_WEIGHTS``) and the early check of one.

Torch- and timm-free at import, so presets (data the CLI's parser reads) can name them.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors import safe_open

WEIGHTS_ENV = "PPVIT_WEIGHTS"


def check_weights_file(path: str | os.PathLike) -> None:
    """Fail early, in one line, on a weights file that is missing or cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {path}: not found (set {WEIGHTS_ENV} or --weights to a local copy, or pass --pretrained "
            "to download timm's weights where there is a network)"
        )
    head_classes(path)


def head_classes(path: Path) -> int:
    """The number of classes of the ``head.weight`` stored in a weights file (0 when headless)."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                return f.get_slice("head.weight").get_shape()[0] if "head.weight" in f.keys() else 0  # noqa: SIM118
        from timm.models import load_state_dict

        state = load_state_dict(str(path))
    except Exception as exc:  # any unreadable file: one clear line
        raise ValueError(
            f"weights file {path}: cannot be read ({exc.__class__.__name__}: {str(exc)[:200]}); get a good copy, or "
            "pass --pretrained to download timm's weights where there is a network"
        ) from None
    return int(state["head.weight"].shape[0]) if "head.weight" in state else 0
