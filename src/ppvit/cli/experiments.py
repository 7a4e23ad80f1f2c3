"""Experiments: ``reproduce`` (the paper's table), ``pretrain``, ``audit`` (the attacks)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import yaml

from ppvit.cli.common import UserError, add_splits_arg, counts, positive
from ppvit.crypto.keys import Geometry, Key
from ppvit.experiments import presets
from ppvit.train.config import ALIASES, Setting, TrainConfig, settings

if TYPE_CHECKING:
    from ppvit.data.sources import Source

log = logging.getLogger(__name__)


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


def _seeds(text: str) -> tuple[int, ...]:
    """``--seeds 0,1,2``; a seed named twice would be one cell counted as two (``n=2``, a spread of 0)."""
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise UserError(f"--seeds: expected comma-separated whole numbers (e.g. 0,1,2), got {text!r}") from None
    if len(set(seeds)) < len(seeds):
        raise UserError(f"--seeds {text}: a seed named twice")
    return seeds


def _reproduce(args: argparse.Namespace) -> int:
    given = ("epochs", "train_subset", "test_subset", "img_size", "splits")
    overrides = {k: getattr(args, k) for k in given if getattr(args, k) is not None}  # 0 is checked, not dropped
    overrides.update(_parse_sets(args.set))
    preset = _preset(args)
    checked = preset.base.replace(**overrides)  # a bad setting fails here, not in every cell
    if checked.data.splits is not None:  # and so does a split the source lacks
        from ppvit.data.datasets import resolve_data
        from ppvit.data.sources import open_source

        open_source(resolve_data(args.data), splits=checked.data.splits)
    changes: dict = {"seeds": _seeds(args.seeds)} if args.seeds else {}
    if args.schemes:
        changes["schemes"] = tuple(args.schemes.split(","))
    preset = preset.select(tuple(args.methods.split(",")) if args.methods else None, **changes)
    out = args.out or f"reproduce-{args.preset}"
    from ppvit.experiments.reproduce import reproduce

    table = reproduce(
        preset,
        out,
        args.data,
        args.key,
        args.weights,
        args.pretrained,
        overrides,
        not args.quiet,
        args.minutes,
        args.one_process,
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
    p.add_argument(
        "--img-size", type=positive, help="input side instead of the preset's (a multiple of the patch size)"
    )
    p.add_argument(
        "--minutes",
        type=float,
        help="time budget: a machine too slow for it trains on fewer images, said in the results "
        "(default: the preset's, 12 for demo; 0 for none)",
    )
    p.add_argument("--methods", help="comma-separated methods instead of the preset's (e.g. lora-pe)")
    p.add_argument("--schemes", help="comma-separated schemes instead of the preset's (none = plain images)")
    p.add_argument(
        "--one-process",
        action="store_true",
        help="train every cell in this process: saves a process start, imports and CUDA context per cell "
        "(short GPU cells); a crash then ends the whole run",
    )
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


AUDIT_SIZE, AUDIT_BLOCK, AUDIT_RESIZE = 224, 16, "bicubic"  # for plain images (encrypted data has a manifest)


def _audit_ciphertext_only(args: argparse.Namespace) -> int:
    from ppvit.attacks.report import RECOVERED, format_report
    from ppvit.attacks.uploaded_audit import stored_ciphertexts
    from ppvit.data.sources import SplitNames

    ns = counts(args.ciphertext_only, "--ciphertext-only")
    stored = stored_ciphertexts(args.data, SplitNames.of(args.splits))
    report = _audit_simulated(args, ns) if stored is None else _audit_stored(args, ns, stored)
    print(format_report(report))
    extra = f", {RECOVERED}/" if report["ciphertext_only"].get("runs") else ""
    print(f"written: {args.out}/audit.json, ciphertext-only.png{extra}")
    return 0


def _audit_stored(args: argparse.Namespace, ns: list[int], source: Source) -> dict:
    """A user's ciphertexts (``--data`` has a manifest): attacked as they are, settings from the manifest."""
    from ppvit.attacks.uploaded_audit import UploadedConfig, audit_uploaded

    m, where = source.manifest, f"encrypted dataset {source.path}"
    for flag, value in (("--keys", args.keys), ("--resize", args.resize)):
        if value is not None:
            raise UserError(f"{where}: {flag} is for plain images; these ciphertexts are attacked as they are")
    for scheme in args.scheme or [None]:
        m.check(scheme=scheme, block_size=args.block_size, size=args.size, where=where)
    key = Key.load(args.key) if args.key else None
    cfg = UploadedConfig(images=args.images, prior=args.prior, prior_images=args.prior_images)
    return audit_uploaded(source, ns, cfg, key, args.out, progress=not args.quiet)


