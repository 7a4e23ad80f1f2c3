"""The ``ppvit`` command: thin verbs that parse arguments and call the library.

Each verb is a parser function ``_add_<verb>(sub)`` that registers its arguments and sets
``func`` to one call into the library. Errors the user can fix (bad files, bad options)
are raised as ``UserError``/``ValueError`` subclasses and printed as one line, exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import yaml

from . import __version__, adapters, audit, dataset_io, key_recovery, methods, presets, preview
from .ciphers import BlockCipher, Scheme
from .commands_serve import add_client, add_serve
from .config import ALIASES, Setting, TrainConfig, settings
from .data import test_images
from .inference import evaluate_adapter, predict_files
from .keys import Key, KeyFileError
from .model_transform import transform_weights_file
from .runs import adapter_dir
from .sources import Columns
from .training import TrainingStopped, train


class UserError(Exception):
    """A problem with the user's input, printed as one line without a traceback."""


class Stopped(KeyboardInterrupt):
    """A SIGTERM, met like Ctrl-C: files being written are removed, finished ones kept."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """While the body runs, SIGTERM raises :class:`Stopped` (exit 143) instead of killing the process."""

    def stop(signum: int, frame: object) -> None:
        raise Stopped(signum)

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _keygen(args: argparse.Namespace) -> None:
    key = Key.generate()
    key.save(args.out)
    print(f"wrote key {args.out} (fingerprint {key.fingerprint}, mode 0600)")


def _add_keygen(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keygen", help="write a new secret key file (mode 0600)")
    p.add_argument("out", help="key file to create; an existing file is never overwritten")
    p.set_defaults(func=_keygen)


def add_setting_args(parser: argparse.ArgumentParser, items: Iterable[Setting]) -> None:
    """One flag per schema setting (``--patch-embed-lr-scale``), help from the schema.

    Defaults are None so that a YAML config or the schema's default applies when a flag is
    not given; bools become ``--flag/--no-flag``; old names stay as aliases (``--lora-targets``).
    """
    old = {new: old for old, new in ALIASES.items()}
    for item in items:
        flags = ["--" + n.replace("_", "-") for n in (item.name, old.get(item.name)) if n]
        help_ = f"{item.help} (default: {item.default})"
        if item.type is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            parser.add_argument(*flags, type=item.type, choices=item.choices, default=None, help=help_)


def _train_config(args: argparse.Namespace) -> TrainConfig:
    given = {s.name: getattr(args, s.name) for s in settings() if getattr(args, s.name, None) is not None}
    if args.quiet:
        given["quiet"] = True
    if args.config:
        return TrainConfig.load(args.config, **given)
    return TrainConfig.from_flat(**given)


def _train(args: argparse.Namespace) -> None:
    result = train(_train_config(args), resume=args.resume)
    print(json.dumps(dataclasses.asdict(result), indent=2))


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune a ViT on encrypted (or plain) images")
    p.add_argument("--config", help="YAML file of settings; flags override it")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_setting_args(p, (s for s in settings() if s.name != "quiet"))
    p.set_defaults(func=_train)


def _scheme_args(p: argparse.ArgumentParser, block_default: int | None = 16) -> None:
    p.add_argument("--key", required=True, help="key file (see `ppvit keygen`)")
    p.add_argument("--scheme", default="shuffle", help="steps joined by +, e.g. shuffle+scramble (default: shuffle)")
    p.add_argument("--block-size", type=int, default=block_default, help="block size; the ViT patch size (default 16)")


def _report(summary: dataset_io.Summary, verb: str, dst: str) -> int:
    print(f"{verb} {summary.written} images into {dst} ({summary.skipped} already there) in {summary.seconds:.1f} s")
    for rel, problem in summary.failed:
        print(f"  failed: {rel}: {problem}", file=sys.stderr)
    if summary.failed:
        print(f"{len(summary.failed)} images could not be read; the others were written", file=sys.stderr)
    return 1 if summary.failed else 0


def _encrypt(args: argparse.Namespace) -> int:
    cipher = BlockCipher(Key.load(args.key), args.scheme, args.block_size)
    with _stop_on_sigterm():
        summary = dataset_io.encrypt_collection(
            args.src,
            args.dst,
            cipher,
            size=args.size,
            fmt=args.format,
            workers=args.workers,
            progress=not args.quiet,
            columns=Columns(args.image_column, args.label_column),
            shard_size=args.shard_size,
        )
    return _report(summary, "encrypted", args.dst)


def _add_encrypt(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encrypt", help="encrypt images: ImageFolder tree or tar, HF dataset, WebDataset shards")
    p.add_argument(
        "src",
        help="folder tree (ImageFolder layout), single image, tar/tar.gz archive, Hugging Face dataset "
        "(save_to_disk folder or parquet file/folder), or WebDataset shards (.tar with KEY.jpg + KEY.cls, "
        "a folder of them, or a brace pattern such as 'shards/train-{000..009}.tar')",
    )
    p.add_argument("dst", help="output folder (created); the source layout is kept")
    _scheme_args(p)
    p.add_argument("--size", type=int, help="resize to SIZE x SIZE first (the model input size)")
    p.add_argument(
        "--format",
        default="png",
        type=lambda f: dataset_io.OLD_FORMATS.get(f, f),
        help="png (one file per image), npz (uint8 shards per split; npy is an old name for it) or wds "
        "(WebDataset tar shards of PNG + .cls per split, streamed by `ppvit train`)",
    )
    p.add_argument(
        "--shard-size",
        type=int,
        help=f"--format wds: images per shard (default {dataset_io.WDS_SHARD_SIZE})",
    )
    p.add_argument("--image-column", help="Hugging Face dataset: the image column (default: the Image feature)")
    p.add_argument("--label-column", help="Hugging Face dataset: the label column (default: the ClassLabel feature)")
    p.add_argument("--workers", type=int, default=1, help="processes to use")
    p.set_defaults(func=_encrypt)


def _decrypt(args: argparse.Namespace) -> int:
    with _stop_on_sigterm():
        summary = dataset_io.decrypt_collection(
            args.src, args.dst, Key.load(args.key), workers=args.workers, progress=not args.quiet
        )
    return _report(summary, "decrypted", args.dst)


def _add_decrypt(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("decrypt", help="decrypt a folder written by `ppvit encrypt` (the manifest says how)")
    p.add_argument("src", help="folder written by `ppvit encrypt`")
    p.add_argument("dst", help="output folder for the plain PNG images")
    p.add_argument("--key", required=True, help="the key it was encrypted with (checked by fingerprint)")
    p.add_argument("--workers", type=int, default=1, help="processes to use")
    p.set_defaults(func=_decrypt)


def _preview(args: argparse.Namespace) -> None:
    images = preview.sample_images(args.src, args.n, args.size, args.prefix)
    schemes = tuple(s for s in args.schemes.split(",") if s)
    path = preview.preview_grid(images, Key.load(args.key), schemes, args.block_size, args.out)
    print(f"wrote {path}")


def _add_preview(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preview", help="write a PNG grid of plain and encrypted examples per scheme")
    p.add_argument("src", help="folder, image or tar archive")
    p.add_argument("out", help="PNG file to write")
    p.add_argument("--key", required=True, help="key file")
    p.add_argument("--schemes", default=",".join(preview.PREVIEW_SCHEMES), help="comma-separated schemes")
    p.add_argument("--block-size", type=int, default=16, help="block size (default 16)")
    p.add_argument("--n", type=int, default=4, help="number of example images")
    p.add_argument("--size", type=int, default=224, help="resize to SIZE x SIZE (default 224)")
    p.add_argument("--prefix", default="", help="only images whose path starts with this, e.g. test/")
    p.set_defaults(func=_preview)


def _demo(args: argparse.Namespace) -> int:
    report = preview.encryption_demo(args.data, args.out, n=args.n)
    print("\n".join(report.lines()))
    return 0 if report.round_trip_exact and not report.failed else 1


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encrypt-demo", help="encrypt, decrypt and verify CIFAR-10 test images; write a preview")
    p.add_argument("--data", help="the CIFAR-10 copy (default $PPVIT_CIFAR10)")
    p.add_argument("--out", default="encrypt-demo-out", help="output folder (default encrypt-demo-out)")
    p.add_argument("--n", type=int, default=200, help="number of test images (default 200)")
    p.set_defaults(func=_demo)


def _params(args: argparse.Namespace) -> None:
    opts = {s.name: getattr(args, s.name) for s in _method_settings() if getattr(args, s.name) is not None}
    rows = methods.param_report(args.model, args.num_classes, args.img_size, **opts)
    full = next(r.trainable for r in rows if r.method == "full")
    print(f"{args.model}, {args.num_classes} classes (M = 10^6, 2^20 = the paper's unit)")
    print(f"{'method':<9} {'trainable':>12} {'M':>8} {'2^20':>8} {'% of full':>10} {'total':>12}")
    for r in rows:
        pct = 100 * r.trainable / full
        print(
            f"{r.method:<9} {r.trainable:>12,} {r.trainable / 1e6:>8.3f} {r.trainable_mib:>8.2f} {pct:>9.3f}% "
            f"{r.total:>12,}"
        )


def _add_params(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("params", help="trainable and total parameters per method")
    p.add_argument("--model", default="vit_base_patch16_224", help="timm ViT or ppvit small configuration")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the new head (default 10)")
    p.add_argument("--img-size", type=int, help="input side (default: the model's)")
    add_setting_args(p, _method_settings())
    p.set_defaults(func=_params)


def _method_settings() -> list[Setting]:
    """Every method's own settings (rank, alpha, targets, ...), each applied where a method has it."""
    return [s for s in settings(("method",)) if s.name != "method"]


