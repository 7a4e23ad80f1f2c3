"""From an image file to model-sized uint8 pixels: the one resize every path uses.

Training and ``eval`` (batches in :class:`~ppvit.data.pipeline.BatchPipeline`), ``predict``
and the serving client (files), ``encrypt --size``, previews and the audit all resize
here, so a file gets the same pixels, hence the same ciphertext and prediction, whichever
path carries it (before 0.3 the file paths used PIL's bicubic and training torch's, and
4.6% of shuffled CIFAR-10 test predictions depended on the path).

The kernel is torch's bicubic (Keys, a = -0.75, ``align_corners=False``), rounded and
clamped back to uint8: what every published ppvit result trained with, and it runs on
whole batches on any device. Where a side shrinks it is antialiased (torch's
``antialias=True``, PIL-like), since bicubic without a low-pass filter aliases a large
photo brought down to 112 or 224 pixels; CIFAR-10 at 32 pixels only grows, unaffected.

Its name is :data:`ppvit.data.preprocess.KERNEL`, recorded with the rest of the input recipe.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ppvit.data.manifest import MANIFEST_NAME, MARKER, PLAIN, Manifest, read_manifest, read_marker

if TYPE_CHECKING:
    import torch


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 NCHW images -> uint8 NCHW ``size x size`` (returned as given when already that size)."""
    import torch.nn.functional as F

    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    shrink = size < h or size < w
    x = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=shrink)
    return x.round().clamp(0, 255).to(images.dtype)


def resize_array(image: np.ndarray, size: int) -> np.ndarray:
    """One HWC uint8 image through :func:`resize` (the file paths: predict, client, encrypt, previews)."""
    if image.shape[:2] == (size, size):
        return image
    import torch

    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]  # a copy: decoded arrays are read-only
    return resize(x, size)[0].permute(1, 2, 0).numpy()


def read_image(path: str | os.PathLike, size: int, resize: bool = True) -> np.ndarray:
    """An image file as (size, size, 3) uint8: plain images are resized, ciphertext must fit already."""
    from ppvit.data.sources.base import decode, read_image_file

    try:
        item = decode(str(path), read_image_file(path))
    except OSError as exc:
        raise ValueError(f"image {path}: cannot be read ({exc.strerror})") from None
    if item.error:
        raise ValueError(f"image {path}: {item.error}")
    image = np.asarray(item.image)
    if image.shape[:2] != (size, size) and not resize:
        raise ValueError(f"image {path}: is {image.shape[1]}x{image.shape[0]}, the model takes {size}x{size}")
    return resize_array(image, size).copy()


def read_ciphertext_array(path: str | os.PathLike, size: int, dtypes: tuple[str, ...]) -> np.ndarray:
    """A ``.npy`` file of one image's ciphertext as the server takes it: (size, size, 3) of one of ``dtypes``
    (the scheme's: a ``mix``/``lift`` ciphertext is no image file); anything else is one line naming the file."""
    from ppvit.data.sources.base import check_image_file

    try:
        check_image_file(path)
        arr = np.load(path, mmap_mode="r", allow_pickle=False)  # the header checked before the values are read
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"image {path}: not a readable .npy array ({exc})") from None
    if arr.dtype.name not in dtypes:
        raise ValueError(f"image {path}: a {arr.dtype.name} array; this model's ciphertext is {' or '.join(dtypes)}")
    if arr.shape != (size, size, 3):
        raise ValueError(f"image {path}: an array of shape {arr.shape}; the model takes ({size}, {size}, 3)")
    arr = np.array(arr)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"image {path}: holds values that are not finite")
    return arr


def ciphertext_origin(path: str | os.PathLike) -> Manifest | None:
    """What says the file at ``path`` is ppvit ciphertext, and under which key and geometry: its
    :data:`~ppvit.data.manifest.MARKER` text chunk, else the manifest of the encrypted folder it lies in
    (``DST/``, ``DST/CLASS/`` or ``DST/SPLIT/CLASS/``; a decrypted folder's says plain). None: plain as far
    as the file tells (ciphertext written before ppvit marked it, copied out of its folder, cannot be told)."""
    from ppvit.data.sources.base import check_image_file

    path = Path(path)
    try:
        check_image_file(path)  # a link to a FIFO was waited on here: whoever reads it says why it cannot be
        with Image.open(path) as im:
            text = im.info.get(MARKER)  # text chunks before the pixels: read with the header
    except Exception:  # PIL raises many types; an unreadable file is reported by whoever decodes it
        text = None
    if isinstance(text, str):
        return read_marker(text, f"image {path}")
    for folder in list(path.parents)[:3]:
        if (folder / MANIFEST_NAME).is_file():
            manifest = read_manifest(folder)
            return None if manifest.scheme == PLAIN else manifest
    return None


def image_files(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Files as given; a folder as the image files under it, sorted (hidden ones skipped)."""
    for path in map(Path, paths):
        if not path.is_dir():
            yield str(path)
            continue
        from ppvit.data.sources.base import IMAGE_SUFFIXES, is_image_path  # the sources' test of an image file

        found = sorted(p for p in path.rglob("*") if is_image_path(p.relative_to(path).as_posix()) and p.is_file())
        if not found:
            raise ValueError(f"folder {path}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        yield from map(str, found)
