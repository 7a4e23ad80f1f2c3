"""Absorb a key into a ViT: the model trained on plain images, made exact on encrypted ones.

Kiya et al. (arXiv 2207.05366): with blocks equal to the ViT patches, a block-wise scheme
whose choices are the same in every block is a fixed linear map of each patch, plus a
permutation of patch positions. Both can be undone inside the model:

* ``shuffle`` / ``channel:pixel`` (a permutation of a block's values) permute the
  patch embedding's input columns;
* ``negpos:pixel`` (``v -> 1 - v`` at fixed positions) flips the sign of those columns
  and moves a constant into the bias;
* ``scramble`` (a permutation of blocks) permutes the position embeddings of the patch
  tokens; the class token is untouched, and a transformer without position-dependent
  operations then computes the same thing on permuted tokens.

Per-block choices (``rotate``, ``negpos``, ``channel`` in ``:block`` mode) differ
between blocks and cannot be absorbed; they are refused.

Normalisation. The server keeps its ordinary pipeline: ``encrypt(uint8) -> /255 ->
(v - mean_c) / std_c``. With per-channel mean and std a channel-mixing shuffle does not
commute with that normalisation, so the difference is folded into the patch embedding:
if encrypted value ``i`` of a block is plain value ``j = pi(i)`` (negated when
``inv[i]``), the plain normalised value is ``n_j = a_i n'_i + o_i`` with

    a_i = s_c(i) / s_c(j),                o_i = (m_c(i) - m_c(j)) / s_c(j)        (kept)
    a_i = -s_c(i) / s_c(j),               o_i = (1 - m_c(i) - m_c(j)) / s_c(j)    (negated)

so ``W'[:, i] = a_i W[:, pi(i)]`` and ``b' = b + sum_i o_i W[:, pi(i)]`` give
``W' n' + b' = W n + b`` exactly in real arithmetic (computed in float64).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from .backbones import input_size, normalization, patch_size
from .ciphers import BlockCipher, Plan, Scheme
from .keys import Key


@dataclass(frozen=True)
class BlockMap:
    """A plan seen block-wise: output block b comes from block ``sigma[b]``; in every block,
    output value i (row, column, channel order) is input value ``pi[i]``, negated where ``inv[i]``."""

    sigma: np.ndarray
    pi: np.ndarray
    inv: np.ndarray


def block_map(plan: Plan, block_size: int) -> BlockMap:
    """Decompose a plan; a ValueError when its within-block map differs between blocks."""
    h, w, c = plan.shape
    p = block_size
    gh, gw = h // p, w // p
    n = gh * gw
    idx = plan.index.reshape(gh, p, gw, p, c).transpose(0, 2, 1, 3, 4).reshape(n, p * p * c)
    row, col, ch = idx // (w * c), (idx // c) % w, idx % c
    src_block = (row // p) * gw + col // p
    within = ((row % p) * p + col % p) * c + ch
    inv = (
        np.zeros_like(idx, dtype=bool)
        if plan.invert is None
        else plan.invert.reshape(gh, p, gw, p, c).transpose(0, 2, 1, 3, 4).reshape(n, -1)
    )
    if (src_block != src_block[:, :1]).any() or (within != within[:1]).any() or (inv != inv[:1]).any():
        raise ValueError("this scheme makes different choices in different blocks; it cannot be absorbed")
    return BlockMap(src_block[:, 0], within[0], inv[0])


def keyed_patch_embed(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bmap: BlockMap,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The patch embedding (conv weight D x C x p x p, bias D) for encrypted, normalised input."""
    d, c, p, _ = weight.shape
    w = weight.detach().double().permute(0, 2, 3, 1).reshape(d, -1)  # columns in (row, col, channel) order
    m, s = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    ci, cj = np.arange(p * p * c) % c, bmap.pi % c  # channel of encrypted value i and of its source j
    a = np.where(bmap.inv, -s[ci] / s[cj], s[ci] / s[cj])
    o = np.where(bmap.inv, (1 - m[ci] - m[cj]) / s[cj], (m[ci] - m[cj]) / s[cj])
    w_src = w[:, torch.from_numpy(bmap.pi)]
    new_w = w_src * torch.from_numpy(a)
    new_b = (
        bias.detach().double() if bias is not None else torch.zeros(d, dtype=torch.float64)
    ) + w_src @ torch.from_numpy(o)
    new_w = new_w.reshape(d, p, p, c).permute(0, 3, 1, 2)
    return new_w.to(weight.dtype).contiguous(), new_b.to(weight.dtype)


def transform_model(
    model: nn.Module,
    key: Key,
    scheme: str | Scheme,
    block_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> nn.Module:
    """Make ``model`` (a timm ViT, changed in place and returned) exact on encrypted inputs.

    ``mean``/``std`` default to the model's own normalisation; the patch embedding must
    have a bias (timm's default) when the scheme or the normalisation needs one.
    """
    scheme = Scheme.parse(scheme)
    if not scheme.absorbable:
        per_block = [str(s) for s in scheme.steps if s.name in ("rotate", "negpos", "channel") and s.mode == "block"]
        raise ValueError(
            f"scheme {scheme}: {', '.join(per_block)} choose per block and cannot be absorbed into a model; "
            "use shuffle, scramble, negpos:pixel or channel:pixel"
        )
    p = patch_size(model)
    if block_size not in (None, p):
        raise ValueError(f"block size {block_size} differs from the model's patch size {p}; they must be equal")
    if getattr(model, "dynamic_img_size", False):
        raise ValueError("models with dynamic image size are not supported")
    side = input_size(model)
    default_mean, default_std = normalization(model)
    mean, std = mean or default_mean, std or default_std
    bmap = block_map(BlockCipher(key, scheme, p).plan(side, side, model.patch_embed.proj.in_channels), p)

    proj = model.patch_embed.proj
    new_w, new_b = keyed_patch_embed(proj.weight, proj.bias, bmap, mean, std)
    with torch.no_grad():
        proj.weight.copy_(new_w)
        if proj.bias is None:
            proj.bias = nn.Parameter(new_b)
        else:
            proj.bias.copy_(new_b)
        if model.pos_embed is not None:
            start = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
            patches = model.pos_embed[:, start:].clone()
            model.pos_embed[:, start:] = patches[:, torch.from_numpy(bmap.sigma)]
    return model