def _merge(args: argparse.Namespace) -> None:
    if Path(args.out).exists() and not args.force:
        raise UserError(f"output {args.out}: exists; pass --force to replace it")
    adapters.merge_to_file(args.adapter, args.out, args.weights)
    print(f"wrote {args.out} (a plain timm state dict)")


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="fold an adapter into a plain timm model (safetensors)")
    p.add_argument("adapter", help="adapter folder (a run's adapter/)")
    p.add_argument("out", help="safetensors file to write")
    p.add_argument("--weights", help="the base weights file the adapter was trained on, if any")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.set_defaults(func=_merge)


def _eval(args: argparse.Namespace) -> None:
    key = Key.load(args.key) if args.key else None
    result = evaluate_adapter(adapter_dir(args.adapter), args.data, key, args.weights, subset=args.subset)
    print(json.dumps(result, indent=2))


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="test accuracy of a trained adapter (a run folder or its adapter/)")
    p.add_argument("adapter", help="run folder or adapter folder")
    p.add_argument(
        "--data", help="dataset with a test/ split: plain (encrypted here with --key) or `ppvit encrypt` output"
    )
    p.add_argument("--key", help="key file, to encrypt plain test images as the client would")
    p.add_argument("--weights", help="the base weights file, if the adapter was trained on one")
    p.add_argument("--subset", type=int, help="evaluate on this many test images only")
    p.set_defaults(func=_eval)


