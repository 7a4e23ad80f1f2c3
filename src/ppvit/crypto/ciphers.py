"""Keyed block-wise image transforms (the EtC family), exactly invertible, numpy and torch.

An image is cut into ``p x p`` blocks (``p`` = the ViT patch size). A *scheme* is an
ordered combination of keyed steps, written ``shuffle+scramble`` on the command line:

``shuffle``
    Pixel shuffling (the paper's scheme): one key-derived permutation of the ``p*p*C``
    values of a block, the same for every block, mixing colour channels. A block is
    flattened in (row, column, channel) order, i.e. value ``(r, c, ch)`` has index
    ``(r * p + c) * C + ch``; output value ``i`` is input value ``perm[i]``.
``scramble``
    Block scrambling: a permutation of block positions (row-major block order).
``rotate``
    Per block, one of the 8 rotations/flips of the square (``k % 4`` quarter turns, then
    a left-right flip when ``k >= 4``).
``negpos``
    Negative-positive transformation: ``x -> max - x`` (255 for uint8, 1.0 for floats).
``channel``
    Colour-channel shuffling: one of the ``C!`` orders of the channels.

``mix``, ``lift``
    Keyed dense block mixings (a secret orthogonal or unimodular integer matrix applied to
    every block, after the other steps): see :mod:`ppvit.crypto.mixing`. They end a scheme
    and make the ciphertext float16 (``mix``) or int16/int32 (``lift``) instead of uint8.

``negpos`` and ``channel`` take a mode: ``:block`` (the default, the EtC family: each block
gets its own keyed choice) or ``:pixel`` (one keyed choice per pixel position inside the
block, the same for every block). Per-block choices tie the model to positions and cannot
be absorbed into a ViT's patch embedding; ``shuffle``, ``scramble`` and the ``:pixel``
modes can (see :mod:`ppvit.models.transform`).

Keyed choices come from :mod:`ppvit.crypto.keys` with the label ``ppvit/v1/<step>/<where>``,
``<step>`` as written in the scheme (``negpos``, ``negpos:pixel``, ...) and ``<where>``
``grid=<GH>x<GW>`` (blocks down and across) for per-block draws (``scramble``, ``rotate``,
``:block`` modes) or ``p=<p>/c=<C>`` for draws shared by all blocks (``shuffle``, ``:pixel``
modes). ``shuffle`` and ``scramble`` draw a permutation, the others ``choices``: ``rotate``
in ``range(8)``, ``negpos`` in ``range(2)``, ``channel`` an index into
``itertools.permutations(range(C))`` (output channel ``k`` takes input channel
``order[k]``). Rotations are ``numpy.rot90`` over (row, column).

Every scheme's gather steps (all but ``mix``/``lift``) compile, for one image size, to a
:class:`Plan`: a gather index over the image flattened in (H, W, C) order and a mask of
values to negate afterwards. One plan
serves numpy (HWC, NHWC) and torch (CHW, NCHW, any device), so both agree bit for bit,
and its inverse is again a plan.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from ppvit.crypto.keys import Key
from ppvit.crypto.mixing import CIPHERTEXT_DTYPES, MIXING_STEPS, BlockMixing, block_mixing

STEP_NAMES = ("shuffle", "scramble", "rotate", "negpos", "channel", *MIXING_STEPS)
_MODED = ("negpos", "channel")  # steps that accept ``:block`` / ``:pixel``
Mode = Literal["block", "pixel"]


@dataclass(frozen=True)
class Step:
    """One keyed transform of a scheme."""

    name: str
    mode: Mode = "block"

    def __str__(self) -> str:
        return f"{self.name}:pixel" if self.mode == "pixel" else self.name


@dataclass(frozen=True)
class Scheme:
    """An ordered combination of steps, applied left to right when encrypting."""

    steps: tuple[Step, ...]

    @classmethod
    def parse(cls, text: str | Scheme) -> Scheme:
        """Parse ``"shuffle+scramble+negpos:pixel"``; raise ``ValueError`` naming the problem."""
        if isinstance(text, Scheme):
            return text
        steps: list[Step] = []
        for part in str(text).strip().lower().split("+"):
            name, _, mode = part.strip().partition(":")
            if name not in STEP_NAMES:
                raise ValueError(f"unknown scheme step {name!r} in {text!r}; choose from {'+'.join(STEP_NAMES)}")
            if mode and (name not in _MODED or mode not in ("block", "pixel")):
                allowed = "block or pixel" if name in _MODED else "no mode"
                raise ValueError(f"scheme step {part!r}: {name} takes {allowed}")
            if any(s.name == name for s in steps):
                raise ValueError(f"scheme {text!r} names {name} twice")
            if steps and steps[-1].name in MIXING_STEPS:
                raise ValueError(f"scheme {text!r}: {steps[-1].name} mixes whole blocks and must be its last step")
            steps.append(Step(name, mode or "block"))  # type: ignore[arg-type]
        return cls(tuple(steps))

    def __str__(self) -> str:
        return "+".join(str(s) for s in self.steps)

    @property
    def absorbable(self) -> bool:
        """True when one fixed model change undoes the scheme (no per-block choices)."""
        return all(s.name in ("shuffle", "scramble", *MIXING_STEPS) or s.mode == "pixel" for s in self.steps)

    @property
    def mixing(self) -> str | None:
        """The dense mixing step that ends the scheme (``mix``, ``lift``), if any."""
        return self.steps[-1].name if self.steps and self.steps[-1].name in MIXING_STEPS else None

    @property
    def ciphertext_dtypes(self) -> tuple[str, ...]:
        """What its ciphertext may be, whatever the key (lift's is int32 for the few keys whose bound needs it)."""
        return CIPHERTEXT_DTYPES[self.mixing]

    @property
    def gather(self) -> Scheme:
        """The steps a :class:`Plan` does: all but the mixing."""
        return Scheme(tuple(s for s in self.steps if s.name not in MIXING_STEPS))


@dataclass(frozen=True, eq=False)
class Plan:
    """A compiled scheme for one (H, W, C): ``y = negate_where(invert, x.flat[index])``."""

    shape: tuple[int, int, int]
    index: np.ndarray  # int64, len H*W*C, gather over the HWC-flattened image
    invert: np.ndarray | None  # bool, same length, or None when nothing is negated
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)  # derived index arrays, per device

    def inverse(self) -> Plan:
        """The plan that undoes this one: gather with argsort(index), negate the same values."""
        inv_index = np.empty_like(self.index)
        inv_index[self.index] = np.arange(self.index.size)
        invert = None if self.invert is None else self.invert[inv_index]
        return Plan(self.shape, inv_index, invert)

    def apply_numpy(self, x: np.ndarray, max_value: float | None = None) -> np.ndarray:
        """Apply to a channels-last array (..., H, W, C).

        The gather runs in torch on a zero-copy view: torch's gather uses every core, where
        ``np.take`` uses one (figures in BENCHMARKS.md); the result is the same.
        """
        with warnings.catch_warnings():  # a read-only input (e.g. np.asarray of a PIL image) is only read
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            flat = torch.from_numpy(np.ascontiguousarray(x).reshape(-1, self.index.size))
        return self._apply(flat, "hwc", max_value).numpy().reshape(x.shape)

    def apply_torch(self, x: torch.Tensor, max_value: float | None = None) -> torch.Tensor:
        """Apply to a channels-first tensor (..., C, H, W) on any device."""
        return self._apply(x.reshape(-1, self.index.size), "chw", max_value).reshape(x.shape)

    def _apply(self, flat: torch.Tensor, layout: str, max_value: float | None) -> torch.Tensor:
        index, invert = self._tensors(layout, flat.device)
        # gather with a broadcast index runs on all cores; index_select on dim 1 is far slower (BENCHMARKS.md)
        y = torch.gather(flat, 1, index.expand(flat.shape[0], -1))
        if invert is not None:
            if y.dtype == torch.uint8 and max_value in (None, 255):
                y = torch.bitwise_xor(y, invert)  # 255 - v == v ^ 0xFF for uint8
            else:
                y = torch.where(invert.bool(), _max_value(y.dtype, max_value) - y, y).to(y.dtype)
        return y

    def chw_index(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The same plan over the image flattened in (C, H, W) order."""
        h, w, c = self.shape
        hwc_to_chw = np.arange(h * w * c).reshape(c, h, w).transpose(1, 2, 0).reshape(-1)
        index = np.empty_like(self.index)
        index[hwc_to_chw] = hwc_to_chw[self.index]
        invert = None
        if self.invert is not None:
            invert = np.empty_like(self.invert)
            invert[hwc_to_chw] = self.invert
        return index, invert

    def _tensors(self, layout: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Index and 0/255 negate mask as tensors for a layout and device, made once."""
        if (layout, device) not in self._cache:
            index, invert = (self.index, self.invert) if layout == "hwc" else self.chw_index()
            t_inv = None if invert is None else torch.from_numpy(invert.astype(np.uint8) * np.uint8(255)).to(device)
            self._cache[layout, device] = (torch.from_numpy(index).to(device), t_inv)
        return self._cache[layout, device]


def _max_value(dtype: Any, max_value: float | None) -> float:
    if max_value is not None:
        return max_value
    if dtype in (np.uint8, torch.uint8):
        return 255
    if (isinstance(dtype, torch.dtype) and dtype.is_floating_point) or (
        isinstance(dtype, np.dtype) and np.issubdtype(dtype, np.floating)
    ):
        return 1.0
    raise ValueError(f"negpos needs max_value for dtype {dtype} (255 is assumed only for uint8, 1.0 for floats)")


class BlockCipher:
    """Encrypts and decrypts images with a key, a scheme and a block size.

    numpy arrays are channels-last (HWC or NHWC), torch tensors channels-first (CHW or
    NCHW), PIL images are RGB; each comes back as the same kind. Plans are compiled once
    per image size and cached. A scheme ending in ``mix``/``lift`` gives float16/int
    ciphertext (no PIL image) and decrypts it back to uint8.
    """

    def __init__(self, key: Key, scheme: str | Scheme = "shuffle", block_size: int = 16) -> None:
        if block_size < 1:
            raise ValueError(f"block size must be positive, got {block_size}")
        self.key = key
        self.scheme = Scheme.parse(scheme)
        self.block_size = block_size
        self._plans: dict[tuple[int, int, int], tuple[Plan, Plan]] = {}

    def __repr__(self) -> str:
        return f"BlockCipher(scheme={str(self.scheme)!r}, block_size={self.block_size}, key={self.key.fingerprint})"

    def plan(self, height: int, width: int, channels: int = 3) -> Plan:
        """The encryption plan for images of this size (of the gather steps: a mixing follows it)."""
        return self._plans_for(height, width, channels)[0]

    def mixing(self, channels: int = 3) -> BlockMixing | None:
        """The block mixing applied after the plan, if the scheme has one."""
        name = self.scheme.mixing
        return None if name is None else block_mixing(self.key, name, self.block_size, channels)

    def ciphertext_dtype(self, channels: int = 3) -> str:
        """The dtype name of this key's ciphertext: uint8, or its mixing's (float16; int16 or int32)."""
        mixing = self.mixing(channels)
        return "uint8" if mixing is None else str(mixing.dtype).removeprefix("torch.")

    def _plans_for(self, height: int, width: int, channels: int) -> tuple[Plan, Plan]:
        shape = (height, width, channels)
        if shape not in self._plans:
            enc = compile_plan(self.key, self.scheme.gather, self.block_size, shape)
            self._plans[shape] = (enc, enc.inverse())
        return self._plans[shape]

    def encrypt(self, x: Any, max_value: float | None = None) -> Any:
        """Encrypt an image or a batch (numpy, torch or PIL)."""
        return self._run(x, 0, max_value)

    def decrypt(self, x: Any, max_value: float | None = None) -> Any:
        """Exactly undo :meth:`encrypt`."""
        return self._run(x, 1, max_value)

    def _run(self, x: Any, which: int, max_value: float | None) -> Any:
        if isinstance(x, Image.Image):
            if self.scheme.mixing:
                raise ValueError(f"scheme {self.scheme}: the ciphertext is not an 8-bit image; pass a numpy array")
            arr = np.asarray(x.convert("RGB"))
            return Image.fromarray(self._run(arr, which, max_value))
        if isinstance(x, torch.Tensor):
            if x.ndim not in (3, 4):
                raise ValueError(f"expected a CHW or NCHW tensor, got shape {tuple(x.shape)}")
            c, h, w = x.shape[-3:]
            plan = self._plans_for(*self._check(h, w), c)[which]
            mixing = self.mixing(c)
            if mixing is None:
                return plan.apply_torch(x, max_value)
            if which == 0:
                return _blockwise_chw(plan.apply_torch(x, max_value), self.block_size, mixing.encrypt)
            return plan.apply_torch(_blockwise_chw(x, self.block_size, mixing.decrypt), max_value)
        if isinstance(x, np.ndarray):
            if x.ndim not in (3, 4):
                raise ValueError(f"expected an HWC or NHWC array, got shape {x.shape}")
            h, w, c = x.shape[-3:]
            plan = self._plans_for(*self._check(h, w), c)[which]
            mixing = self.mixing(c)
            if mixing is None:
                return plan.apply_numpy(x, max_value)
            if which == 0:
                return _blockwise_hwc(plan.apply_numpy(x, max_value), self.block_size, mixing.encrypt)
            return plan.apply_numpy(_blockwise_hwc(x, self.block_size, mixing.decrypt), max_value)
        raise TypeError(f"cannot encrypt a {type(x).__name__}; pass a numpy array, torch tensor or PIL image")

    def _check(self, h: int, w: int) -> tuple[int, int]:
        p = self.block_size
        if h % p or w % p:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of the block size {p}; resize it first (e.g. --size)"
            )
        return h, w


