"""Keys and images: ``keygen``, ``encrypt``, ``decrypt``, ``preview``, ``encrypt-demo``."""

from __future__ import annotations

import argparse

from ppvit.cli.common import (
    add_splits_arg,
    add_strict_arg,
    positive,
    report_summary,
    scheme_args,
    stop_on_sigterm,
)
from ppvit.crypto.keys import Key
from ppvit.data.manifest import OLD_FORMATS, WDS_SHARD_SIZE
from ppvit.experiments.preview import MAX_PREVIEW_IMAGES, PREVIEW_SCHEMES


def _keygen(args: argparse.Namespace) -> None:
    pin = None
    given = [args.scheme, args.block_size, args.size]
    if any(v is not None for v in given):
        if None in given:
            raise ValueError("keygen: pin a geometry with all three of --scheme, --block-size and --size")
        from ppvit.crypto.ciphers import Scheme
        from ppvit.crypto.keys import Geometry

        pin = Geometry(str(Scheme.parse(args.scheme)), args.block_size, args.size)
    key = Key.generate(pin)
    key.save(args.out)
    pinned = "" if pin is None else f", pinned to {pin.scheme} blocks of {pin.block_size} on {pin.input_size}"
    print(f"wrote key {args.out} (fingerprint {key.fingerprint}{pinned}, mode 0600)")


def add_keygen(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keygen", help="write a new secret key file (mode 0600)")
    p.add_argument("out", help="key file to create; an existing file is never overwritten")
    p.add_argument("--scheme", help="pin the scheme this key encrypts with (with --block-size and --size)")
    p.add_argument("--block-size", type=positive, help="pin the block size (a client refuses a server stating another)")
    p.add_argument("--size", type=positive, help="pin the input size the images are encrypted at")
    p.set_defaults(func=_keygen)


def _encrypt(args: argparse.Namespace) -> int:
    from ppvit.crypto.ciphers import pinned_cipher
    from ppvit.data.encrypt import encrypt_collection
    from ppvit.data.sources import Columns, SplitNames
    from ppvit.data.sources.base import read_class_names

    splits = SplitNames.of(args.splits)
    classes = read_class_names(args.classes) if args.classes else None
    cipher, size = pinned_cipher(Key.load(args.key), args.scheme, args.block_size, args.size)
    with stop_on_sigterm():
        summary = encrypt_collection(
            args.src,
            args.dst,
            cipher,
            size=size,
            fmt=args.format,
            workers=args.workers,
            progress=not args.quiet,
            columns=Columns(args.image_column, args.label_column, classes),
            shard_size=args.shard_size,
            splits=splits,
            strict=args.strict,
        )
    return report_summary(summary, "encrypted", args.dst)


def add_encrypt(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encrypt", help="encrypt images: ImageFolder tree or tar, HF dataset, WebDataset shards")
    p.add_argument(
        "src",
        help="folder tree (ImageFolder layout), single image, tar/tar.gz archive, Hugging Face dataset "
        "(save_to_disk folder or parquet file/folder), or WebDataset shards (.tar with KEY.jpg + KEY.cls, "
        "a folder of them, or a brace pattern such as 'shards/train-{000..009}.tar')",
    )
    p.add_argument("dst", help="output folder (created); the source layout is kept")
    scheme_args(p)
    p.add_argument(
        "--size", type=positive, help="resize to SIZE x SIZE first (the model input size; default: the key's pin)"
    )
    p.add_argument(
        "--format",
        default="png",
        type=lambda f: OLD_FORMATS.get(f, f),
        help="png (one file per image), npz (uint8 shards per split; npy is an old name for it) or wds "
        "(WebDataset tar shards of PNG + .cls per split, streamed by `ppvit train`)",
    )
    p.add_argument(
        "--shard-size",
        type=int,
        help=f"--format wds: images per shard (default {WDS_SHARD_SIZE})",
    )
    p.add_argument("--image-column", help="Hugging Face dataset: the image column (default: the Image feature)")
    p.add_argument("--label-column", help="Hugging Face dataset: the label column (default: the ClassLabel feature)")
    p.add_argument(
        "--classes",
        help="file of class names, one per line: line i names label i (WebDataset .cls numbers, or a Hugging Face "
        "label column that is no ClassLabel); default: the numbers, 0000, 0001, ...",
    )
    add_splits_arg(p)
    add_strict_arg(p)
    _add_workers(p)
    p.set_defaults(func=_encrypt)


def _add_workers(p: argparse.ArgumentParser) -> None:
    """0 or -3 were taken as 1 without a word."""
    p.add_argument("--workers", type=positive, default=1, help="processes to use (at most the CPUs and the images)")


def _decrypt(args: argparse.Namespace) -> int:
    from ppvit.data.encrypt import decrypt_collection

    with stop_on_sigterm():
        summary = decrypt_collection(
            args.src, args.dst, Key.load(args.key), workers=args.workers, progress=not args.quiet
        )
    return report_summary(summary, "decrypted", args.dst)


def add_decrypt(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("decrypt", help="decrypt a folder written by `ppvit encrypt` (the manifest says how)")
    p.add_argument("src", help="folder written by `ppvit encrypt`")
    p.add_argument("dst", help="output folder for the plain PNG images")
    p.add_argument("--key", required=True, help="the key it was encrypted with (checked by fingerprint)")
    _add_workers(p)
    p.set_defaults(func=_decrypt)


def _preview(args: argparse.Namespace) -> None:
    from ppvit.experiments import preview

    schemes = tuple(s for s in args.schemes.split(",") if s) if args.schemes else None
    path = preview.preview(
        args.src, args.out, Key.load(args.key), schemes, args.block_size, args.n, args.size, args.prefix
    )
    print(f"wrote {path}")


def add_preview(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preview", help="write a PNG grid of plain and encrypted examples per scheme")
    p.add_argument("src", help="folder, image or tar archive")
    p.add_argument("out", help="PNG file to write")
    p.add_argument("--key", required=True, help="key file")
    p.add_argument(
        "--schemes", help=f"comma-separated schemes (default: the key's pin, else {','.join(PREVIEW_SCHEMES)})"
    )
    p.add_argument("--block-size", type=positive, help="block size (default: the key's pin, else 16)")
    p.add_argument("--n", type=int, default=4, help=f"number of example images (1 to {MAX_PREVIEW_IMAGES})")
    p.add_argument("--size", type=int, help="resize to SIZE x SIZE (default: the key's pin, else 224)")
    p.add_argument("--prefix", default="", help="only images whose path starts with this, e.g. test/")
    p.set_defaults(func=_preview)


def _demo(args: argparse.Namespace) -> int:
    from ppvit.experiments import preview

    report = preview.encryption_demo(args.data, args.out, n=args.n)
    print("\n".join(report.lines()))
    return 0 if report.round_trip_exact and not report.failed else 1


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encrypt-demo", help="encrypt, decrypt and verify CIFAR-10 test images; write a preview")
    p.add_argument("--data", help="the CIFAR-10 copy (default $PPVIT_CIFAR10)")
    p.add_argument("--out", default="encrypt-demo-out", help="output folder (default encrypt-demo-out)")
    p.add_argument("--n", type=int, default=200, help="number of test images (default 200)")
    p.set_defaults(func=_demo)