def _predict(args: argparse.Namespace) -> None:
    key = Key.load(args.key) if args.key else None
    for f, cls, prob in predict_files(adapter_dir(args.adapter), args.images, key, args.encrypted, args.weights):
        print(f"{f}\t{cls}\t{prob:.3f}")


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify image files with a trained adapter")
    p.add_argument("adapter", help="run folder or adapter folder")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--key", help="key file: plain images are resized and encrypted with it first")
    p.add_argument("--encrypted", action="store_true", help="the images are encrypted already (`ppvit encrypt`)")
    p.add_argument("--weights", help="the base weights file, if the adapter was trained on one")
    p.set_defaults(func=_predict)


def _transform_model(args: argparse.Namespace) -> None:
    if Path(args.out).exists() and not args.force:
        raise UserError(f"output {args.out}: exists; pass --force to replace it")
    key = Key.load(args.key)
    info = transform_weights_file(
        args.model,
        args.weights,
        args.out,
        key,
        args.scheme,
        args.num_classes,
        args.block_size,
        args.inverse,
        args.img_size,
    )
    print(
        f"wrote {args.out}: {args.model} for {info['input']} images (scheme {info['scheme']}, key {key.fingerprint},"
        f" normalisation mean {info['mean']} std {info['std']})"
    )