def pinned_cipher(
    key: Key,
    scheme: str | Scheme | None = None,
    block_size: int | None = None,
    input_size: int | None = None,
    default_block: int = 16,
) -> tuple[BlockCipher, int | None]:
    """The cipher and input size to encrypt with: what is asked, else the key's pin, else ``shuffle`` in blocks of
    ``default_block`` (and no input size); anything the pin contradicts is one line naming the key file."""
    asked = None if scheme is None else str(Scheme.parse(scheme))
    cipher = BlockCipher(
        key, key.settle("scheme", asked, "shuffle"), key.settle("block_size", block_size, default_block)
    )
    return cipher, key.settle("input_size", input_size)


def _blockwise_hwc(x: np.ndarray, p: int, fn: Any) -> np.ndarray:
    """Apply ``fn`` to the (..., blocks, p*p*C) view of a channels-last array, and back."""
    *lead, h, w, c = x.shape
    blocks = np.ascontiguousarray(x).reshape(-1, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    y = fn(torch.from_numpy(np.ascontiguousarray(blocks)).reshape(-1, (h // p) * (w // p), p * p * c)).numpy()
    return y.reshape(-1, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(*lead, h, w, c)


def _blockwise_chw(x: torch.Tensor, p: int, fn: Any) -> torch.Tensor:
    """Apply ``fn`` to the (..., blocks, p*p*C) view of a channels-first tensor, and back."""
    *lead, c, h, w = x.shape
    blocks = x.reshape(-1, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    y = fn(blocks.reshape(-1, (h // p) * (w // p), p * p * c))
    return y.reshape(-1, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(*lead, c, h, w)


class EncryptTransform:
    """A torchvision-style transform: ``Compose([Resize(224), EncryptTransform(cipher), ToTensor()])``."""

    def __init__(self, cipher: BlockCipher, decrypt: bool = False) -> None:
        self.cipher = cipher
        self.decrypt = decrypt

    def __call__(self, img: Any) -> Any:
        return self.cipher.decrypt(img) if self.decrypt else self.cipher.encrypt(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cipher!r}, decrypt={self.decrypt})"


# -- compiling a scheme into a plan ------------------------------------------------------


def compile_plan(key: Key, scheme: str | Scheme, block_size: int, shape: tuple[int, int, int]) -> Plan:
    """Trace every step on an image of indices to get one gather index and negate mask."""
    scheme = Scheme.parse(scheme)
    if scheme.mixing:
        raise ValueError(f"scheme {scheme}: {scheme.mixing} is no gather; compile scheme.gather and mix after it")
    h, w, c = shape
    p = block_size
    gh, gw = h // p, w // p
    n = gh * gw
    # blocks[b, r, col, ch] holds the flat HWC index of the source value now at that place
    blocks = np.arange(h * w * c).reshape(gh, p, gw, p, c).transpose(0, 2, 1, 3, 4).reshape(n, p, p, c)
    invert = np.zeros(blocks.shape, dtype=bool)
    for step in scheme.steps:
        label = _label(step, p, c, gh, gw)
        if step.name == "shuffle":
            perm = key.permutation(label, p * p * c)
            blocks = blocks.reshape(n, -1)[:, perm].reshape(blocks.shape)
            invert = invert.reshape(n, -1)[:, perm].reshape(blocks.shape)
        elif step.name == "scramble":
            perm = key.permutation(label, n)
            blocks, invert = blocks[perm], invert[perm]
        elif step.name == "rotate":
            ks = key.choices(label, n, 8)
            blocks, invert = _dihedral(blocks, ks), _dihedral(invert, ks)
        elif step.name == "negpos":
            size = n if step.mode == "block" else p * p * c
            bits = key.choices(label, size, 2).astype(bool)
            invert = invert ^ (bits[:, None, None, None] if step.mode == "block" else bits.reshape(p, p, c))
        elif step.name == "channel":
            orders = np.array(list(itertools.permutations(range(c))), dtype=np.int64)
            if step.mode == "block":
                chan = orders[key.choices(label, n, len(orders))][:, None, None, :]  # (n, 1, 1, c)
            else:
                chan = orders[key.choices(label, p * p, len(orders))].reshape(1, p, p, c)
            chan = np.broadcast_to(chan, blocks.shape)
            blocks, invert = np.take_along_axis(blocks, chan, 3), np.take_along_axis(invert, chan, 3)
    index = blocks.reshape(gh, gw, p, p, c).transpose(0, 2, 1, 3, 4).reshape(-1)
    inv = invert.reshape(gh, gw, p, p, c).transpose(0, 2, 1, 3, 4).reshape(-1)
    return Plan(shape, np.ascontiguousarray(index), inv.copy() if inv.any() else None)


def _label(step: Step, p: int, c: int, gh: int, gw: int) -> str:
    """What a step's randomness depends on: its name and mode, and the sizes it draws for."""
    per_block = step.name in ("scramble", "rotate") or (step.name in _MODED and step.mode == "block")
    where = f"grid={gh}x{gw}" if per_block else f"p={p}/c={c}"
    return f"ppvit/v1/{step}/{where}"


def _dihedral(blocks: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """Per block b: rotate by ks[b] % 4 quarter turns, then flip left-right if ks[b] >= 4."""
    out = blocks.copy()
    for k in range(8):
        sel = ks == k
        if sel.any():
            t = np.rot90(blocks[sel], k % 4, axes=(1, 2))
            out[sel] = t[:, :, ::-1] if k >= 4 else t
    return out
