"""Experiments: ``reproduce`` (the paper's table), ``pretrain``, ``audit`` (the attacks)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

import yaml

from ppvit.cli.common import UserError, add_splits_arg, counts
from ppvit.crypto.keys import Key
from ppvit.experiments import presets
from ppvit.train.config import ALIASES, Setting, TrainConfig, settings


def _typed(setting: Setting, value: str, item: str) -> object:
    """A ``--set`` value as its setting's type: none (or null) is None; a word setting takes the word as
    written (YAML would read ``precision=no`` as false, ``1e-3`` as a string)."""
    if value.lower() in ("none", "null", "~"):
        return None
    try:
        if setting.type is bool:
            parsed = yaml.safe_load(value)
            if not isinstance(parsed, bool):
                raise ValueError
            return parsed
        return setting.type(value)
    except ValueError:
        raise UserError(f"--set {item!r}: {setting.name} takes {setting.type.__name__} values") from None


def _parse_sets(items: Sequence[str]) -> dict:
    """``--set name=value`` pairs, each checked against TrainConfig's settings and read as its type."""
    known = {s.name: s for s in settings()}
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = ALIASES.get(name.strip().replace("-", "_"), name.strip().replace("-", "_"))
        if not sep or name not in known:
            raise UserError(f"--set {item!r}: expected NAME=VALUE with a `ppvit train` setting as NAME")
        out[name] = _typed(known[name], value.strip(), item)
    return out


def _reproduce(args: argparse.Namespace) -> int:
    given = ("epochs", "train_subset", "test_subset", "img_size", "splits")
    overrides = {k: getattr(args, k) for k in given if getattr(args, k)}
    overrides.update(_parse_sets(args.set))
    if args.minutes is not None and args.minutes < 0:
        raise UserError(f"--minutes must be 0 (no budget) or more, got {args.minutes:g}")
    preset = _preset(args)
    checked = preset.base.replace(**overrides)  # a bad setting fails here, not in every cell
    if checked.data.splits is not None:  # and so does a split the source lacks
        from ppvit.data.datasets import resolve_data
        from ppvit.data.sources import open_source

        open_source(resolve_data(args.data), splits=checked.data.splits)
    changes: dict = {"seeds": tuple(int(s) for s in args.seeds.split(","))} if args.seeds else {}
    if args.schemes:
        changes["schemes"] = tuple(args.schemes.split(","))
    preset = preset.select(tuple(args.methods.split(",")) if args.methods else None, **changes)
    out = args.out or f"reproduce-{args.preset}"
    from ppvit.experiments.reproduce import reproduce

    table = reproduce(
        preset, out, args.data, args.key, args.weights, args.pretrained, overrides, not args.quiet, args.minutes
    )
    print(table.markdown())
    print(f"written: {out}/results.md, results.csv, results.json, results.png")
    return 1 if any(r.errors for r in table.rows) else 0


def add_reproduce(sub: argparse._SubParsersAction) -> None:
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
    add_upstream_epochs(p)
    p.add_argument("--epochs", type=int, help="fine-tuning epochs instead of the preset's")
    p.add_argument("--train-subset", type=int, help="fine-tune on this many images (smoke runs)")
    p.add_argument("--test-subset", type=int, help="test on this many images (smoke runs)")
    p.add_argument("--img-size", type=int, help="input side instead of the preset's (a multiple of the patch size)")
    p.add_argument(
        "--minutes",
        type=float,
        help="time budget: a machine too slow for it trains on fewer images, said in the results "
        "(default: the preset's, 12 for demo; 0 for none)",
    )
    p.add_argument("--methods", help="comma-separated methods instead of the preset's (e.g. lora-pe)")
    p.add_argument("--schemes", help="comma-separated schemes instead of the preset's (none = plain images)")
    add_splits_arg(p)
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


def add_upstream_epochs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--upstream-epochs", type=int, help="pretraining epochs instead of the preset's (cached separately)")


def _pretrain(args: argparse.Namespace) -> int:
    preset = _preset(args)
    if preset.upstream is None:
        raise UserError(f"preset {preset.name} starts from ImageNet weights; nothing to pretrain here")
    from ppvit.experiments.reproduce import pretrain

    weights, result = pretrain(preset.model, preset.upstream, args.data, quiet=args.quiet)
    print(f"{weights}: {preset.model}, upstream test accuracy {result.test_acc:.2%}")
    return 0


def add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="train a preset's upstream model on plain images (cached; reruns resume)")
    p.add_argument("--preset", choices=[n for n, p in presets.PRESETS.items() if p.upstream], default="small-cpu")
    p.add_argument("--data", help="CIFAR-10: local copy (default $PPVIT_CIFAR10) or cifar10 to download")
    add_upstream_epochs(p)
    p.set_defaults(func=_pretrain)


def _audit_ciphertext_only(args: argparse.Namespace) -> int:
    from ppvit.attacks.ciphertext_only import CIPHERTEXT_ONLY_SCHEMES
    from ppvit.attacks.ciphertext_only_audit import CiphertextOnlyConfig, ciphertext_only_audit
    from ppvit.attacks.report import format_report
    from ppvit.crypto.ciphers import Scheme
    from ppvit.data.datasets import test_images

    ns = counts(args.ciphertext_only, "--ciphertext-only")
    if args.keys < 1:
        raise UserError(f"--keys: expected a positive number of keys, got {args.keys}")
    schemes = args.scheme or list(CIPHERTEXT_ONLY_SCHEMES)
    for scheme in schemes:
        Scheme.parse(scheme)  # a bad scheme fails before the slow part
    keys = [Key.load(args.key)] if args.key else [Key.generate() for _ in range(args.keys)]
    cfg = CiphertextOnlyConfig(
        size=args.size,
        block_size=args.block_size,
        resize=args.resize,
        images=args.images,
        key_source="given" if args.key else "fresh (made for this audit, not saved)",
    )
    images = test_images(args.data, max(ns) * len(keys) + cfg.images, args.size)  # own attack images per key
    report = ciphertext_only_audit(images, schemes, ns, keys, cfg, args.out, progress=not args.quiet)
    print(format_report(report))
    print(f"written: {args.out}/audit.json, ciphertext-only.png")
    return 0


def _audit(args: argparse.Namespace) -> int:
    if args.ciphertext_only is not None:
        return _audit_ciphertext_only(args)
    from ppvit.attacks import audit
    from ppvit.attacks.report import format_report
    from ppvit.attacks.weight_matching import weight_leakage_transformed
    from ppvit.crypto.ciphers import Scheme
    from ppvit.data.datasets import test_images

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
    images = test_images(args.data, max(cfg.pairs) + cfg.images, args.size)
    weights = {}
    for scheme in cfg.schemes:
        if Scheme.parse(scheme).absorbable and not Scheme.parse(scheme).mixing:  # weight matching finds plans
            weights[f"{scheme}, key-transformed {args.model}"] = weight_leakage_transformed(
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
    report = audit.run_audit(key, images, cfg, args.out, weights, leakage, progress=not args.quiet)
    print(format_report(report))
    print(f"written: {args.out}/audit.json, audit.png")
    return 0


def add_audit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="attack the encryption and models: what leaks, measured (JSON + PNG)")
    p.add_argument("--key", help="key file to audit (default: a fresh key, never saved)")
    p.add_argument("--scheme", action="append", help="scheme to audit (repeat; default: four from weak to strong)")
    p.add_argument(
        "--data",
        help="images to audit with (default $PPVIT_CIFAR10): any source `ppvit encrypt` reads; its test/ split "
        "if it has one, else all of it, any sizes (resized to --size)",
    )
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
