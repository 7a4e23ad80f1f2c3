"""``ppvit audit``: every attack run against ppvit's real cipher and models, and what it trains to do so.

Block-wise perceptual encryption is a keyed rearrangement of pixel values, not semantic encryption.
The audit mounts what a server (or anyone holding ciphertexts, a few plain/encrypted pairs, or model
weights) can, so that the threat model (``docs/THREAT_MODEL.md``) states measured facts: per scheme,
the ciphertext statistics (:mod:`ppvit.attacks.ciphertext_stats`) and the known-plaintext attack
(:mod:`ppvit.attacks.known_plaintext`) on held-out images; weight matching
(:mod:`ppvit.attacks.weight_matching`) against trained adapters and while a run trains, and for a mixing
its embedding attack on the key holder's model. The one module
of the attacks that imports the training stack; ciphertext-only key recovery has its own audit
(:mod:`ppvit.attacks.ciphertext_only_audit`). Reports hold fractions and image metrics, never a key.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ppvit.attacks.block_mixing import BlockStats, audit_mixing
from ppvit.attacks.ciphertext_stats import block_mean_image, ciphertext_stats, jigsaw_neighbours, source_blocks
from ppvit.attacks.known_plaintext import known_plaintext_attack
from ppvit.attacks.metrics import plan_accuracy, psnr, upscale
from ppvit.attacks.report import Figures, check_out, write_report
from ppvit.attacks.weight_matching import (
    MapScore,
    embedding,
    embedding_leakage,
    embedding_leakage_transformed,
    true_map,
    weight_matching_attack,
)
from ppvit.crypto.ciphers import BlockCipher, Scheme
from ppvit.crypto.keys import Key
from ppvit.models.adapters import AdapterMeta, build_base, load_adapter, read_adapter_meta
from ppvit.models.backbones import create_backbone, input_size, patch_size
from ppvit.models.weights import WEIGHTS_ENV
from ppvit.train.config import TrainConfig
from ppvit.train.loop import train
from ppvit.train.runs import RunResult, adapter_and_weights, adapter_dir


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


def audit_scheme(
    key: Key, scheme: str, images: np.ndarray, cfg: AuditConfig, public: torch.nn.Module | None = None
) -> tuple[dict[str, Any], dict]:
    """Known-plaintext and ciphertext-only results for one scheme; images: NHWC uint8 at cfg.size.

    The first ``max(cfg.pairs)`` images are the attacker's pairs, the next ``cfg.images`` are
    held out: the recovered plan decrypts them and the PSNR says how well. A second, fresh key
    encrypts the held-out images too: the plan recovered for the first key, used on them,
    measures what a per-dataset key buys. For a mixing, with the ``public`` model, the key holder's
    model (``public`` made exact for the key) is attacked too, the pairs' plain images its prior.
    Returns the report and the figure's row (titled images).
    """
    p = cfg.block_size
    if Scheme.parse(scheme).mixing:  # a matrix, not a plan: attacks/block_mixing.py
        report, figure = audit_mixing(key, scheme, images, cfg.pairs, cfg.images, p)
        if public is not None:
            need = max(cfg.pairs)
            prior, held = BlockStats(p).add(images[:need]), images[need : need + cfg.images]
            score, guess = embedding_leakage_transformed(public, key, scheme, prior, held)
            report["key_transformed_model"] = {"model": public.pretrained_cfg.get("architecture"), **score}
            figure["the key holder's model"] = guess[0]
        return report, figure
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
    figure = {"plain": held[0], "encrypted": enc_held[0], "block means": block_mean_image(enc_held[:1], p)[0]}
    for n in cfg.pairs:
        guess = known_plaintext_attack(pairs[:n], enc_pairs[:n], scheme, p)
        decrypted = guess.inverse().apply_numpy(enc_held)
        report["kpa"].append(
            {"pairs": n, "plan_recovered": plan_accuracy(guess, truth), "held_out_psnr_db": psnr(held, decrypted)}
        )
        if n == cfg.pairs[0]:
            figure[f"known-plaintext, {n}"] = decrypted[0]
            other = BlockCipher(Key.generate(), scheme, p).encrypt(held)
            report["fresh_key_psnr_db"] = psnr(held, guess.inverse().apply_numpy(other))
    return report, figure


PUBLIC_MODEL = "vit_base_patch16_224"  # weight matching's public model when neither --model nor an adapter names one


def adapter_base_weights(run: str | os.PathLike, weights: str | os.PathLike | None = None) -> str | None:
    """The base weights file an adapter was trained on: ``weights`` if given, else the one its run
    recorded, else ``$PPVIT_WEIGHTS`` for an adapter trained on a local file (an adapter folder alone,
    a server's copy); :func:`~ppvit.models.adapters.build_base` checks its hash either way."""
    folder, found = adapter_and_weights(run, weights)
    local = os.environ.get(WEIGHTS_ENV)
    if found is None and local and read_adapter_meta(folder).weights_sha256 is not None:
        return local
    return found


def public_model(
    model: str | None, weights: str | os.PathLike | None, adapters: list[str]
) -> tuple[str, str | os.PathLike | None]:
    """The public model (and its weights) weight matching transforms with the key: ``model`` and
    ``weights`` as given, else those of the first adapter audited, else :data:`PUBLIC_MODEL`."""
    if model is None and adapters:
        return read_adapter_meta(adapter_dir(adapters[0])).model, adapter_base_weights(adapters[0], weights)
    return model or PUBLIC_MODEL, weights


def _trained_adapter(
    run: str | os.PathLike, key: Key, weights: str | os.PathLike | None
) -> tuple[AdapterMeta, torch.nn.Module, torch.nn.Module]:
    """An adapter trained on ``key``'s ciphertexts with its patch embedding trained: its record, the public
    model it started from and the trained model; refused in one line otherwise."""
    folder = adapter_dir(run)
    weights = adapter_base_weights(run, weights)
    meta = read_adapter_meta(folder)
    if meta.scheme in (None, "plain"):
        raise ValueError(f"adapter {folder}: trained on plain images; there is no key to leak")
    if meta.key_fingerprint is not None and meta.key_fingerprint != key.fingerprint:
        raise ValueError(f"adapter {folder}: trained with key {meta.key_fingerprint}, not {key.fingerprint}")
    public = build_base(meta, weights)
    model, _ = load_adapter(folder, weights)
    if torch.equal(public.patch_embed.proj.weight, model.patch_embed.proj.weight):
        raise ValueError(f"adapter {folder}: the patch embedding was not trained; nothing to match")
    return meta, public, model


def weight_leakage_adapter(run: str | os.PathLike, key: Key, weights: str | os.PathLike | None = None) -> MapScore:
    """Weight matching against the patch embedding of an adapter trained on encrypted images
    (``weights``: its base weights, found as :func:`adapter_base_weights` says when None)."""
    meta, public, model = _trained_adapter(run, key, weights)
    if Scheme.parse(meta.scheme).mixing:
        raise ValueError(
            f"adapter {adapter_dir(run)}: trained on {meta.scheme} ciphertext, a matrix with no permutation to "
            "match; adapter_leakage attacks it by its patch embedding"
        )
    guess = weight_matching_attack(embedding(public), embedding(model), model.num_prefix_tokens)
    return MapScore.of(guess, true_map(key, meta.scheme, meta.block_size, input_size(model)))


def adapter_leakage(
    run: str | os.PathLike, key: Key, images: np.ndarray, cfg: AuditConfig, weights: str | os.PathLike | None = None
) -> dict[str, Any]:
    """What a trained adapter's weights give away, as the report holds it: weight matching's shares for a
    plan's scheme; for a mixing's, the embedding attack (its trained patch embedding against the public
    one) on the audit's held-out ``images`` at the adapter's size, the pairs' plain images its prior."""
    scheme = read_adapter_meta(adapter_dir(run)).scheme
    if scheme in (None, "plain") or not Scheme.parse(scheme).mixing:
        return dataclasses.asdict(weight_leakage_adapter(run, key, weights))
    meta, public, model = _trained_adapter(run, key, weights)
    images = upscale(images, input_size(model), cfg.resize)
    need = max(cfg.pairs)
    prior, held = BlockStats(meta.block_size).add(images[:need]), images[need : need + cfg.images]
    score, _ = embedding_leakage(public, model, key, meta.scheme, prior, held)
    return score


def leakage_during_training(cfg: TrainConfig, every: int = 10) -> tuple[list[dict[str, Any]], RunResult]:
    """Train ``cfg`` (on encrypted images, with a key) and run weight matching every ``every``
    steps against the public model: how fast the permutation appears in the weights."""
    cfg = cfg.resolved()  # the scheme and block size as the run settles them (a key's pin, else the defaults)
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
            ref.update(embedding=embedding(public), truth=true_map(key, cfg.crypto.scheme, p, input_size(public)))
        if step == 1 or step % every == 0:
            guess = weight_matching_attack(ref["embedding"], embedding(model), model.num_prefix_tokens)
            curve.append({"step": step, **dataclasses.asdict(MapScore.of(guess, ref["truth"]))})

    result = train(cfg, on_step=watch)
    return curve, result


def run_audit(
    key: Key,
    images: np.ndarray,
    cfg: AuditConfig,
    out: str | os.PathLike | None = None,
    weights: dict[str, MapScore | dict[str, Any]] | None = None,
    leakage_during_training: dict[str, Any] | None = None,
    progress: bool = False,
    public: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Audit every scheme of ``cfg`` on ``images`` (NHWC uint8, any size; resized to cfg.size).

    ``weights`` and ``leakage_during_training`` are model attacks already run (weight matching's
    :class:`MapScore`, or :func:`adapter_leakage`'s dict); they join the report.
    ``public`` (the public model at ``cfg.size``): the key holder's model is attacked for each mixing.
    With ``out``, writes ``audit.json`` and ``audit.png`` there (:func:`ppvit.attacks.report.write_report`);
    one holding other files is refused first (:func:`~ppvit.attacks.report.check_out`).
    """
    if out is not None:
        check_out(out)
    images = upscale(images, cfg.size, cfg.resize)
    report: dict[str, Any] = {
        "size": cfg.size,
        "block_size": cfg.block_size,
        "resize": cfg.resize,
        "images_seen": len(images),
        "key_fingerprint": key.fingerprint,
        "key": cfg.key_source,
        "schemes": [],
        "weights": {k: dataclasses.asdict(v) if isinstance(v, MapScore) else v for k, v in (weights or {}).items()},
    }
    if leakage_during_training:
        report["leakage_during_training"] = leakage_during_training
    figures: Figures = {}
    for scheme in tqdm(cfg.schemes, desc="audit", unit="scheme", disable=not progress):
        rep, figures[scheme] = audit_scheme(key, scheme, images, cfg, public)
        report["schemes"].append(rep)
    if out is not None:
        write_report(report, figures, Path(out))
    return report
