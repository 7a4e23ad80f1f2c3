"""Weight matching: a key-transformed or encrypted-trained model gives the key's permutation away.

A server holds a model adapted to the key (:mod:`ppvit.models.transform`, or fine-tuned on encrypted
images); everyone holds the public pretrained model it started from. The server's patch embedding is
the public one with its input columns permuted (and scaled, signed), its position embeddings with
their rows permuted: matching columns and rows recovers the pixel and block permutations. Measured
for a key-transformed model here; for trained adapters and during training by :mod:`ppvit.attacks.audit`.

A dense mixing (``mix``, ``lift``) has no columns to match, but the same fact decrypts it: a
key-transformed patch embedding computes on a ciphertext block what the public one computes on the
plain block (:func:`embedding_decryptor`), so a model made exact for a key is as good as the key on
the part of a block its rows see, and public images fill in the rest.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ppvit.attacks.block_mixing import BlockStats, LinearDecryptor
from ppvit.attacks.metrics import assign, psnr, roughness, ssim, to_blocks
from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key
from ppvit.models.backbones import create_backbone, input_size, normalization, patch_size
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
    return BlockMap(block_moves(public, server, num_prefix_tokens), pi, np.zeros(len(pi), dtype=bool))


def block_moves(
    public: dict[str, torch.Tensor], server: dict[str, torch.Tensor], num_prefix_tokens: int = 1
) -> np.ndarray:
    """The block permutation ``sigma`` read from the position embeddings' rows alone (identity when they are
    equal or absent): a key-transformed model's ``pos'[b] = pos[sigma(b)]``, matched by centred cosine."""
    if "pos_embed" not in public:
        return np.arange(0)
    p0 = public["pos_embed"][0, num_prefix_tokens:].double().T
    if "pos_embed" not in server:
        return np.arange(p0.shape[1])
    p1 = server["pos_embed"][0, num_prefix_tokens:].double().T
    if torch.equal(p0, p1):
        return np.arange(p0.shape[1])
    return _match_by_cosine(p0 - p0.mean(1, keepdim=True), p1 - p1.mean(1, keepdim=True))


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


def public_backbone(
    model_name: str, weights: str | os.PathLike | None = None, img_size: int | None = None
) -> torch.nn.Module:
    """The public model an attacker holds: ``weights``, or a random initialisation of a fixed seed (what
    matters is that attacker and server hold the same one), without touching the global generator."""
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(0)
        return create_backbone(model_name, num_classes=0, weights=weights, img_size=img_size)


def weight_leakage_transformed(
    model_name: str, key: Key, scheme: str, block_size: int | None = None, weights: str | os.PathLike | None = None
) -> MapScore:
    """Weight matching against a key-transformed copy of the public model (``weights``, or
    a random initialisation: what matters is that the attacker has the same public model)."""
    public = public_backbone(model_name, weights)
    p = block_size or patch_size(public)
    ref = embedding(public)
    transform_model(public, key, scheme, p)
    guess = weight_matching_attack(ref, embedding(public), public.num_prefix_tokens)
    return MapScore.of(guess, true_map(key, scheme, p, input_size(public)))


def _affine_embedding(model: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """The patch embedding as ``z = P x + p0`` on a raw block ``x`` (0-255, row, column, channel order),
    the model's normalisation folded in: what it computes on one block, in float64."""
    proj = model.patch_embed.proj
    dim, c, p, _ = proj.weight.shape
    w = proj.weight.detach().double().permute(0, 2, 3, 1).reshape(dim, -1).numpy()
    mean, std = (np.asarray(v, dtype=np.float64)[np.arange(p * p * c) % c] for v in normalization(model))
    bias = np.zeros(dim) if proj.bias is None else proj.bias.detach().double().numpy()
    return w / (255.0 * std)[None, :], bias - w @ (mean / std)


def embedding_decryptor(
    public: torch.nn.Module, server: torch.nn.Module, prior: BlockStats, ridge: float = 1e-6
) -> LinearDecryptor:
    """Decrypt a within-block affine scheme (``shuffle``, ``mix``, ``lift`` ...) with a server's patch embedding.

    A key-transformed embedding computes on ciphertext ``y`` exactly what the public one computes on the
    plain block ``x``: ``K y + k0 = P x + p0 = z``. From ``z`` the attacker estimates ``x`` by linear least
    squares under the prior's block mean ``mu`` and covariance ``C`` (public images of the same kind):
    ``x = mu + C P^T (P C P^T + r I)^-1 (z - P mu - p0)``, ``r`` a ``ridge`` share of the mean eigenvalue.
    A model as wide as a block (ViT-B: 768 rows for 768 values) gives ``x`` exactly; a narrower one
    (ViT-Ti: 192) the part its rows see, the prior the rest. Blocks stay where the ciphertext has them.
    """
    return _decryptors(public, server, prior, (ridge,))[0]


