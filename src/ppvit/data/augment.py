"""Augmentation: of plain images before encryption (crop and flip), and of ciphertext (mixup, block cutmix).

Torch is imported inside the functions, so the training schema reads :data:`PlainAugment`
without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

PlainAugment = Literal["none", "crop-flip"]


def random_crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator | None) -> torch.Tensor:
    """Per image: a random crop of the zero-padded image, then a horizontal flip half the time."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)  # (n, h)
    cols = dx[:, None] + torch.arange(w)[None]
    cols = torch.where(flip[:, None], cols.flip(1), cols).to(x.device)  # (n, w)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2)


def mix_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    mixup: float,
    cutmix: float,
    block: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or block-aligned cutmix (chosen at random when both are on): soft targets.

    Both are safe on ciphertext: mixup mixes values position by position, so it commutes
    with any permutation; the cutmix box covers whole ``block x block`` blocks, so it
    commutes with every step that keeps block positions. Under ``scramble`` the box is a
    keyed scattered set of blocks in the plain image: still a valid mix of two images.
    """
    import torch
    import torch.nn.functional as F

    target = F.one_hot(y, num_classes).float()
    if mixup <= 0 and cutmix <= 0:
        return x, target
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    use_cutmix = cutmix > 0 and (mixup <= 0 or torch.rand((), generator=generator) < 0.5)
    alpha = cutmix if use_cutmix else mixup
    # Beta from numpy, seeded from the torch generator, so a resumed run draws the same.
    lam = float(np.random.default_rng(int(torch.randint(0, 2**31, (), generator=generator))).beta(alpha, alpha))
    if not use_cutmix:
        return lam * x + (1 - lam) * x[perm], lam * target + (1 - lam) * target[perm]
    gh, gw = x.shape[-2] // block, x.shape[-1] // block
    bh = round(gh * (1 - lam) ** 0.5)
    bw = round(gw * (1 - lam) ** 0.5)
    top = int(torch.randint(0, gh - bh + 1, (), generator=generator))
    left = int(torch.randint(0, gw - bw + 1, (), generator=generator))
    x = x.clone()
    sl = (slice(None), slice(None), slice(top * block, (top + bh) * block), slice(left * block, (left + bw) * block))
    x[sl] = x[perm][sl]
    lam = 1 - (bh * bw) / (gh * gw)  # the exact share of the image kept
    return x, lam * target + (1 - lam) * target[perm]
