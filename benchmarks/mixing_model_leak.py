"""The key holder's model against the dense mixings: how much of an image its patch embedding gives away (issue 28).

docs/THREAT_MODEL.md said "probably not against the model (not measured)": a model made exact for a
key (``transform_model``, the ``--key-init`` start) computes on a ciphertext block what the public model
computes on the plain block. This measures the attack that follows from it
(:func:`ppvit.attacks.weight_matching.embedding_decryptor`): the public model's and the transformed
model's patch embeddings, block statistics of ``--prior`` public images (CIFAR-10 *train* images, outside
the test split), and held-out CIFAR-10 *test* images encrypted under fresh keys, decrypted from the
transformed model's embedding alone. PSNR (dB) / SSIM against the plain images, beside the block-mean
thumbnail (what every scheme leaks). ViT-Ti/16 from ``--weights`` (192 rows for a block's 768 values);
``--wide`` adds ViT-B/16 (768 rows) at a random initialisation (no weights offline; its width is what
matters, the attack is exact for any full-rank square embedding). ``--adapters RUN ... --key KEY``: the
same attack on models the server trained on the key's ciphertexts from the public weights (no
``--key-init``), e.g. the ``full`` cells of ``reproduce --schemes mix,lift``: does training teach the
patch embedding the key?

Usage: PYTHONPATH=src python benchmarks/mixing_model_leak.py --data ../shared/datasets/cifar10-jpeg.tar.gz \\
           --weights ../shared/weights/vit_tiny_patch16_224.safetensors --sizes 112 224 --keys 3 --wide
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ppvit.attacks.block_mixing import thumbnail
from ppvit.attacks.metrics import psnr, ssim, upscale
from ppvit.attacks.uploaded_mixing import read_prior
from ppvit.attacks.weight_matching import embedding_leakage, embedding_leakage_transformed, public_backbone
from ppvit.crypto.keys import Key
from ppvit.data.datasets import test_images
from ppvit.models.adapters import build_base, load_adapter, read_adapter_meta
from ppvit.models.backbones import input_size
from ppvit.train.runs import adapter_dir

SCHEMES = ("mix", "lift")
HOLDER_COLUMNS = ["model", "size", "scheme", "PSNR dB (mean, min-max over keys)", "SSIM", "thumbnail PSNR / SSIM"]
TRAINED_COLUMNS = ["run", "size", "scheme", "PSNR dB", "SSIM", "the public model: PSNR / SSIM"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="CIFAR-10 copy (tar.gz or folder): prior and victims")
    ap.add_argument("--weights", required=True, help="ViT-Ti/16 weights (safetensors)")
    ap.add_argument("--sizes", type=int, nargs="*", default=[112, 224])
    ap.add_argument("--keys", type=int, default=3)
    ap.add_argument("--prior", type=int, default=2000, help="public train images the attacker holds")
    ap.add_argument("--held", type=int, default=32, help="test images encrypted and attacked")
    ap.add_argument("--wide", action="store_true", help="also ViT-B/16 (768 rows), randomly initialised")
    ap.add_argument("--adapters", nargs="*", default=[], help="trained runs (full or lora-pe) on mix/lift ciphertext")
    ap.add_argument("--key", help="the key the --adapters trained with")
    args = ap.parse_args()
    keys = [Key.generate() for _ in range(args.keys)]
    models = [("vit_tiny_patch16_224", args.weights)] + ([("vit_base_patch16_224", None)] if args.wide else [])
    print(f"prior {args.prior} CIFAR-10 train images, {args.held} test images held out, 16x16 blocks")
    if args.sizes:
        table(f"the key holder's model (made exact for each of {args.keys} fresh keys)", HOLDER_COLUMNS)
    for size in args.sizes:
        t0 = time.perf_counter()
        prior = read_prior(args.data, args.prior, size, 16).stats
        held = upscale(test_images(args.data, args.held), size, "bicubic")
        thumb = thumbnail(held, 16)
        for name, weights in models:
            public = public_backbone(name, weights, size)
            for scheme in SCHEMES:
                scores = [embedding_leakage_transformed(public, key, scheme, prior, held)[0] for key in keys]
                db = np.array([s["held_out_psnr_db"] for s in scores])
                sim = np.mean([s["held_out_ssim"] for s in scores])
                print(
                    f"| {name}{'' if weights else ' (random init)'} | {size} | {scheme} | {db.mean():.1f} "
                    f"({db.min():.1f}-{db.max():.1f}) | {sim:.3f} | {psnr(held, thumb):.1f} / {ssim(held, thumb):.2f} |"
                )
        print(f"  ({size}x{size}: {time.perf_counter() - t0:.0f} s)")
    if args.adapters:
        table(f"trained models (key {Key.load(args.key).fingerprint})", TRAINED_COLUMNS)
    for run in args.adapters:
        trained(run, Key.load(args.key), args)


def table(title: str, columns: list[str]) -> None:
    """A markdown table's title and head."""
    print(f"\n{title}:\n| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")


def trained(run: str, key: Key, args: argparse.Namespace) -> None:
    """One row: the embedding attack on a model trained on ``key``'s ciphertexts, and on the public model (the
    start of a run without ``--key-init``; a ``--key-init`` run started from the key holder's model, above)."""
    meta = read_adapter_meta(adapter_dir(run))
    server, _ = load_adapter(adapter_dir(run), args.weights)
    public = build_base(meta, args.weights)
    size = input_size(public)
    prior = read_prior(args.data, args.prior, size, 16).stats
    held = upscale(test_images(args.data, args.held), size, "bicubic")
    score, _ = embedding_leakage(public, server, key, meta.scheme, prior, held)
    start, _ = embedding_leakage(public, public, key, meta.scheme, prior, held)
    print(
        f"| {run} ({meta.method['method']}{', key-init' if meta.key_init else ''}) | {size} | {meta.scheme} | "
        f"{score['held_out_psnr_db']:.1f} | "
        f"{score['held_out_ssim']:.3f} | {start['held_out_psnr_db']:.1f} / "
        f"{start['held_out_ssim']:.3f} |"
    )


if __name__ == "__main__":
    main()
