"""Absorb a key into a ViT: the model trained on plain images, made exact on encrypted ones.

Kiya et al. (arXiv 2207.05366): with blocks equal to the ViT patches, a block-wise scheme
whose choices are the same in every block is a fixed linear map of each patch, plus a
permutation of patch positions. Both can be undone inside the model:

* ``shuffle`` / ``channel:pixel`` (a permutation of a block's values) permute the
  patch embedding's input columns;
* ``negpos:pixel`` (``v -> 1 - v`` at fixed positions) flips the sign of those columns
  and moves a constant into the bias;
* ``scramble`` (a permutation of blocks) permutes the position embeddings of the patch
  tokens. Class and register tokens are untouched, and the transformer blocks and the
  pooling (class token, average or attention pooling) are blind to the order of tokens,
  so the model then computes the same thing on permuted tokens.

The maps are read off the compiled :class:`~ppvit.crypto.ciphers.Plan` (:func:`block_map`), so
any absorbable combination, in any order, is handled by the same code; a plan whose
within-block map differs between blocks is refused. Per-block choices (``rotate``,
``negpos``, ``channel`` in ``:block`` mode) cannot be absorbed and are refused by name.

Normalisation is folded into the patch embedding; the server keeps its ordinary pipeline
``encrypt(uint8) -> /255 -> (v - mean_c) / std_c``. With per-channel mean and std a
channel-mixing shuffle does not commute with that normalisation. If encrypted value ``i``
of a block (flattened in row, column, channel order) is plain value ``j = pi(i)``, negated
(``v -> 1 - v``) where ``inv[i]``, then ``v'_i = s_c(i) n'_i + m_c(i)`` and the plain
normalised value ``n_j = (v_j - m_c(j)) / s_c(j)`` is ``n_j = a_i n'_i + o_i`` with

    a_i =  s_c(i) / s_c(j),    o_i = (m_c(i) - m_c(j)) / s_c(j)        (kept:    v_j = v'_i)
    a_i = -s_c(i) / s_c(j),    o_i = (1 - m_c(i) - m_c(j)) / s_c(j)    (negated: v_j = 1 - v'_i)

As ``pi`` is a bijection, ``W n + b = sum_i W[:, pi(i)] (a_i n'_i + o_i) + b``, so

    W'[:, i] = a_i W[:, pi(i)],        b' = b + sum_i o_i W[:, pi(i)]

are exact in real arithmetic (computed in float64, then cast back). The conv weight is
``D x C x p x p``, flattened in (channel, row, column) order: it is permuted to (row,
column, channel) for the formula and back. Without a conv bias (CLIP-style ``pre_norm``
models) the constant goes into the patch tokens' position embeddings, which are added
right after it; with uniform mean and std and no ``negpos`` it is zero anyway.

The inverse (``inverse=True``) applies the same formula to the decryption plan: it turns a
model that works on encrypted images (e.g. one the key holder trained on them) into one
for plain images.

A dense block mixing (``mix``, ``lift``: :mod:`ppvit.crypto.mixing`) after the gather steps
makes the within-block map affine: in the pipeline's units (``v = x/255``), a block's values
become ``u = T v + t`` with ``T = A G`` and ``t = A g + d``, where ``G`` is the signed
permutation of the gather steps (``G[i, pi(i)] = -1`` where negated, else 1), ``g`` the
negation indicator and ``u = A v + d`` the mixing's real form. With inputs ``a = D b + e``
(the old input ``a`` from the new one ``b``: ``D = T^-1, e = -T^-1 t`` to absorb the key,
``D = T, e = t`` for the inverse) and ``a = s n_a + m`` per position,

    W' = W S^-1 D S,        b' = b + W S^-1 (D m + e - m)

in float64 (``S = diag(s)``), exact up to float rounding and the ciphertext's own
quantisation (float16 for ``mix``; ``lift`` is exact).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.layers import PatchEmbed

from ppvit._io import atomic_write
from ppvit.crypto.ciphers import BlockCipher, Plan, Scheme
from ppvit.crypto.keys import Key
from ppvit.crypto.mixing import BlockMixing
from ppvit.models.backbones import create_backbone, input_size, normalization, patch_size
from ppvit.models.weights import check_weights_file, file_metadata, tensor_shapes


@dataclass(frozen=True)
class BlockMap:
    """A plan seen block-wise: output block b comes from block ``sigma[b]``; in every block,
    output value i (row, column, channel order) is input value ``pi[i]``, negated where ``inv[i]``."""

    sigma: np.ndarray
    pi: np.ndarray
    inv: np.ndarray


@dataclass(frozen=True)
class KeyedEmbedding:
    """The tensors a key changes, with timm's names: ``patch_embed.proj.weight``/``.bias`` and
    ``pos_embed`` (``bias`` None when the model has none, ``pos_embed`` None likewise)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    pos_embed: torch.Tensor | None


def block_map(plan: Plan, block_size: int) -> BlockMap:
    """Decompose a plan; a ValueError when its within-block map differs between blocks."""
    h, w, c = plan.shape
    p = block_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the block size {p}")
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