def _audit_simulated(args: argparse.Namespace, ns: list[int]) -> dict:
    """Plain images (no manifest): encrypted here under fresh (or the given) keys, then attacked."""
    from ppvit.attacks.ciphertext_only import CIPHERTEXT_ONLY_SCHEMES
    from ppvit.attacks.ciphertext_only_audit import CiphertextOnlyConfig, ciphertext_only_audit
    from ppvit.crypto.ciphers import Scheme
    from ppvit.data.datasets import test_images
    from ppvit.data.sources import SplitNames

    keys_made = args.keys or 3
    if args.prior is not None:
        raise UserError(f"--prior is for encrypted --data (mix/lift ciphertext); {args.data or 'CIFAR-10'} is plain")
    schemes = args.scheme or list(CIPHERTEXT_ONLY_SCHEMES)
    for scheme in schemes:
        Scheme.parse(scheme)  # a bad scheme fails before the slow part
    keys = [Key.load(args.key)] if args.key else [Key.generate() for _ in range(keys_made)]
    size, block = _plain_geometry(args, keys[0] if args.key else None)
    under = "the given key" if args.key else f"{len(keys)} fresh keys"
    log.info("%s: plain images (no manifest): encrypted here under %s, then attacked", args.data or "CIFAR-10", under)
    cfg = CiphertextOnlyConfig(
        size=size,
        block_size=block,
        resize=args.resize or AUDIT_RESIZE,
        images=args.images,
        key_source="given" if args.key else "fresh (made for this audit, not saved)",
    )
    images = test_images(args.data, max(ns) * len(keys) + cfg.images, cfg.size, SplitNames.of(args.splits))
    return ciphertext_only_audit(images, schemes, ns, keys, cfg, args.out, progress=not args.quiet)


def _plain_geometry(args: argparse.Namespace, key: Key | None) -> tuple[int, int]:
    """Input size and block size the audit encrypts plain images at: ``--size``/``--block-size``, else a given
    key's pin (a flag it contradicts is refused), else the audit's defaults; checked as a pin is (a multiple,
    at most 4096: ``--size 40000`` tried a 57.6 GB allocation)."""
    size = key.settle("input_size", args.size) if key is not None else args.size
    block = key.settle("block_size", args.block_size) if key is not None else args.block_size
    size, block = AUDIT_SIZE if size is None else size, AUDIT_BLOCK if block is None else block
    try:
        Geometry("shuffle", block, size)
    except ValueError as exc:
        raise UserError(f"--size {size}, --block-size {block}: {exc}") from None
    return size, block


def _audit(args: argparse.Namespace) -> int:
    from ppvit.attacks.report import check_out

    check_out(args.out, args.data)  # before the slow part, and with --data: the simulated audits get arrays
    if args.ciphertext_only is not None:
        return _audit_ciphertext_only(args)
    from ppvit.attacks.uploaded_audit import stored_ciphertexts

    stored = stored_ciphertexts(args.data)
    if stored is not None:
        raise UserError(
            f"encrypted dataset {stored.path}: ciphertexts, and this audit encrypts plain images itself; attack "
            f"them as they are with --ciphertext-only 5,20"
        )
    for flag, value in (("--keys", args.keys), ("--prior", args.prior)):
        if value is not None:
            raise UserError(f"{flag} is for --ciphertext-only")
    from ppvit.attacks import audit  # the training stack: after the checks
    from ppvit.attacks.report import format_report
    from ppvit.attacks.weight_matching import public_backbone, weight_leakage_transformed
    from ppvit.crypto.ciphers import Scheme
    from ppvit.data.datasets import test_images
    from ppvit.data.sources import SplitNames

    key = Key.load(args.key) if args.key else Key.generate()
    size, block = _plain_geometry(args, key if args.key else None)
    cfg = audit.AuditConfig(
        schemes=tuple(args.scheme or audit.AuditConfig.schemes),
        size=size,
        block_size=block,
        pairs=tuple(counts(args.pairs, "--pairs")),
        images=args.images,
        resize=args.resize or AUDIT_RESIZE,
        key_source="given" if args.key else "fresh (made for this audit, not saved)",
    )
    for scheme in cfg.schemes:
        Scheme.parse(scheme)  # a bad scheme fails before the slow part
    model, weights = audit.public_model(args.model, args.weights, args.adapter or [])
    images = test_images(args.data, max(cfg.pairs) + cfg.images, cfg.size, SplitNames.of(args.splits))
    found, public = {}, None
    for scheme in cfg.schemes:
        if Scheme.parse(scheme).mixing and public is None:  # its key holder's model: the embedding attack
            public = public_backbone(model, weights, cfg.size)
        elif Scheme.parse(scheme).absorbable and not Scheme.parse(scheme).mixing:  # weight matching finds plans
            found[f"{scheme}, key-transformed {model}"] = weight_leakage_transformed(
                model, key, scheme, cfg.block_size, weights
            )
    for run in args.adapter or []:
        found[f"adapter {run}"] = audit.adapter_leakage(run, key, images, cfg, args.weights)
    leakage = None
    if args.watch:
        watched = TrainConfig.load(args.watch, quiet=args.quiet)
        if watched.crypto.key is None or Key.load(watched.crypto.key).fingerprint != key.fingerprint:
            raise UserError(f"config {args.watch}: its run must encrypt with the audited key (--key)")
        curve, result = audit.leakage_during_training(watched, args.every)
        leakage = {"config": args.watch, "curve": curve, "test_acc": result.test_acc}
    report = audit.run_audit(key, images, cfg, args.out, found, leakage, not args.quiet, public)
    print(format_report(report))
    print(f"written: {args.out}/audit.json, audit.png")
    return 0


