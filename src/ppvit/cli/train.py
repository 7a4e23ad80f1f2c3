"""Training and using a model: ``train``, ``eval``, ``predict``."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ppvit._io import json_text
from ppvit.cli.common import (
    add_setting_args,
    add_splits_arg,
    add_strict_arg,
    positive,
    prediction_line,
    report_failed,
)
from ppvit.crypto.keys import Key
from ppvit.train.config import TrainConfig, settings

WEIGHTS_HELP = "the base weights file the adapter was trained on (default: the one the run's config.yaml records)"


def _train_config(args: argparse.Namespace) -> TrainConfig:
    given = {s.name: getattr(args, s.name) for s in settings() if getattr(args, s.name, None) is not None}
    if args.quiet:
        given["quiet"] = True
    if args.config:
        return TrainConfig.load(args.config, **given)
    from ppvit.train.runs import CONFIG_FILE

    saved = Path(args.out or "") / CONFIG_FILE
    if args.resume and args.out and saved.exists():  # `--resume --out RUN`: the run's own settings, flags on top
        return TrainConfig.load(saved, **given)
    if args.resume and args.out and set(given) <= {"out", "quiet"}:  # nothing to resume or start: not a download
        raise ValueError(f"{args.out}: no run to resume (no {CONFIG_FILE} there)")
    return TrainConfig.from_flat(**given)


def _train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from ppvit.train.loop import train

    result = train(_train_config(args), resume=args.resume)
    if dist.is_available() and dist.is_initialized():  # torchrun: this process's group ends with the run (a
        dist.destroy_process_group()  # gloo thread left to the interpreter's exit aborted a finished run's rank)
    print(json_text(dataclasses.asdict(result)), end="")  # strict JSON: a diverged loss is null, not NaN
    return report_failed(list(result.unreadable.items()), "the run trained on the others")


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune a ViT on encrypted (or plain) images")
    p.add_argument("--config", help="YAML file of settings; flags override it")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint (its config.yaml gives every setting not flagged); "
        "with a larger --epochs, extend it (finished or not): a new warm-up + cosine schedule from the last weights",
    )
    add_setting_args(p, (s for s in settings() if s.name != "quiet"))
    p.set_defaults(func=_train)


def _eval(args: argparse.Namespace) -> None:
    from ppvit.data.sources import SplitNames
    from ppvit.train.inference import evaluate_adapter
    from ppvit.train.runs import adapter_and_weights

    splits = SplitNames.of(args.splits)
    key = Key.load(args.key) if args.key else None
    adapter, weights = adapter_and_weights(args.adapter, args.weights)
    result = evaluate_adapter(adapter, args.data, key, weights, subset=args.subset, splits=splits)
    print(json_text(result), end="")


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="test accuracy of a trained adapter (a run folder or its adapter/)")
    p.add_argument("adapter", help="run folder or adapter folder")
    p.add_argument(
        "--data", help="dataset with a test/ split: plain (encrypted here with --key) or `ppvit encrypt` output"
    )
    p.add_argument("--key", help="key file, to encrypt plain test images as the client would")
    p.add_argument("--weights", help=WEIGHTS_HELP)
    p.add_argument("--subset", type=positive, help="evaluate on this many test images only")
    add_splits_arg(p)
    p.set_defaults(func=_eval)


def _predict(args: argparse.Namespace) -> int:
    from ppvit.train.inference import iter_predictions
    from ppvit.train.runs import adapter_and_weights

    key = Key.load(args.key) if args.key else None
    adapter, weights = adapter_and_weights(args.adapter, args.weights)
    failed: list[tuple[str, str]] | None = None if args.strict else []
    found = iter_predictions(adapter, args.images, key, args.encrypted, weights, args.batch_size, failed)
    for f, cls, prob in found:
        print(prediction_line(f, cls, prob), flush=True)
    return report_failed(failed or [], "the others were classified")


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify image files with a trained adapter")
    p.add_argument("adapter", help="run folder or adapter folder")
    p.add_argument("images", nargs="+", help="image files or folders (their image files, sorted)")
    p.add_argument("--key", help="key file: plain images are resized and encrypted with it first")
    p.add_argument(
        "--encrypted",
        action="store_true",
        help="the images are encrypted already (needed only for unmarked ciphertext copied out of its folder: "
        "ppvit ciphertext is known by its PNG marker or its folder's manifest)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (memory: one batch)")
    p.add_argument("--weights", help=WEIGHTS_HELP)
    add_strict_arg(p)
    p.set_defaults(func=_predict)
