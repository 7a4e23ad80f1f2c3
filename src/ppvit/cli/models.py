"""Models: ``params``, ``merge``, ``transform-model``."""

from __future__ import annotations

import argparse

from ppvit.cli.common import add_setting_args, positive
from ppvit.cli.train import WEIGHTS_HELP
from ppvit.crypto.keys import Key
from ppvit.models.weights import check_model_output
from ppvit.train.config import Setting, settings


def _params(args: argparse.Namespace) -> None:
    from ppvit.models.methods import param_report

    opts = {s.name: getattr(args, s.name) for s in _method_settings() if getattr(args, s.name) is not None}
    rows = param_report(args.model, args.num_classes, args.img_size, **opts)
    full = next(r.trainable for r in rows if r.method == "full")
    print(f"{args.model}, {args.num_classes} classes (M = 10^6, 2^20 = the paper's unit)")
    print(f"{'method':<9} {'trainable':>12} {'M':>8} {'2^20':>8} {'% of full':>10} {'total':>12}")
    for r in rows:
        pct = 100 * r.trainable / full
        print(
            f"{r.method:<9} {r.trainable:>12,} {r.trainable / 1e6:>8.3f} {r.trainable_mib:>8.2f} {pct:>9.3f}% "
            f"{r.total:>12,}"
        )


def add_params(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("params", help="trainable and total parameters per method")
    p.add_argument("--model", default="vit_base_patch16_224", help="timm ViT or ppvit small configuration")
    p.add_argument("--num-classes", type=positive, default=10, help="classes of the new head (default 10)")
    p.add_argument("--img-size", type=positive, help="input side (default: the model's)")
    add_setting_args(p, _method_settings())
    p.set_defaults(func=_params)


def _method_settings() -> list[Setting]:
    """Every method's own settings (rank, alpha, targets, ...), each applied where a method has it."""
    return [s for s in settings(("method",)) if s.name != "method"]


def _merge(args: argparse.Namespace) -> None:
    from ppvit.models.adapters import adapter_files, merge_to_file
    from ppvit.train.runs import adapter_and_weights

    adapter, weights = adapter_and_weights(args.adapter, args.weights)
    config, tensors = adapter_files(adapter)
    check_model_output(
        args.out, args.force, {"adapter's tensors": tensors, "adapter's config": config, "--weights": weights}
    )
    merge_to_file(adapter, args.out, weights)
    print(f"wrote {args.out} (a plain timm state dict)")


def add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="fold an adapter into a plain timm model (safetensors)")
    p.add_argument("adapter", help="run folder or adapter folder")
    p.add_argument("out", help="safetensors file to write")
    p.add_argument("--weights", help=WEIGHTS_HELP)
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.set_defaults(func=_merge)


def _transform_model(args: argparse.Namespace) -> None:
    check_model_output(args.out, args.force, {"--key file": args.key, "--weights file": args.weights})
    from ppvit.crypto.ciphers import Scheme
    from ppvit.models.transform import transform_weights_file

    key = Key.load(args.key)
    scheme = key.settle("scheme", None if args.scheme is None else str(Scheme.parse(args.scheme)), "shuffle")
    info = transform_weights_file(
        args.model,
        args.weights,
        args.out,
        key,
        scheme,
        args.num_classes,
        key.settle("block_size", args.block_size),  # a key's pin, as encrypt follows it
        args.inverse,
        key.settle("input_size", args.img_size),
    )
    print(
        f"wrote {args.out}: {args.model} for {info['input']} images (scheme {info['scheme']}, key {key.fingerprint},"
        f" normalisation mean {info['mean']} std {info['std']})"
    )


def add_transform_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("transform-model", help="make a model trained on plain images exact on encrypted ones")
    p.add_argument("out", help="safetensors file to write (a timm state dict)")
    p.add_argument("--model", required=True, help="timm ViT name or ppvit small configuration")
    p.add_argument("--weights", required=True, help="the weights to transform (safetensors or PyTorch, timm keys)")
    p.add_argument("--num-classes", type=positive, help="classes of the weights' head (default: as stored)")
    p.add_argument("--key", required=True, help="key file")
    p.add_argument(
        "--scheme",
        help="absorbable steps: shuffle, scramble, negpos:pixel, channel:pixel (default: the key's pin, else shuffle)",
    )
    p.add_argument("--block-size", type=positive, help="must equal the patch size (the default, or the key's pin)")
    p.add_argument(
        "--img-size", type=positive, help="input side (default: the key's pin, else the model's; pos_embed resampled)"
    )
    p.add_argument("--inverse", action="store_true", help="undo: make a model for encrypted images work on plain ones")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.set_defaults(func=_transform_model)
