"""Things to look at: a preview grid of plain and encrypted images, and the encryption demo."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from ppvit._io import atomic_write
from ppvit.crypto.keys import Key
from ppvit.data.images import resize_array

PREVIEW_SCHEMES = ("shuffle", "scramble", "rotate", "negpos", "channel", "shuffle+scramble")
MAX_PREVIEW_IMAGES = 64  # a grid's columns: every image is decoded and encrypted per scheme, and pasted whole
PREVIEW_MARK = "ppvit-preview"  # a PNG text chunk: the one kind of existing file a preview overwrites


def preview(
    src: str | os.PathLike,
    out: str | os.PathLike,
    key: Key,
    schemes: tuple[str, ...] | None = None,
    block_size: int | None = None,
    n: int = 4,
    size: int | None = None,
    prefix: str = "",
) -> Path:
    """``ppvit preview``: ``n`` images of ``src`` plain and under each scheme, as a PNG grid at ``out``.

    A key's pin is the default of the schemes, block size and size, and refuses others (as every verb that
    encrypts); without a pin all of :data:`PREVIEW_SCHEMES` in blocks of 16 at 224. ``out`` is a ``.png`` that
    does not exist or is an earlier preview: any other file there (the key itself) is refused, never replaced."""
    from ppvit.crypto.ciphers import Scheme
    from ppvit.crypto.keys import MAX_INPUT_SIZE

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"preview {out}: a preview is a .png file")
    if out.exists() and not _is_preview(out):
        raise ValueError(f"preview {out}: exists and is not a preview written by ppvit; refusing to replace it")
    if not 1 <= n <= MAX_PREVIEW_IMAGES:
        raise ValueError(f"--n {n}: from 1 to {MAX_PREVIEW_IMAGES} images")
    pinned = (key.pin.scheme,) if key.pin is not None else PREVIEW_SCHEMES
    schemes = tuple(key.settle("scheme", str(Scheme.parse(s)), s) for s in schemes) if schemes else pinned
    block_size = key.settle("block_size", block_size, 16)
    size = key.settle("input_size", size, 224)
    if not 1 <= size <= MAX_INPUT_SIZE:
        raise ValueError(f"--size {size}: from 1 to {MAX_INPUT_SIZE}")
    return preview_grid(sample_images(src, n, size, prefix), key, schemes, block_size, out)


def _is_preview(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            return im.format == "PNG" and PREVIEW_MARK in getattr(im, "text", {})
    except Exception:  # not an image PIL reads: not ours
        return False


def sample_images(src: str | os.PathLike, n: int, size: int | None, prefix: str = "") -> list[np.ndarray]:
    """``n`` decodable images of a source (under ``prefix``), one per class in class order, resized to ``size``.

    With fewer classes than ``n``, a second image of each class follows, and so on. Images of a
    class already shown are not read (a folder or archive sorted by class is not decoded whole).
    """
    from ppvit.data.sources import class_of, open_source  # the data stack only when previews are made

    source = open_source(src)
    source.check_plain("preview")
    quota, taken = 1, {}
    while True:
        per_class: dict[str, list[np.ndarray]] = {}

        def select(rel: str, quota: int = quota, per_class: dict = per_class) -> bool:
            return (not prefix or rel.startswith(prefix)) and len(per_class.get(class_of(rel), [])) < quota

        for item in source.images(select):
            if item.error is None:
                im = np.asarray(item.image)
                per_class.setdefault(class_of(item.relpath), []).append(im if size is None else resize_array(im, size))
            if len(per_class) >= n and all(len(v) >= quota for v in per_class.values()):
                break
        if not per_class:
            raise ValueError(f"source {src}: no readable images" + (f" under {prefix}" if prefix else ""))
        taken = per_class
        if sum(len(v) for v in per_class.values()) >= n or quota * len(per_class) >= n or quota > n:
            break
        if sum(len(v) for v in per_class.values()) < quota * len(per_class):  # the source ran out
            break
        quota = -(-n // len(per_class))
    rounds = max(len(v) for v in taken.values())
    out = [taken[c][r] for r in range(rounds) for c in sorted(taken) if r < len(taken[c])]
    return out[:n]


def preview_grid(
    images: list[np.ndarray], key: Key, schemes: tuple[str, ...], block_size: int, out: str | os.PathLike
) -> Path:
    """A PNG: one row of plain images, then one row per scheme, labelled, upscaled to >= 128 px."""
    from ppvit.crypto.ciphers import BlockCipher

    h, w, _ = images[0].shape
    zoom = max(1, 128 // max(h, w))
    cell_w, cell_h, label_w, pad = w * zoom, h * zoom, 150, 4
    rows = [("plain", images)] + [
        (s, _visible(BlockCipher(key, s, block_size).encrypt(np.stack(images)))) for s in schemes
    ]
    grid = Image.new("RGB", (label_w + len(images) * (cell_w + pad), len(rows) * (cell_h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (name, row) in enumerate(rows):
        y = r * (cell_h + pad)
        draw.text((4, y + cell_h // 2 - 6), name, fill="black")
        for c, im in enumerate(row):
            tile = Image.fromarray(im).resize((cell_w, cell_h), Image.Resampling.NEAREST)
            grid.paste(tile, (label_w + c * (cell_w + pad), y))
    out = Path(out)
    info = PngInfo()
    info.add_text(PREVIEW_MARK, "1")
    atomic_write(out, lambda tmp: grid.save(tmp, format="PNG", pnginfo=info))
    return out


def _visible(ciphertext: np.ndarray) -> list[np.ndarray]:
    """A scheme's ciphertext as uint8 images: a mixing's (float16, int16) stretched from its least to its largest
    value over the row (PIL shows no such array)."""
    if ciphertext.dtype == np.uint8:
        return list(ciphertext)
    x = ciphertext.astype(np.float64)
    lo, hi = x.min(), x.max()
    return list(((x - lo) / max(hi - lo, 1e-12) * 255).round().astype(np.uint8))


@dataclass
class DemoReport:
    images: int
    size: int
    block_size: int
    scheme: str
    encrypt_seconds: float
    decrypt_seconds: float
    round_trip_exact: bool
    failed: int
    out: Path

    def lines(self) -> list[str]:
        verdict = "bit-exact" if self.round_trip_exact else "MISMATCH"
        return [
            f"encrypted {self.images} CIFAR-10 test images at {self.size}x{self.size}, scheme {self.scheme}, "
            f"{self.block_size}x{self.block_size} blocks, in {self.encrypt_seconds:.1f} s "
            f"({self.images / self.encrypt_seconds:.0f} img/s, PNG output)",
            f"decrypted them in {self.decrypt_seconds:.1f} s; round trip against the resized originals: {verdict}",
            f"outputs in {self.out}: key (0600), encrypted/, decrypted/, preview.png",
        ]


def encryption_demo(
    data: str | os.PathLike, out: str | os.PathLike, n: int = 200, size: int = 224, block_size: int = 16
) -> DemoReport:
    """Encrypt, decrypt and verify ``n`` test images of the CIFAR-10 copy; write a preview.

    A throwaway key is created in ``out``; the run refuses an ``out`` that holds one already.
    """
    from ppvit.crypto.ciphers import BlockCipher
    from ppvit.data.encrypt import decrypt_collection, encrypt_collection
    from ppvit.data.sources import open_source

    if not 10 <= n <= 10000:
        raise ValueError(f"--n {n}: from 10 to 10000 (n // 10 test images of each class)")
    out = Path(out)
    per_class = n // 10
    counts: dict[str, int] = {}

    def select(rel: str) -> bool:  # the first n // 10 test images of each class folder
        parts = rel.split("/")
        if len(parts) != 3 or parts[0] != "test" or counts.get(parts[1], 0) >= per_class:
            return False
        counts[parts[1]] = counts.get(parts[1], 0) + 1
        return True

    originals = {
        Path(item.relpath).with_suffix(".png").as_posix(): resize_array(np.asarray(item.image), size)
        for item in open_source(data).images(select)
        if item.error is None
    }
    if not originals:  # else the key was made, the encryption refused, and every rerun refused for the key
        raise ValueError(f"source {data}: no readable images under test/ (the demo encrypts the test split)")
    chosen = {Path(rel).with_suffix("").as_posix() for rel in originals}
    out.mkdir(parents=True, exist_ok=True)  # the key once the data are read: a wrong --data leaves none behind
    key = Key.generate()
    key.save(out / "demo.key")
    cipher = BlockCipher(key, "shuffle", block_size)
    enc = encrypt_collection(
        data,
        out / "encrypted",
        cipher,
        size=size,
        progress=False,
        select=lambda r: str(Path(r).with_suffix("")) in chosen,
    )
    dec = decrypt_collection(out / "encrypted", out / "decrypted", key, progress=False)
    decrypted = {item.relpath: np.asarray(item.image) for item in open_source(out / "decrypted").images()}
    exact = decrypted.keys() == originals.keys() and all(np.array_equal(decrypted[r], originals[r]) for r in originals)
    preview_grid(sample_images(data, 10, size, "test/"), key, PREVIEW_SCHEMES, block_size, out / "preview.png")
    return DemoReport(
        enc.written + enc.skipped,
        size,
        block_size,
        "shuffle",
        enc.seconds,
        dec.seconds,
        exact,
        len(enc.failed) + len(dec.failed),
        out,
    )