def _add_transform_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("transform-model", help="make a model trained on plain images exact on encrypted ones")
    p.add_argument("out", help="safetensors file to write (a timm state dict)")
    p.add_argument("--model", required=True, help="timm ViT name or ppvit small configuration")
    p.add_argument("--weights", required=True, help="the weights to transform (safetensors or PyTorch, timm keys)")
    p.add_argument("--num-classes", type=int, help="classes of the weights' head (default: as stored)")
    p.add_argument("--key", required=True, help="key file")
    p.add_argument(
        "--scheme", default="shuffle", help="absorbable steps: shuffle, scramble, negpos:pixel, channel:pixel"
    )
    p.add_argument("--block-size", type=int, help="must equal the patch size (the default)")
    p.add_argument("--img-size", type=int, help="input side (default: the model's; pos_embed resampled by timm)")
    p.add_argument("--inverse", action="store_true", help="undo: make a model for encrypted images work on plain ones")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.set_defaults(func=_transform_model)


def _parse_sets(items: Sequence[str]) -> dict:
    """``--set name=value`` pairs (values read as YAML: 8, 1e-3, true, none) checked against TrainConfig."""
    known = {s.name for s in settings()} | set(ALIASES)
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in known:
            raise UserError(f"--set {item!r}: expected NAME=VALUE with a `ppvit train` setting as NAME")
        out[name] = yaml.safe_load(value)
    return out


def _reproduce(args: argparse.Namespace) -> int:
    overrides = {k: getattr(args, k) for k in ("epochs", "train_subset", "test_subset", "img_size") if getattr(args, k)}
    overrides.update(_parse_sets(args.set))
    preset = _preset(args)
    preset.base.replace(**overrides)  # a bad setting fails here, not in every cell
    changes: dict = {"seeds": tuple(int(s) for s in args.seeds.split(","))} if args.seeds else {}
    if args.schemes:
        changes["schemes"] = tuple(args.schemes.split(","))
    preset = preset.select(tuple(args.methods.split(",")) if args.methods else None, **changes)
    out = args.out or f"reproduce-{args.preset}"
    table = presets.reproduce(
        preset, out, args.data, args.key, args.weights, args.pretrained, overrides, progress=not args.quiet
    )
    print(table.markdown())
    print(f"written: {out}/results.md, results.csv, results.json, results.png")
    return 1 if any(r.errors for r in table.rows) else 0


def _add_reproduce(sub: argparse._SubParsersAction) -> None:
    described = "; ".join(f"{p.name}: {p.help}" for p in presets.PRESETS.values())
    p = sub.add_parser("reproduce", help="the paper's comparison: methods x plain/encrypted", description=described)
    p.add_argument("--preset", choices=list(presets.PRESETS), default="demo", help="default: demo")
    p.add_argument("--out", help="folder for cells and tables (default reproduce-PRESET); reruns skip finished cells")
    p.add_argument("--data", help="CIFAR-10: local copy (default $PPVIT_CIFAR10) or cifar10 to download")
    p.add_argument("--key", help="key file (default: one made in the output folder)")
    p.add_argument("--weights", help="pretrained weights file (paper preset offline; skips pretraining for cpu)")
    p.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="download timm's ImageNet weights (paper preset default)",
    )
    p.add_argument("--seeds", help="comma-separated seeds instead of the preset's")
    _add_upstream_epochs(p)
    p.add_argument("--epochs", type=int, help="fine-tuning epochs instead of the preset's")
    p.add_argument("--train-subset", type=int, help="fine-tune on this many images (smoke runs)")
    p.add_argument("--test-subset", type=int, help="test on this many images (smoke runs)")
    p.add_argument("--img-size", type=int, help="input side instead of the preset's (a multiple of the patch size)")
    p.add_argument("--methods", help="comma-separated methods instead of the preset's (e.g. lora-pe)")
    p.add_argument("--schemes", help="comma-separated schemes instead of the preset's (none = plain images)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a `ppvit train` setting for every cell, e.g. --set rank=8 (ablations: use a new --out)",
    )
    p.set_defaults(func=_reproduce)