def _fold(
    weight: torch.Tensor, bmap: BlockMap, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``W'`` (D x C x p x p, float64) and the bias shift ``sum_i o_i W[:, pi(i)]`` (D, float64)."""
    d, c, p, _ = weight.shape
    w = weight.detach().double().permute(0, 2, 3, 1).reshape(d, -1)  # columns in (row, col, channel) order
    m, s = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    ci, cj = np.arange(p * p * c) % c, bmap.pi % c  # channel of encrypted value i and of its source j
    a = np.where(bmap.inv, -s[ci] / s[cj], s[ci] / s[cj])
    o = np.where(bmap.inv, (1 - m[ci] - m[cj]) / s[cj], (m[ci] - m[cj]) / s[cj])
    w_src = w[:, torch.from_numpy(bmap.pi)]
    new_w = (w_src * torch.from_numpy(a)).reshape(d, p, p, c).permute(0, 3, 1, 2)
    return new_w, w_src @ torch.from_numpy(o)


def _check_model(model: nn.Module, scheme: Scheme, block_size: int | None) -> int:
    """The patch size, after refusing what the transform cannot make exact."""
    if not scheme.absorbable:
        per_block = [str(s) for s in scheme.steps if s.name in ("rotate", "negpos", "channel") and s.mode == "block"]
        raise ValueError(
            f"scheme {scheme}: {', '.join(per_block)} choose per block and cannot be absorbed into a model; "
            "use shuffle, scramble, negpos:pixel or channel:pixel"
        )
    pe = getattr(model, "patch_embed", None)
    if type(pe) is not PatchEmbed or not isinstance(pe.proj, nn.Conv2d):
        raise ValueError(
            f"the model's patch embedding is a {type(pe).__name__}; only timm's plain PatchEmbed is supported"
        )
    p = patch_size(model)
    if pe.proj.kernel_size != (p, p) or pe.proj.stride != (p, p):
        raise ValueError("the patch embedding is not one p x p convolution with stride p")
    if block_size not in (None, p):
        raise ValueError(f"block size {block_size} differs from the model's patch size {p}; they must be equal")
    if getattr(model, "dynamic_img_size", False):
        raise ValueError("models with dynamic image size are not supported (position embeddings are resampled)")
    return p


def keyed_embedding(
    model: nn.Module,
    key: Key,
    scheme: str | Scheme,
    block_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    inverse: bool = False,
) -> KeyedEmbedding:
    """The patch embedding and position embeddings that make ``model`` exact on encrypted inputs.

    The model is not changed; :func:`transform_model` installs the result, and a method that
    trains on encrypted images (the key holder's ``lora-pe``) can start from it. ``mean``/``std``
    default to the model's own normalisation (what ppvit's data pipeline uses).
    """
    scheme = Scheme.parse(scheme)
    p = _check_model(model, scheme, block_size)
    side, channels = input_size(model), model.patch_embed.proj.in_channels
    cipher = BlockCipher(key, scheme, p)
    plan, mixing = cipher.plan(side, side, channels), cipher.mixing(channels)
    if mixing is None:
        return plan_embedding(model, plan.inverse() if inverse else plan, mean, std)
    return mixed_embedding(model, plan, mixing, mean, std, inverse)


def mixed_embedding(
    model: nn.Module,
    plan: Plan,
    mixing: BlockMixing,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    inverse: bool = False,
) -> KeyedEmbedding:
    """:func:`keyed_embedding` for a gather plan followed by a block mixing (module docstring)."""
    mean, std = _norm(model, plan, mean, std)
    bmap = block_map(plan, patch_size(model))
    n = bmap.pi.size
    g = np.zeros((n, n))
    g[np.arange(n), bmap.pi] = np.where(bmap.inv, -1.0, 1.0)
    t_mat, t_vec = mixing.matrix @ g, mixing.matrix @ bmap.inv.astype(np.float64) + mixing.offset
    if inverse:
        d_mat, e_vec, sigma = t_mat, t_vec, np.argsort(bmap.sigma)
    else:
        d_mat = np.linalg.inv(t_mat)
        e_vec, sigma = -d_mat @ t_vec, bmap.sigma
    proj = model.patch_embed.proj
    dim, c, p, _ = proj.weight.shape
    w = proj.weight.detach().double().permute(0, 2, 3, 1).reshape(dim, -1)  # (row, col, channel) columns
    m = np.asarray(mean, dtype=np.float64)[np.arange(n) % c]
    s = np.asarray(std, dtype=np.float64)[np.arange(n) % c]
    new_w = w @ torch.from_numpy(d_mat * s[None, :] / s[:, None])
    shift = w @ torch.from_numpy((d_mat @ m + e_vec - m) / s)
    return _embedding(model, new_w.reshape(dim, p, p, c).permute(0, 3, 1, 2), shift, sigma)


def plan_embedding(
    model: nn.Module, plan: Plan, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None
) -> KeyedEmbedding:
    """:func:`keyed_embedding` for a compiled plan: also a plan recovered without the key
    (:mod:`ppvit.attacks.ciphertext_only`): how a server that broke the key starts where the key holder does."""
    mean, std = _norm(model, plan, mean, std)
    bmap = block_map(plan, patch_size(model))
    new_w, shift = _fold(model.patch_embed.proj.weight, bmap, mean, std)
    return _embedding(model, new_w, shift, bmap.sigma)


def _norm(
    model: nn.Module, plan: Plan, mean: tuple[float, ...] | None, std: tuple[float, ...] | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation to fold (the model's own by default), after checking the plan fits the model."""
    proj = model.patch_embed.proj
    side = input_size(model)
    if plan.shape != (side, side, proj.in_channels):
        raise ValueError(f"the plan is for {plan.shape} images, the model takes {(side, side, proj.in_channels)}")
    default_mean, default_std = normalization(model)
    mean, std = mean or default_mean, std or default_std
    if len(mean) != proj.in_channels or len(std) != proj.in_channels:
        raise ValueError(f"mean and std need {proj.in_channels} values (one per channel), got {mean} and {std}")
    return mean, std


def _embedding(model: nn.Module, new_w: torch.Tensor, shift: torch.Tensor, sigma: np.ndarray) -> KeyedEmbedding:
    """The new weight (float64), the bias moved by ``shift`` and the patch tokens' position embeddings
    taken from blocks ``sigma``, cast to the model's dtypes."""
    proj = model.patch_embed.proj
    pos = model.pos_embed
    if pos is not None:
        start = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        pos = pos.detach().double().clone()
        pos[:, start:] = pos[:, start:][:, torch.from_numpy(sigma)]
    bias = None
    if proj.bias is not None:
        bias = (proj.bias.detach().double() + shift).to(proj.bias.dtype)
    elif shift.any():
        if pos is None or not isinstance(model.patch_embed.norm, nn.Identity):
            raise ValueError(
                "the patch embedding has no bias and the normalisation offset cannot move into the position "
                "embeddings (none, or a norm in between); use a model with a patch-embedding bias"
            )
        pos[:, start:] += shift
    return KeyedEmbedding(
        new_w.to(proj.weight.dtype).contiguous(), bias, None if pos is None else pos.to(model.pos_embed.dtype)
    )


def transform_model(
    model: nn.Module,
    key: Key,
    scheme: str | Scheme,
    block_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    inverse: bool = False,
) -> nn.Module:
    """Make ``model`` (a timm ViT, changed in place and returned) exact on encrypted inputs.

    ``inverse=True`` undoes it: a model for encrypted inputs becomes one for plain inputs.
    See :func:`keyed_embedding` for the arguments.
    """
    return install_embedding(model, keyed_embedding(model, key, scheme, block_size, mean, std, inverse))


def install_embedding(model: nn.Module, emb: KeyedEmbedding) -> nn.Module:
    """Copy a :class:`KeyedEmbedding` into ``model`` (in place; returned)."""
    with torch.no_grad():
        model.patch_embed.proj.weight.copy_(emb.weight)
        if emb.bias is not None:
            model.patch_embed.proj.bias.copy_(emb.bias)
        if emb.pos_embed is not None:
            model.pos_embed.copy_(emb.pos_embed)
    return model


def transform_weights_file(
    model_name: str,
    weights: str | os.PathLike,
    out: str | os.PathLike,
    key: Key,
    scheme: str | Scheme,
    num_classes: int | None = None,
    block_size: int | None = None,
    inverse: bool = False,
    img_size: int | None = None,
) -> dict[str, str]:
    """Load a timm ViT from ``weights``, transform it, write it atomically to ``out`` (safetensors).

    The file's metadata (returned) names the scheme, block size, normalisation and the key's
    fingerprint, never the key, so the server can check it runs the matching pipeline.
    """
    check_weights_file(weights)  # a missing file named as such, before its header is read
    made = file_metadata(weights)  # a transform's own output: undone only with its key, never done twice
    if made.get("input") == ("plain" if inverse else "encrypted"):
        raise ValueError(f"weights file {weights}: already a model for {made['input']} images; nothing to do")
    if inverse and made.get("input") == "encrypted" and made.get("key_fingerprint") != key.fingerprint:
        raise ValueError(
            f"weights file {weights}: transformed with key {made.get('key_fingerprint')}, not this key "
            f"{key.fingerprint}: undoing it with another key gives a model that is right for no images"
        )
    head = tensor_shapes(Path(weights)).get("head.weight")
    if num_classes is not None and head is not None and head[0] != num_classes:  # a new head would be random
        raise ValueError(f"weights file {weights}: its head has {head[0]} classes, not {num_classes}")
    model = create_backbone(model_name, num_classes=num_classes, weights=weights, img_size=img_size)
    transform_model(model, key, scheme, block_size, inverse=inverse)
    mean, std = normalization(model)
    info = {
        "model": model_name,
        "scheme": str(Scheme.parse(scheme)),
        "block_size": str(patch_size(model)),
        "img_size": str(input_size(model)),
        "key_fingerprint": key.fingerprint,
        "input": "plain" if inverse else "encrypted",
        "mean": json.dumps(list(mean)),
        "std": json.dumps(list(std)),
    }
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(out, lambda tmp: save_file(state, str(tmp), metadata=info))
    return info