def add_audit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="attack the encryption and models: what leaks, measured (JSON + PNG)",
        description="Audit what you uploaded: `ppvit audit --ciphertext-only 5,20 --data my-photos-enc` attacks the "
        "ciphertexts of an encrypted folder (or a server's stored dataset) as they are, with no key, and writes "
        "what it recovers; --key compares it with your key. Given plain images, the audit encrypts them itself.",
    )
    p.add_argument("--key", help="key file to audit (default: a fresh key, never saved); with encrypted --data: yours")
    p.add_argument("--scheme", action="append", help="scheme to audit (repeat; default: four from weak to strong)")
    p.add_argument(
        "--data",
        help="images to audit with (default $PPVIT_CIFAR10): any source `ppvit encrypt` reads; its test split "
        "as training finds it (--splits, test/, validation/...) if it has one, else all of it, any sizes "
        "(resized to --size); `ppvit encrypt` output is ciphertext: attacked as it is by --ciphertext-only, "
        "with scheme, block size and size from its manifest",
    )
    add_splits_arg(p)
    p.add_argument("--size", type=positive, help=f"plain images: side after resizing (default {AUDIT_SIZE})")
    p.add_argument("--block-size", type=positive, help=f"plain images: block size (default {AUDIT_BLOCK})")
    p.add_argument(
        "--resize", choices=["bicubic", "nearest"], help=f"plain images: {AUDIT_RESIZE} (default) or nearest (flat)"
    )
    p.add_argument("--pairs", default="1,2,4,8", help="known plain/encrypted pair counts to try (default 1,2,4,8)")
    p.add_argument("--images", type=positive, default=8, help="held-out images decrypted with the recovered key")
    p.add_argument(
        "--model", help="model for weight matching (default: the first --adapter's, else vit_base_patch16_224)"
    )
    p.add_argument(
        "--weights",
        help="the public pretrained weights (default: with --adapter, its base: the file its run recorded, "
        "else $PPVIT_WEIGHTS; else random initialisation)",
    )
    p.add_argument("--adapter", action="append", help="run folder of an adapter trained on encrypted images (repeat)")
    p.add_argument("--watch", metavar="CONFIG", help="train this run config and match weights as it trains")
    p.add_argument("--every", type=positive, default=20, help="with --watch: match every N steps (default 20)")
    p.add_argument(
        "--ciphertext-only",
        metavar="N1,N2,...",
        help="instead: recover the key from N ciphertexts alone, per N: those of encrypted --data as they are, or "
        "plain images encrypted here per scheme (default shuffle, shuffle+scramble) and fresh key",
    )
    p.add_argument("--keys", type=positive, help="--ciphertext-only, plain images, no --key: fresh keys (default 3)")
    p.add_argument(
        "--prior",
        metavar="PLAIN",
        help="--ciphertext-only on mix/lift ciphertext: plain public images of the same kind (any source ppvit "
        "reads; outside its test split if it has one), whose block statistics the attack matches",
    )
    p.add_argument(
        "--prior-images", type=int, default=2000, help="at most this many --prior images are read (default 2000)"
    )
    p.add_argument(
        "--out",
        default="audit-out",
        help="folder for audit.json, the figure and recovered/ (images decrypted without the key; default audit-out)",
    )
    p.set_defaults(func=_audit)