def _preset(args: argparse.Namespace) -> presets.Preset:
    """The named preset, with ``--upstream-epochs`` applied (a stronger upstream where time allows)."""
    preset = presets.PRESETS[args.preset]
    if args.upstream_epochs is None:
        return preset
    if preset.upstream is None:
        raise UserError(f"preset {preset.name} starts from ImageNet weights: --upstream-epochs does not apply")
    if args.upstream_epochs < 1:
        raise UserError(f"--upstream-epochs must be at least 1, got {args.upstream_epochs}")
    return dataclasses.replace(preset, upstream=dataclasses.replace(preset.upstream, epochs=args.upstream_epochs))


def _add_upstream_epochs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--upstream-epochs", type=int, help="pretraining epochs instead of the preset's (cached separately)")


def _pretrain(args: argparse.Namespace) -> int:
    preset = _preset(args)
    if preset.upstream is None:
        raise UserError(f"preset {preset.name} starts from ImageNet weights; nothing to pretrain here")
    weights, result = presets.pretrain(preset.model, preset.upstream, args.data, quiet=args.quiet)
    print(f"{weights}: {preset.model}, upstream test accuracy {result.test_acc:.2%}")
    return 0


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="train a preset's upstream model on plain images (cached; reruns resume)")
    p.add_argument("--preset", choices=[n for n, p in presets.PRESETS.items() if p.upstream], default="small-cpu")
    p.add_argument("--data", help="CIFAR-10: local copy (default $PPVIT_CIFAR10) or cifar10 to download")
    _add_upstream_epochs(p)
    p.set_defaults(func=_pretrain)


def _counts(text: str, flag: str) -> list[int]:
    """``"5,10,20"`` -> [5, 10, 20]; anything else is one clear error."""
    try:
        counts = [int(v) for v in text.split(",")]
        if not counts or min(counts) < 1:
            raise ValueError
    except ValueError:
        raise UserError(
            f"{flag}: expected comma-separated positive numbers of images (e.g. 5,10,20), got {text!r}"
        ) from None
    return counts


def _audit_ciphertext_only(args: argparse.Namespace) -> int:
    ns = _counts(args.ciphertext_only, "--ciphertext-only")
    if args.keys < 1:
        raise UserError(f"--keys: expected a positive number of keys, got {args.keys}")
    schemes = args.scheme or list(key_recovery.CIPHERTEXT_ONLY_SCHEMES)
    for scheme in schemes:
        Scheme.parse(scheme)  # a bad scheme fails before the slow part
    keys = [Key.load(args.key)] if args.key else [Key.generate() for _ in range(args.keys)]
    cfg = key_recovery.CiphertextOnlyConfig(
        size=args.size,
        block_size=args.block_size,
        resize=args.resize,
        images=args.images,
        key_source="given" if args.key else "fresh (made for this audit, not saved)",
    )
    images = test_images(args.data, max(ns) * len(keys) + cfg.images)  # own attack images per key
    report = key_recovery.ciphertext_only_audit(images, schemes, ns, keys, cfg, args.out)
    print(key_recovery.format_ciphertext_only(report))
    print(f"written: {args.out}/audit.json, ciphertext-only.png")
    return 0


