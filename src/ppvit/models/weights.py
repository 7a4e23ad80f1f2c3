"""Pretrained weights files: where they come from (``PPVIT_WEIGHTS``) and the early check of one.

Torch- and timm-free at import, so presets (data the CLI's parser reads) can name them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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
    tensor_shapes(path)


def check_model_output(out: str | os.PathLike, force: bool, inputs: dict[str, str | os.PathLike | None]) -> None:
    """Where ``merge`` and ``transform-model`` may write: a new file, or (``force``) a model file one of them wrote
    before; never one of ``inputs`` (what names it -> its path) or any other file: ``merge --force`` wrote over the
    adapter it merged, the run's checkpoint, the key file and the base weights (hostile tester)."""
    out = Path(out)
    for what, path in inputs.items():
        if path is not None and out.exists() and Path(path).exists() and out.samefile(path):
            raise ValueError(f"output {out}: is the {what}; give another output")
    if not out.exists():
        return
    if not force:
        raise ValueError(f"output {out}: exists; pass --force to replace it")
    if not (out.is_file() and _written_by_ppvit(out)):
        raise ValueError(f"output {out}: exists and is not a model file ppvit merge or transform-model wrote; refusing")


def _written_by_ppvit(path: Path) -> bool:
    """A safetensors file with the metadata of :func:`~ppvit.models.adapters.merge_to_file` or
    :func:`~ppvit.models.transform.transform_weights_file`."""
    info = file_metadata(path)
    return info.get("format") == "timm-state-dict" or info.get("input") in ("plain", "encrypted")


def file_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A safetensors file's metadata ({} for another kind of file, or one that cannot be read)."""
    try:
        if not is_safetensors(Path(path)):
            return {}
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # unreadable: the reader of its tensors says why
        return {}


def is_safetensors(path: Path) -> bool:
    """Whether a file is safetensors, by its content (an 8-byte header length, then the JSON header), not its
    name: a safetensors file saved as ``vit.bin`` was read as a PyTorch pickle ("KeyError: 53")."""
    with open(path, "rb") as fh:
        start = fh.read(9)
    return len(start) == 9 and start[8:] == b"{"


def read_state_dict(path: Path) -> dict[str, Any]:
    """The tensors of a weights file: safetensors, or a PyTorch file of tensors only (``weights_only``:
    a pickle that would run code is refused), unwrapped from a ``state_dict``/``model`` entry."""
    if is_safetensors(path):
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    with open(path, "rb") as fh:  # a file object: torch 2.14 hands a path named *.safetensors to safetensors
        state = torch.load(fh, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return state


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a weights file (a safetensors file: its header alone)."""
    try:
        if is_safetensors(path):
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        return {k: tuple(v.shape) for k, v in read_state_dict(path).items()}
    except Exception as exc:  # any unreadable file: one clear line
        raise ValueError(
            f"weights file {path}: cannot be read ({exc.__class__.__name__}: {str(exc)[:200]}); get a good copy, or "
            "pass --pretrained to download timm's weights where there is a network"
        ) from None


def weights_mismatch(path: Path, wanted: dict[str, tuple[int, ...]], model: str) -> str:
    """Why a weights file does not fit ``model`` (whose tensor shapes are ``wanted``), in a few words.

    The embedding width and the number of blocks say it for another ViT; keys for anything else.
    """
    have = tensor_shapes(path)
    (file_width, file_depth), (width, depth) = _vit_geometry(have), _vit_geometry(wanted)
    if file_width != width:
        return f"embed dim {file_width} vs {model}'s {width}"
    if file_depth != depth:
        return f"{file_depth} blocks vs {model}'s {depth}"
    lacking = sorted(set(wanted) - set(have) - {"head.weight", "head.bias"})
    if lacking:
        return f"{len(lacking)} of {model}'s tensors missing, e.g. {lacking[0]}"
    extra = sorted(set(have) - set(wanted))
    if extra:
        return f"{len(extra)} tensors {model} does not have, e.g. {extra[0]}"
    differs = [k for k in sorted(wanted) if k in have and have[k] != wanted[k]]
    if differs:
        return f"{differs[0]} is {have[differs[0]]} vs {model}'s {wanted[differs[0]]}"
    return f"its tensors do not load into {model}"


def _vit_geometry(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    """(embedding width, number of blocks) of a ViT state dict's shapes; 0 where it has none."""
    width = shapes.get("cls_token", shapes.get("pos_embed", (0,)))[-1]
    return width, len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
