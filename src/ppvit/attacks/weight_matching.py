"""Weight matching: a key-transformed or encrypted-trained model gives the key's permutation away.

A server holds a model adapted to the key (:mod:`ppvit.models.transform`, or fine-tuned on encrypted
images); everyone holds the public pretrained model it started from. The server's patch embedding is
the public one with its input columns permuted (and scaled, signed), its position embeddings with
their rows permuted: matching columns and rows recovers the pixel and block permutations. Measured
for a key-transformed model here; for trained adapters and during training by :mod:`ppvit.attacks.audit`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ppvit.attacks.metrics import assign
from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key
from ppvit.models.backbones import create_backbone, input_size, patch_size
from ppvit.models.transform import BlockMap, block_map, transform_model


def _columns(weight: torch.Tensor) -> torch.Tensor:
    """Conv weight D x C x p x p -> D x (p*p*C) columns in (row, column, channel) order, centred."""
    w = weight.detach().double().permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    return w - w.mean(0, keepdim=True)


def _match_by_cosine(ref: torch.Tensor, other: torch.Tensor) -> np.ndarray:
    """For each column of ``other``, the column of ``ref`` it matches (|cosine|, assignment)."""
    a, b = F.normalize(ref, dim=0), F.normalize(other, dim=0)
    return assign((b.T @ a).abs().numpy())


def weight_matching_attack(
    public: dict[str, torch.Tensor], server: dict[str, torch.Tensor], num_prefix_tokens: int = 1
) -> BlockMap:
    """The block map guessed from a server's patch embedding against the public one.

    A key-transformed embedding is ``W'[:, i] = a_i W[:, pi(i)]`` and its position embeddings
    ``pos'[b] = pos[sigma(b)]`` (:mod:`ppvit.models.transform`); matching columns (scale- and
    sign-blind) and rows recovers ``pi`` and ``sigma``. Negation is not recovered (``inv`` false).
    """
    w0, w1 = public["patch_embed.proj.weight"], server["patch_embed.proj.weight"]
    pi = _match_by_cosine(_columns(w0), _columns(w1))
    sigma = None
    if "pos_embed" in public and "pos_embed" in server:
        p0 = public["pos_embed"][0, num_prefix_tokens:].double().T
        p1 = server["pos_embed"][0, num_prefix_tokens:].double().T
        if not torch.equal(p0, p1):
            sigma = _match_by_cosine(p0 - p0.mean(1, keepdim=True), p1 - p1.mean(1, keepdim=True))
    if sigma is None:
        sigma = np.arange(public["pos_embed"].shape[1] - num_prefix_tokens if "pos_embed" in public else 0)
    return BlockMap(sigma, pi, np.zeros(len(pi), dtype=bool))


@dataclass(frozen=True)
class MapScore:
    """How much of a key's block map a guess recovered (fractions in [0, 1])."""

    pixel_permutation: float
    block_permutation: float | None  # None when the scheme does not move blocks

    @classmethod
    def of(cls, guess: BlockMap, truth: BlockMap) -> MapScore:
        moves_blocks = not np.array_equal(truth.sigma, np.arange(len(truth.sigma)))
        return cls(
            float((guess.pi == truth.pi).mean()),
            float((guess.sigma == truth.sigma).mean()) if moves_blocks else None,
        )


def true_map(key: Key, scheme: str, block_size: int, size: int) -> BlockMap:
    """The block map a key and scheme make at ``size x size``: what a guess is scored against."""
    return block_map(BlockCipher(key, scheme, block_size).plan(size, size), block_size)


def embedding(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors :func:`weight_matching_attack` reads, detached copies."""
    out = {"patch_embed.proj.weight": model.patch_embed.proj.weight.detach().clone()}
    if getattr(model, "pos_embed", None) is not None:
        out["pos_embed"] = model.pos_embed.detach().clone()
    return out


def weight_leakage_transformed(
    model_name: str, key: Key, scheme: str, block_size: int | None = None, weights: str | os.PathLike | None = None
) -> MapScore:
    """Weight matching against a key-transformed copy of the public model (``weights``, or
    a random initialisation: what matters is that the attacker has the same public model)."""
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(0)
        public = create_backbone(model_name, num_classes=0, weights=weights)
    p = block_size or patch_size(public)
    ref = embedding(public)
    transform_model(public, key, scheme, p)
    guess = weight_matching_attack(ref, embedding(public), public.num_prefix_tokens)
    return MapScore.of(guess, true_map(key, scheme, p, input_size(public)))
