"""Attacks on ppvit's own encryption and models: what block-wise encryption leaks, measured.

Block-wise perceptual encryption is a keyed rearrangement of pixel values, not semantic
encryption. This module runs the attacks a server (or anyone holding ciphertexts, a few
plain/encrypted pairs, or model weights) can mount, against ppvit's real cipher and
models, so that the threat model (``docs/THREAT_MODEL.md``) states measured facts:

* :func:`known_plaintext_attack`: from N plain/encrypted pairs under one key, recover the
  whole encryption plan (block positions, the within-block map, negated values), so that
  any other image encrypted with that key can be decrypted. Blocks are matched by the
  multiset of their values (every step keeps it, up to ``negpos``'s ``v -> max - v``), then
  the within-block map by counting, over all pairs and blocks that share it, where an
  encrypted value equals a plain one; an assignment solver picks the best permutation.
* :func:`weight_matching_attack`: from the public pretrained patch embedding and the one a
  server holds (a key-transformed model, or one fine-tuned on encrypted images), recover
  the pixel permutation by matching the embedding's input columns (and the block
  permutation by matching position embeddings).
* :func:`ciphertext_stats`: PSNR and SSIM between plain and encrypted images, and what
  survives without any key: block means (a thumbnail of the image), blocks' value
  histograms, blocks readable verbatim.

Recovered keys are never printed or saved: reports hold only fractions and image metrics.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from scipy.optimize import linear_sum_assignment
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ppvit._io import atomic_write, atomic_write_text
from ppvit.crypto.ciphers import BlockCipher, Plan, Scheme
from ppvit.crypto.keys import Key
from ppvit.models.adapters import build_base, load_adapter, read_adapter_meta
from ppvit.models.backbones import create_backbone, input_size, patch_size
from ppvit.models.transform import BlockMap, block_map, transform_model
from ppvit.train.config import TrainConfig
from ppvit.train.loop import train
from ppvit.train.runs import RunResult, adapter_dir

# -- image layout helpers -----------------------------------------------------------------------


def to_blocks(images: np.ndarray, p: int) -> np.ndarray:
    """NHWC -> (N, blocks, p*p*C), blocks row-major, values in (row, column, channel) order."""
    n, h, w, c = images.shape
    return images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, -1, p * p * c)


def _positions(shape: tuple[int, int, int], p: int) -> np.ndarray:
    """(blocks, p*p*C): the flat HWC index of each value of each block."""
    return to_blocks(np.arange(math.prod(shape)).reshape(1, *shape), p)[0]


def plan_from_maps(shape: tuple[int, int, int], p: int, sigma: np.ndarray, pi: np.ndarray, inv: np.ndarray) -> Plan:
    """The plan whose output block b takes block ``sigma[b]``, value i from value ``pi[b, i]``
    (negated where ``inv[b, i]``); ``pi`` and ``inv`` may be one row shared by all blocks."""
    pos = _positions(shape, p)
    pi, inv = np.broadcast_to(pi, pos.shape), np.broadcast_to(inv, pos.shape)
    index = np.empty(pos.size, dtype=np.int64)
    index[pos] = pos[sigma[:, None], pi]
    invert = np.zeros(pos.size, dtype=bool)
    invert[pos] = inv
    return Plan(shape, index, invert if invert.any() else None)


def plan_accuracy(guess: Plan, truth: Plan) -> float:
    """Share of encrypted values whose source (and negation) the guess gets right."""
    ok = guess.index == truth.index
    gi = np.zeros_like(ok) if guess.invert is None else guess.invert
    ti = np.zeros_like(ok) if truth.invert is None else truth.invert
    return float((ok & (gi == ti)).mean())


# -- image quality --------------------------------------------------------------------------------


def psnr(a: np.ndarray, b: np.ndarray, max_value: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB over whole arrays (inf when equal): scikit-image's."""
    if np.array_equal(a, b):
        return math.inf
    return float(peak_signal_noise_ratio(np.asarray(a, np.float64), np.asarray(b, np.float64), data_range=max_value))