def _decryptors(
    public: torch.nn.Module, server: torch.nn.Module, prior: BlockStats, ridges: tuple[float, ...]
) -> list[LinearDecryptor]:
    """:func:`embedding_decryptor` for each of ``ridges``, the embeddings and ``P C P^T`` computed once."""
    p_mat, p0 = _affine_embedding(public)
    k_mat, k0 = _affine_embedding(server)
    if p_mat.shape != k_mat.shape or p_mat.shape[1] != prior.mean.size:
        raise ValueError(f"patch embeddings {p_mat.shape} and {k_mat.shape} and prior blocks of {prior.mean.size}")
    mu, cov = prior.mean, prior.cov
    seen_by = cov @ p_mat.T
    seen = p_mat @ cov @ p_mat.T  # grouped as before the ridges were batched: the same bits
    trace, eye, residual = np.trace(seen), np.eye(len(seen)), k0 - p_mat @ mu - p0
    out = []
    for ridge in ridges:
        gain = seen_by @ np.linalg.inv(seen + ridge * trace / len(seen) * eye)
        out.append(LinearDecryptor(gain @ k_mat, mu + gain @ residual))
    return out


RIDGES = (1e-6, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)  # what choose_ridge tries: exact model ... far drifted


def _block_roughness(blocks: np.ndarray, p: int) -> float:
    """:func:`~ppvit.attacks.metrics.roughness` within blocks (rows of ``p*p*C`` values, row, column, channel)."""
    return roughness(blocks.reshape(-1, p, p, blocks.shape[-1] // (p * p)))


def choose_ridge(public: torch.nn.Module, server: torch.nn.Module, prior: BlockStats, cipher: np.ndarray) -> float:
    """The ridge of :func:`embedding_decryptor` whose decryptions of ``cipher`` (NHWC ciphertexts) are as
    rough within blocks as the prior's blocks, from :data:`RIDGES`: without the plain images.

    An exact key-transformed embedding wants almost none; one that training moved (``--key-init`` runs)
    adds its drift to ``P x``, which a small ridge amplifies into noise (measured: 12-20 dB at 1e-6, 31-36
    dB at 0.1-0.3, RESULTS.md); noise is rough, so the prior's roughness tells the two apart.
    """
    p = prior.p
    target = _block_roughness(np.concatenate(prior.sample), p)
    blocks = to_blocks(cipher, p).astype(np.float64)

    def gap(decryptor: LinearDecryptor) -> float:
        plain = np.clip(np.rint(blocks @ decryptor.matrix.T + decryptor.offset), 0, 255)
        return abs(_block_roughness(plain, p) - target)

    decryptors = dict(zip(RIDGES, _decryptors(public, server, prior, RIDGES), strict=True))
    return min(RIDGES, key=lambda ridge: gap(decryptors[ridge]))


def put_blocks_back(images: np.ndarray, sigma: np.ndarray, p: int) -> np.ndarray:
    """Undo a block permutation: block ``b`` of ``images`` goes to ``sigma[b]`` (a :class:`BlockMap`'s blocks)."""
    n, h, w, c = images.shape
    blocks = to_blocks(images, p)
    out = np.empty_like(blocks)
    out[:, sigma] = blocks
    return out.reshape(n, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(images.shape)


def embedding_leakage(
    public: torch.nn.Module, server: torch.nn.Module, key: Key, scheme: str, prior: BlockStats, held: np.ndarray
) -> tuple[dict[str, float], np.ndarray]:
    """A server's model against a within-block scheme: ``held`` (NHWC uint8 plain images, the model's
    input size when the scheme moves blocks) encrypted with ``key``, decrypted by
    :func:`embedding_decryptor` from the two patch embeddings and the ``prior``'s block statistics
    (public images) with the ridge :func:`choose_ridge` picks, blocks put back by weight matching's position
    rows (:func:`block_moves`). Returns their PSNR/SSIM against ``held`` (and the ridge), and the decrypted images."""
    p = prior.p
    cipher = BlockCipher(key, scheme, p).encrypt(held)
    ridge = choose_ridge(public, server, prior, cipher)
    guess = embedding_decryptor(public, server, prior, ridge).decrypt(cipher, p)
    sigma = block_moves(embedding(public), embedding(server), public.num_prefix_tokens)
    if not np.array_equal(sigma, np.arange(len(sigma))):
        if held.shape[1:3] != (input_size(public),) * 2:
            raise ValueError(f"the scheme moves blocks: images must be {input_size(public)} pixels, the model's size")
        guess = put_blocks_back(guess, sigma, p)
    return {"held_out_psnr_db": psnr(held, guess), "held_out_ssim": ssim(held, guess), "ridge": ridge}, guess


def embedding_leakage_transformed(
    public: torch.nn.Module, key: Key, scheme: str, prior: BlockStats, held: np.ndarray
) -> tuple[dict[str, float], np.ndarray]:
    """The key holder's model: :func:`embedding_leakage` of ``public`` made exact for ``key`` (a copy)."""
    server = transform_model(copy.deepcopy(public), key, scheme, prior.p)
    return embedding_leakage(public, server, key, scheme, prior, held)