def _audit(args: argparse.Namespace) -> int:
    if args.ciphertext_only is not None:
        return _audit_ciphertext_only(args)
    key = Key.load(args.key) if args.key else Key.generate()
    cfg = audit.AuditConfig(
        schemes=tuple(args.scheme or audit.AuditConfig.schemes),
        size=args.size,
        block_size=args.block_size,
        pairs=tuple(int(n) for n in args.pairs.split(",")),
        images=args.images,
        resize=args.resize,
        key_source="given" if args.key else "fresh (made for this audit, not saved)",
    )
    for scheme in cfg.schemes:
        Scheme.parse(scheme)  # a bad scheme fails before the slow part
    images = test_images(args.data, max(cfg.pairs) + cfg.images)
    weights = {}
    for scheme in cfg.schemes:
        if Scheme.parse(scheme).absorbable:
            weights[f"{scheme}, key-transformed {args.model}"] = audit.weight_leakage_transformed(
                args.model, key, scheme, cfg.block_size, args.weights
            )
    for run in args.adapter or []:
        weights[f"adapter {run}"] = audit.weight_leakage_adapter(run, key, args.weights)
    leakage = None
    if args.watch:
        watched = TrainConfig.load(args.watch, quiet=args.quiet)
        if watched.crypto.key is None or Key.load(watched.crypto.key).fingerprint != key.fingerprint:
            raise UserError(f"config {args.watch}: its run must encrypt with the audited key (--key)")
        curve, result = audit.leakage_during_training(watched, args.every)
        leakage = {"config": args.watch, "curve": curve, "test_acc": result.test_acc}
    report = audit.run_audit(key, images, cfg, args.out, weights, leakage)
    print(audit.format_report(report))
    print(f"written: {args.out}/audit.json, audit.png")
    return 0


def _add_audit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="attack the encryption and models: what leaks, measured (JSON + PNG)")
    p.add_argument("--key", help="key file to audit (default: a fresh key, never saved)")
    p.add_argument("--scheme", action="append", help="scheme to audit (repeat; default: four from weak to strong)")
    p.add_argument("--data", help="CIFAR-10: local copy (default $PPVIT_CIFAR10); test images are used")
    p.add_argument("--size", type=int, default=224, help="image side after resizing (default 224)")
    p.add_argument("--block-size", type=int, default=16, help="block size (default 16)")
    p.add_argument("--resize", choices=["bicubic", "nearest"], default="bicubic", help="nearest: flat regions")
    p.add_argument("--pairs", default="1,2,4,8", help="known plain/encrypted pair counts to try (default 1,2,4,8)")
    p.add_argument("--images", type=int, default=8, help="held-out images decrypted with the recovered key")
    p.add_argument("--model", default="vit_base_patch16_224", help="model for weight matching (default ViT-B/16)")
    p.add_argument("--weights", help="the public pretrained weights (default: random initialisation)")
    p.add_argument("--adapter", action="append", help="run folder of an adapter trained on encrypted images (repeat)")
    p.add_argument("--watch", metavar="CONFIG", help="train this run config and match weights as it trains")
    p.add_argument("--every", type=int, default=20, help="with --watch: match every N steps (default 20)")
    p.add_argument(
        "--ciphertext-only",
        metavar="N1,N2,...",
        help="instead: recover keys from N ciphertexts alone, per scheme (default shuffle, shuffle+scramble) and N",
    )
    p.add_argument(
        "--keys", type=int, default=3, help="with --ciphertext-only and no --key: fresh keys per N (default 3)"
    )
    p.add_argument("--out", default="audit-out", help="folder for audit.json and audit.png (default audit-out)")
    p.set_defaults(func=_audit)


PARSERS = [
    _add_keygen,
    _add_encrypt,
    _add_decrypt,
    _add_preview,
    _add_demo,
    _add_params,
    _add_train,
    _add_eval,
    _add_predict,
    _add_merge,
    _add_transform_model,
    _add_pretrain,
    _add_reproduce,
    _add_audit,
    add_serve,
    add_client,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppvit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ppvit {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in PARSERS:
        add(sub)
    return parser


RERUN = ("encrypt", "decrypt")  # verbs that continue where an interrupted run stopped


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        code = args.func(args)
    except (UserError, KeyFileError, ValueError, FileNotFoundError) as exc:
        print(f"ppvit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:  # a checkpoint was saved; the message says how to resume
        print(f"ppvit {args.command}: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except OSError as exc:  # the system's refusal (a full disk, a read-only folder): one line naming the file
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"ppvit {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM where a verb turns it into Stopped
        signum = getattr(exc, "signum", signal.SIGINT)
        again = " (finished files are kept: run the same command again to continue)" if args.command in RERUN else ""
        print(f"ppvit {args.command}: interrupted by {signal.Signals(signum).name}{again}", file=sys.stderr)
        return 128 + signum
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