def ssim(a: np.ndarray, b: np.ndarray, max_value: float = 255.0) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03), per channel,
    over NHWC or HWC arrays at least 11 pixels wide: scikit-image's, averaged over the images."""
    x = np.asarray(a, np.float64).reshape(-1, *a.shape[-3:])
    y = np.asarray(b, np.float64).reshape(-1, *b.shape[-3:])
    per_image = [
        structural_similarity(
            xi, yi, data_range=max_value, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        for xi, yi in zip(x, y, strict=True)
    ]
    return float(np.mean(per_image))


# -- attack 1: known plaintext ------------------------------------------------------------------


def _assign(score: torch.Tensor) -> np.ndarray:
    """The permutation maximising the summed score (rows -> columns)."""
    rows, cols = linear_sum_assignment(score.double().numpy(), maximize=True)
    out = np.empty(len(rows), dtype=np.int64)
    out[rows] = cols
    return out


def match_blocks(plain: np.ndarray, enc: np.ndarray, p: int, max_value: int = 255) -> np.ndarray:
    """sigma: encrypted block b holds plain block sigma[b], by the multiset of its values.

    Every ppvit step keeps a block's multiset of values except ``negpos`` (``v -> max - v``),
    so values are folded to ``min(v, max - v)`` first; the cost is the L1 distance between
    sorted folded values, summed over the pairs.
    """

    def signature(x: np.ndarray) -> torch.Tensor:
        v = to_blocks(x, p).astype(np.int16)
        v = np.minimum(v, max_value - v)
        return torch.from_numpy(np.sort(v, axis=-1).transpose(1, 0, 2).reshape(v.shape[1], -1).astype(np.float32))

    cost = torch.cdist(signature(enc), signature(plain), p=1)
    return _assign(-cost)


def match_values(
    plain_blocks: np.ndarray, enc_blocks: np.ndarray, max_value: int = 255
) -> tuple[np.ndarray, np.ndarray]:
    """The within-block map shared by all given blocks: (pi, inv) from aligned (M, L) arrays.

    ``score[i, j]`` counts the blocks where encrypted value i equals plain value j (or its
    negation, for ``inv``); ties (flat regions) leave the assignment partly arbitrary.
    """
    e = torch.from_numpy(enc_blocks.astype(np.int16))
    pl = torch.from_numpy(plain_blocks.astype(np.int16))
    same, flipped = _count_equal(e, pl), _count_equal(e, max_value - pl)
    pi = _assign(torch.maximum(same, flipped))
    rows = np.arange(len(pi))
    inv = (flipped[rows, pi] > same[rows, pi]).numpy()
    return pi, inv


def _count_equal(e: torch.Tensor, pl: torch.Tensor) -> torch.Tensor:
    """``out[i, j]`` = number of rows m with ``e[m, i] == pl[m, j]``, in bounded memory."""
    m, length = e.shape
    if m * length * length <= 50_000_000:
        return (e[:, :, None] == pl[:, None, :]).sum(0)
    return torch.stack([(e[:, i : i + 1] == pl).sum(0) for i in range(length)])


def known_plaintext_attack(plain: np.ndarray, enc: np.ndarray, scheme: str | Scheme, block_size: int) -> Plan:
    """The plan recovered from N plain/encrypted NHWC uint8 pairs (the scheme is public).

    Schemes that make the same within-block choice everywhere (``Scheme.absorbable``) pool
    the evidence of every block of every pair; per-block schemes (``rotate``, ``:block``
    modes) recover each block's map from its N pairs alone.
    """
    scheme, p = Scheme.parse(scheme), block_size
    if plain.shape != enc.shape or plain.dtype != np.uint8:
        raise ValueError(f"plain and encrypted images must be uint8 of one shape, got {plain.shape} / {enc.shape}")
    sigma = match_blocks(plain, enc, p) if any(s.name == "scramble" for s in scheme.steps) else None
    pb, eb = to_blocks(plain, p), to_blocks(enc, p)
    n = pb.shape[1]
    sigma = np.arange(n) if sigma is None else sigma
    pb = pb[:, sigma]  # aligned: row b of pb is the plain source of encrypted block b
    if scheme.absorbable:
        pi, inv = match_values(pb.reshape(-1, pb.shape[-1]), eb.reshape(-1, eb.shape[-1]))
    else:
        maps = [match_values(pb[:, b], eb[:, b]) for b in range(n)]
        pi, inv = np.stack([m[0] for m in maps]), np.stack([m[1] for m in maps])
    return plan_from_maps(plain.shape[1:], p, sigma, pi, inv)


# -- attack 2: key leakage from weights -----------------------------------------------------------


def _columns(weight: torch.Tensor) -> torch.Tensor:
    """Conv weight D x C x p x p -> D x (p*p*C) columns in (row, column, channel) order, centred."""
    w = weight.detach().double().permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    return w - w.mean(0, keepdim=True)


def _match_by_cosine(ref: torch.Tensor, other: torch.Tensor) -> np.ndarray:
    """For each column of ``other``, the column of ``ref`` it matches (|cosine|, assignment)."""
    a, b = F.normalize(ref, dim=0), F.normalize(other, dim=0)
    return _assign((b.T @ a).abs())


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


# -- ciphertext only ---------------------------------------------------------------------------------


def block_mean_image(images: np.ndarray, p: int) -> np.ndarray:
    """Each block replaced by the mean of all its values (grey): a 1/p thumbnail of the
    image's brightness, which pixel shuffling (even across colour channels) keeps exactly."""
    n, h, w, c = images.shape
    m = images.reshape(n, h // p, p, w // p, p * c).astype(np.float64).mean(axis=(2, 4), keepdims=True)
    return np.broadcast_to(m[..., None], (n, h // p, p, w // p, p, c)).reshape(images.shape).round().astype(np.uint8)


def ciphertext_stats(plain: np.ndarray, enc: np.ndarray, p: int) -> dict[str, float]:
    """What an eavesdropper sees without a key, per image set (NHWC uint8)."""
    pb, eb = to_blocks(plain, p), to_blocks(enc, p)
    sp, se = np.sort(pb, axis=-1), np.sort(eb, axis=-1)

    def found(enc_blocks: np.ndarray, plain_blocks: np.ndarray) -> float:
        """Share of encrypted blocks equal to some plain block of the same image."""
        have = [{r.tobytes() for r in img} for img in plain_blocks]
        return float(np.mean([[r.tobytes() in have[k] for r in img] for k, img in enumerate(enc_blocks)]))

    return {
        "psnr_db": psnr(plain, enc),
        "ssim": ssim(plain, enc),
        # the brightness thumbnail read off the ciphertext against the plain image's own (inf: exact)
        "thumbnail_psnr_db": psnr(block_mean_image(plain, p), block_mean_image(enc, p)),
        # a block's value histogram kept (shuffling, rotation, channel order keep it)
        "block_histograms_kept": found(se, sp),
        # a block readable as it is (block scrambling alone)
        "blocks_verbatim": found(eb, pb),
    }


def source_blocks(plan: Plan, p: int) -> np.ndarray:
    """For each encrypted block position, the plain block its values come from."""
    _, w, c = plan.shape
    first = _positions(plan.shape, p)[:, 0]  # one value of each output block suffices
    row, col = plan.index[first] // (w * c), plan.index[first] // c % w
    return (row // p) * (w // p) + col // p


def jigsaw_neighbours(enc: np.ndarray, p: int, sigma: np.ndarray) -> float:
    """Ciphertext only: the share of the plain image's left-right and top-bottom block
    neighbours found among the encrypted blocks by edge similarity.

    Every image under one key is scrambled the same way, so an eavesdropper adds up the
    edge mismatches of each pair of block positions over all the images it sees, then pairs
    each position with its best right (bottom) neighbour, one-to-one. ``sigma[b]`` is the
    plain block at encrypted position b (the truth, for scoring only). Near 1: the block
    order is recoverable, hence the images; near 1/blocks: nothing to go on.
    """
    n, h, w, c = enc.shape
    gh, gw = h // p, w // p
    blocks = torch.from_numpy(enc).double().reshape(n, gh, p, gw, p, c).permute(1, 3, 0, 2, 4, 5)
    blocks = blocks.reshape(gh * gw, n, p, p, c)
    at = np.argsort(sigma)  # at[a]: the encrypted position of plain block a
    grid = np.arange(gh * gw).reshape(gh, gw)
    found = []
    for first, second, pairs in (
        (blocks[:, :, :, -1], blocks[:, :, :, 0], (grid[:, :-1], grid[:, 1:])),  # right edge, left edge
        (blocks[:, :, -1], blocks[:, :, 0], (grid[:-1], grid[1:])),  # bottom edge, top edge
    ):
        cost = torch.cdist(first.reshape(gh * gw, -1), second.reshape(gh * gw, -1))
        cost.fill_diagonal_(cost.max() + 1)  # a block is not its own neighbour
        nxt = _assign(-cost)
        found.append(nxt[at[pairs[0].ravel()]] == at[pairs[1].ravel()])
    return float(np.concatenate(found).mean())


# -- the audit ---------------------------------------------------------------------------------------


@dataclass
class AuditConfig:
    """What ``ppvit audit`` measures."""

    schemes: tuple[str, ...] = ("shuffle", "scramble", "shuffle+scramble", "shuffle+scramble+rotate+negpos+channel")
    size: int = 224
    block_size: int = 16
    pairs: tuple[int, ...] = (1, 2, 4, 8)
    images: int = 8  # held-out images decrypted with the recovered plan, and ciphertext-only stats
    resize: str = "bicubic"  # how 32x32 CIFAR images reach ``size``: bicubic (smooth) or nearest (flat regions)
    key_source: str = "given"  # recorded in the report: "given", or a fresh key made for the audit


def upscale(images: np.ndarray, size: int, mode: str) -> np.ndarray:
    """NHWC uint8 to size x size, as the training pipeline does (bicubic) or by replication."""
    if images.shape[1] == size:
        return images
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    kw = {"align_corners": False} if mode == "bicubic" else {}
    x = F.interpolate(x, size=(size, size), mode=mode, **kw).round().clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def audit_scheme(key: Key, scheme: str, images: np.ndarray, cfg: AuditConfig) -> tuple[dict[str, Any], dict]:
    """Known-plaintext and ciphertext-only results for one scheme; images: NHWC uint8 at cfg.size.

    The first ``max(cfg.pairs)`` images are the attacker's pairs, the next ``cfg.images`` are
    held out: the recovered plan decrypts them and the PSNR says how well. A second, fresh key
    encrypts the held-out images too: the plan recovered for the first key, used on them,
    measures what a per-dataset key buys. Returns the report and images for the figure.
    """
    p = cfg.block_size
    cipher = BlockCipher(key, scheme, p)
    truth = cipher.plan(*images.shape[1:])
    need = max(cfg.pairs)
    pairs, held = images[:need], images[need : need + cfg.images]
    if len(held) == 0:
        raise ValueError(f"need more than {need} images (pairs plus held-out ones), got {len(images)}")
    enc_pairs, enc_held = cipher.encrypt(pairs), cipher.encrypt(held)
    stats = ciphertext_stats(held, enc_held, p)
    stats["jigsaw_neighbours"] = jigsaw_neighbours(cipher.encrypt(images), p, source_blocks(truth, p))
    report: dict[str, Any] = {"scheme": scheme, "ciphertext_only": stats, "kpa": []}
    figure = {"plain": held[0], "encrypted": enc_held[0], "block_means": block_mean_image(enc_held[:1], p)[0]}
    for n in cfg.pairs:
        guess = known_plaintext_attack(pairs[:n], enc_pairs[:n], scheme, p)
        decrypted = guess.inverse().apply_numpy(enc_held)
        report["kpa"].append(
            {"pairs": n, "plan_recovered": plan_accuracy(guess, truth), "held_out_psnr_db": psnr(held, decrypted)}
        )
        if n == cfg.pairs[0]:
            figure[f"kpa_{n}"] = decrypted[0]
            other = BlockCipher(Key.generate(), scheme, p).encrypt(held)
            report["fresh_key_psnr_db"] = psnr(held, guess.inverse().apply_numpy(other))
    return report, figure


def _true_map(key: Key, scheme: str, block_size: int, size: int) -> BlockMap:
    return block_map(BlockCipher(key, scheme, block_size).plan(size, size), block_size)


def _embedding(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors the weight-matching attack reads, detached copies."""
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
    ref = _embedding(public)
    transform_model(public, key, scheme, p)
    guess = weight_matching_attack(ref, _embedding(public), public.num_prefix_tokens)
    return MapScore.of(guess, _true_map(key, scheme, p, input_size(public)))


def weight_leakage_adapter(run: str | os.PathLike, key: Key, weights: str | os.PathLike | None = None) -> MapScore:
    """Weight matching against the patch embedding of an adapter trained on encrypted images."""
    folder = adapter_dir(run)
    meta = read_adapter_meta(folder)
    if meta.scheme in (None, "plain"):
        raise ValueError(f"adapter {folder}: trained on plain images; there is no key to leak")
    if meta.key_fingerprint is not None and meta.key_fingerprint != key.fingerprint:
        raise ValueError(f"adapter {folder}: trained with key {meta.key_fingerprint}, not {key.fingerprint}")
    public = _embedding(build_base(meta, weights))
    model, _ = load_adapter(folder, weights)
    if torch.equal(public["patch_embed.proj.weight"], model.patch_embed.proj.weight):
        raise ValueError(f"adapter {folder}: the patch embedding was not trained; nothing to match")
    guess = weight_matching_attack(public, _embedding(model), model.num_prefix_tokens)
    return MapScore.of(guess, _true_map(key, meta.scheme, meta.block_size, input_size(model)))


def leakage_during_training(cfg: TrainConfig, every: int = 10) -> tuple[list[dict[str, Any]], RunResult]:
    """Train ``cfg`` (on encrypted images, with a key) and run weight matching every ``every``
    steps against the public model: how fast the permutation appears in the weights."""
    if not cfg.crypto.encrypted or cfg.crypto.key is None:
        raise ValueError("leakage_during_training needs an encrypting run: a scheme and --key")
    key = Key.load(cfg.crypto.key)
    b = cfg.backbone
    curve: list[dict[str, Any]] = []
    ref: dict[str, Any] = {}

    def watch(step: int, model: torch.nn.Module) -> None:
        if not ref:  # the public model build_model started from (same seed and head size)
            with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
                torch.manual_seed(cfg.run.seed)
                public = create_backbone(
                    b.model,
                    num_classes=model.num_classes,
                    pretrained=b.pretrained,
                    weights=b.weights,
                    img_size=b.img_size,
                )
            p = cfg.crypto.block_size or patch_size(public)
            ref.update(embedding=_embedding(public), truth=_true_map(key, cfg.crypto.scheme, p, input_size(public)))
        if step == 1 or step % every == 0:
            guess = weight_matching_attack(ref["embedding"], _embedding(model), model.num_prefix_tokens)
            curve.append({"step": step, **dataclasses.asdict(MapScore.of(guess, ref["truth"]))})

    result = train(cfg, on_step=watch)
    return curve, result


def write_report(report: dict[str, Any], figures: dict[str, dict], out: Path) -> None:
    """audit.json and audit.png (plain, encrypted, block means, known-plaintext decryption per scheme)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "audit.json", json.dumps(report, indent=2, default=_jsonable) + "\n")
    rows = list(figures.items())
    cols = max(len(f) for _, f in rows)
    fig = Figure(figsize=(2.2 * cols, 2.4 * len(rows)))  # not pyplot: no global backend touched
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (scheme, figs) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(figs):
                name, img = list(figs.items())[c]
                ax.imshow(img)
                label = "\n" + scheme.replace("+", "+\n") if c == 0 else ""  # long schemes: one step a line
                ax.set_title(name.replace("_", " ").replace("kpa", "known-plaintext,") + label, fontsize=9)
    fig.tight_layout()
    atomic_write(out / "audit.png", lambda tmp: fig.savefig(tmp, format="png", dpi=80))


def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    raise TypeError(type(x))


def format_report(report: dict[str, Any]) -> str:
    """The printed summary: one block per scheme, then the weight-matching results."""
    lines = [
        f"audit at {report['size']}x{report['size']}, {report['block_size']}x{report['block_size']} blocks, "
        f"{report['resize']} resize, key {report['key_fingerprint']}"
    ]
    for s in report["schemes"]:
        co = s["ciphertext_only"]
        lines.append(f"\n{s['scheme']}")
        lines.append(
            f"  ciphertext only: PSNR {co['psnr_db']:.1f} dB, SSIM {co['ssim']:.3f}; brightness thumbnail "
            f"PSNR {co['thumbnail_psnr_db']:.1f} dB; block histograms kept {co['block_histograms_kept']:.0%}, "
            f"blocks verbatim {co['blocks_verbatim']:.0%}; jigsaw (edge similarity over {report['images_seen']} "
            f"ciphertexts) finds {co['jigsaw_neighbours']:.0%} of block neighbours"
        )
        for k in s["kpa"]:
            lines.append(
                f"  known plaintext, {k['pairs']} pair(s): {k['plan_recovered']:.1%} of the plan recovered, "
                f"held-out images decrypted at {k['held_out_psnr_db']:.1f} dB"
            )
        lines.append(f"  the same attack on a fresh key's images: {s['fresh_key_psnr_db']:.1f} dB")
    watched = report.get("leakage_during_training")
    if watched:
        steps = ", ".join(f"{c['step']}: {c['pixel_permutation']:.0%}" for c in watched["curve"])
        lines.append(f"\nweight matching while training {watched['config']} (step: pixels recovered): {steps}")
    for name, score in report.get("weights", {}).items():
        b = score["block_permutation"]
        lines.append(
            f"\nweight matching, {name}: pixel permutation {score['pixel_permutation']:.1%}"
            + ("" if b is None else f", block permutation {b:.1%}")
        )
    return "\n".join(lines)


def run_audit(
    key: Key,
    images: np.ndarray,
    cfg: AuditConfig,
    out: str | os.PathLike | None = None,
    weights: dict[str, MapScore] | None = None,
    leakage_during_training: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Audit every scheme of ``cfg`` on ``images`` (NHWC uint8, any size; upscaled to cfg.size).

    ``weights`` and ``leakage_during_training`` are model attacks already run; they join the report.
    """
    images = upscale(images, cfg.size, cfg.resize)
    report: dict[str, Any] = {
        "size": cfg.size,
        "block_size": cfg.block_size,
        "resize": cfg.resize,
        "images_seen": len(images),
        "key_fingerprint": key.fingerprint,
        "key": cfg.key_source,
        "schemes": [],
        "weights": {k: dataclasses.asdict(v) for k, v in (weights or {}).items()},
    }
    if leakage_during_training:
        report["leakage_during_training"] = leakage_during_training
    figures = {}
    for scheme in cfg.schemes:
        rep, fig = audit_scheme(key, scheme, images, cfg)
        report["schemes"].append(rep)
        figures[scheme] = fig
    if out is not None:
        write_report(report, figures, Path(out))
    return report
