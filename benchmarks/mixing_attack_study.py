"""How much of an image the attacks on ``mix``/``lift`` recover, beside ``shuffle`` and the thumbnail.

``--keys K`` fresh keys (``Key.generate()``), each attacking the same images; the summary gives
each row's mean, min and max over keys. The attacker's prior: ``--prior`` CIFAR-10 *train* images; the
victim's images: CIFAR-10 *test* images, the first N encrypted and shown to the attacker, the last
``--held`` decrypted with what it learnt and scored against the plain images (PSNR, SSIM). With
``--victims train`` (N past the test split's 10,000) the prior comes from one half of the train
split, the N ciphertexts from the other, and the first ``--held`` test images are held out. All
images are upscaled from 32x32 to ``--size`` (bicubic, as ppvit resizes). Rows:

* ``eigen-alignment k`` (``mix`` only: it uses that ``A`` is orthogonal) and ``whitened second-order k``:
  :mod:`ppvit.attacks.block_mixing`'s ciphertext-only attacks of rank k from N ciphertexts;
* ``ica k`` / ``ica+lags k``: FastICA of both sides matched by their signatures
  (:func:`ppvit.attacks.block_mixing.ica_attack`), without and with the lag/mean refinement;
* ``ica search k``: the same components matched by an exhaustive search over signed permutations,
  8 at a time (:func:`ppvit.attacks.block_mixing.ica_search_attack`);
* ``known-plaintext``: least squares from N plain/encrypted pairs;
* ``shuffle``: ppvit's ciphertext-only key recovery (:func:`ppvit.attacks.ciphertext_only.recover_plan`);
* references: ``thumbnail`` (the block-mean image upscaled: what a block-mean leak shows),
  ``prior mean`` (the prior's mean block everywhere: knowing nothing), ``top-k oracle`` (the plain
  image projected on the prior's top-k components: the best a second-order attack of rank k can do).

Usage:
    python benchmarks/mixing_attack_study.py --data PATH --size 112 --n 10 100 1000 \\
        --prior 5000 --held 32 --keys 1 --out docs/key-recovery/mixing_attacks.json
"""

from __future__ import annotations

import argparse
import os
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ppvit._io import json_text
from ppvit.attacks.block_mixing import (
    BlockStats,
    ica_attack,
    ica_search_attack,
    known_plaintext_decryptor,
    orthogonal_attack,
    second_order_attack,
    thumbnail,
)
from ppvit.attacks.metrics import psnr, ssim, to_blocks, upscale
from ppvit.attacks.report import write_figure
from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key
from ppvit.data.datasets import load_source_split, stratified_subset, take_part, test_images

CHUNK = 250
SHOWN = 4  # held-out images in --figure's rows


def score(name: str, n: int | None, plain: np.ndarray, guess: np.ndarray, **extra: Any) -> dict[str, Any]:
    row = {"attack": name, "n": n, "psnr_db": psnr(plain, guess), "ssim": ssim(plain, guess), **extra}
    n_text = "" if n is None else f" N={n}"
    print(f"  {name}{n_text}: PSNR {row['psnr_db']:.2f} dB, SSIM {row['ssim']:.3f}", flush=True)
    return row


def chunks(images: np.ndarray, size: int, cipher: BlockCipher | None = None):
    for start in range(0, len(images), CHUNK):
        x = upscale(images[start : start + CHUNK], size, "bicubic")
        yield x if cipher is None else cipher.encrypt(x)


def references(prior: BlockStats, held: np.ndarray, p: int, k: int) -> list[dict[str, Any]]:
    """Thumbnail, prior mean and the top-k oracle on the held-out images."""
    n, h, w, c = held.shape
    back = lambda b: b.reshape(n, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(held.shape)  # noqa: E731
    x = to_blocks(held, p).astype(np.float64)
    mean_img = np.broadcast_to(np.rint(prior.mean), x.shape).astype(np.uint8)
    _, vec = np.linalg.eigh(prior.cov)
    top = vec[:, ::-1][:, :k]
    oracle = np.clip(np.rint(prior.mean + (x - prior.mean) @ top @ top.T), 0, 255).astype(np.uint8)
    return [
        score("thumbnail", None, held, thumbnail(held, p)),
        score("prior mean", None, held, back(mean_img)),
        score(f"top-{k} oracle", None, held, back(oracle)),
    ]


def mixing_rows(
    scheme: str, key: Key, victims: np.ndarray, held: np.ndarray, prior: BlockStats, args, shown: dict | None = None
) -> list:
    """The attacks' rows; ``shown`` (if given) gets the first held-out images as the ICA search of the
    largest rank decrypts them, per N."""
    p, rows = args.block, []
    cipher = BlockCipher(key, scheme, p)
    enc_held = cipher.encrypt(held)
    stats, seen = BlockStats(p), 0
    for n in sorted(args.n):
        for batch in chunks(victims[seen:n], args.size, cipher):
            stats.add(batch)
        seen = n
        attacks = {"whitened second-order": second_order_attack}
        if scheme == "mix":  # the attacker knows mix is orthogonal
            attacks["eigen-alignment"] = orthogonal_attack
        runs = [(f"{name} k={k}", k, partial(attack, k=k)) for name, attack in attacks.items() for k in args.k]
        for k in args.ica_k:
            runs += [(f"ica k={k}", k, partial(ica_attack, k=k, refine=False))]
            runs += [(f"ica+lags k={k}", k, partial(ica_attack, k=k))]
        runs += [(f"ica search k={k}", k, partial(ica_search_attack, k=k)) for k in args.search_k]
        for name, k, attack in runs:
            guess = attack(stats, prior, scheme).decrypt(enc_held, p)
            rows.append(score(name, n, held, guess, scheme=scheme, k=k))
            if shown is not None and args.search_k and name == f"ica search k={max(args.search_k)}":
                shown[f"ICA search k={k}, N={n}"] = guess[:SHOWN]
    plain_kp = upscale(victims[: max(args.kp)], args.size, "bicubic")
    for n in args.kp:
        dec = known_plaintext_decryptor(plain_kp[:n], cipher.encrypt(plain_kp[:n]), p)
        rows.append(score("known-plaintext", n, held, dec.decrypt(enc_held, p), scheme=scheme))
    return rows


def shuffle_rows(key: Key, victims: np.ndarray, held: np.ndarray, args) -> list:
    from ppvit.attacks.ciphertext_only import recover_plan
    from ppvit.crypto.ciphers import compile_plan

    truth = compile_plan(key, "shuffle", args.block, held.shape[1:])
    rows = []
    for n in args.shuffle_n:
        seen = upscale(victims[:n], args.size, "bicubic")
        guess = recover_plan(truth.apply_numpy(seen), "shuffle", args.block, seed=np.random.default_rng(0))
        rows.append(
            score(
                "ciphertext-only key recovery",
                n,
                held,
                guess.inverse().apply_numpy(truth.apply_numpy(held)),
                scheme="shuffle",
            )
        )
    return rows


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, min and max PSNR/SSIM over keys of each (scheme, attack, N); printed as a table."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if "key" in row:
            groups.setdefault((row["scheme"], row["attack"], row["n"]), []).append(row)
    out = []
    for (scheme, attack, n), group in groups.items():
        psnrs, ssims = np.array([r["psnr_db"] for r in group]), np.array([r["ssim"] for r in group])
        out.append(
            {"scheme": scheme, "attack": attack, "n": n, "keys": len(group), "psnr_db_mean": float(psnrs.mean())}
            | {"psnr_db_min": float(psnrs.min()), "psnr_db_max": float(psnrs.max()), "ssim_mean": float(ssims.mean())}
        )
        print(
            f"  {scheme} {attack} N={n}: PSNR {psnrs.mean():.2f} dB ({psnrs.min():.2f}-{psnrs.max():.2f}, "
            f"{len(group)} keys), SSIM {ssims.mean():.3f}"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("PPVIT_CIFAR10"), help="CIFAR-10 copy (or $PPVIT_CIFAR10)")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--schemes", nargs="+", default=["mix", "lift", "shuffle"])
    parser.add_argument("--n", type=int, nargs="+", default=[10, 100, 1000], help="ciphertexts the attacker sees")
    parser.add_argument("--kp", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="known plain/encrypted pairs")
    parser.add_argument("--shuffle-n", type=int, nargs="+", default=[10, 100], help="ciphertexts for shuffle")
    parser.add_argument("--prior", type=int, default=5000, help="public CIFAR-10 train images (the prior)")
    parser.add_argument("--held", type=int, default=32, help="held-out images scored")
    parser.add_argument("--k", type=int, nargs="*", default=[3, 16, 48], help="ranks of the second-order attacks")
    parser.add_argument("--ica-k", type=int, nargs="*", default=[8, 24], help="ranks of the ICA attack")
    parser.add_argument("--search-k", type=int, nargs="*", default=[8, 32], help="ranks of the ICA search attack")
    parser.add_argument(
        "--victims",
        choices=("test", "train"),
        default="test",
        help="where the N ciphertexts come from: train (for N past the test split) excludes the prior's images",
    )
    parser.add_argument("--keys", type=int, default=1, help="fresh keys, each attacking the same images")
    parser.add_argument("--out", type=Path, default=Path("docs/key-recovery/mixing_attacks.json"))
    parser.add_argument("--figure", type=Path, help="PNG: the first key's ICA search reconstructions per scheme and N")
    args = parser.parse_args()

    t0 = time.perf_counter()
    train = load_source_split(args.data, "train")
    if args.victims == "test":
        pool = test_images(args.data, max(args.n) + args.held)
        victims, held = pool[: max(args.n)], upscale(pool[-args.held :], args.size, "bicubic")
    else:  # train's two disjoint halves: the prior from one, the ciphertexts from the other; held-out: test
        train, other = take_part(train, "0/2"), take_part(train, "1/2")
        victims = other.images[np.random.default_rng(2).permutation(len(other))[: max(args.n)]]
        held = upscale(test_images(args.data, args.held), args.size, "bicubic")
    public = stratified_subset(train, args.prior, seed=0).images  # in class order: shuffled for the sample
    public = public[np.random.default_rng(1).permutation(len(public))]
    prior = BlockStats.of(chunks(public, args.size), args.block)
    print(
        f"{args.size}x{args.size}, {args.block}x{args.block} blocks, prior {args.prior} train images, "
        f"{args.held} held-out test images, {args.keys} key(s)",
        flush=True,
    )
    rows = references(prior, held, args.block, max(args.k))
    figures: dict[str, dict[str, np.ndarray]] = {}
    for index in range(args.keys):
        key = Key.generate()
        print(f"key {index} ({key.fingerprint})", flush=True)
        for scheme in args.schemes:
            print(scheme, flush=True)
            new = shuffle_rows(key, victims, held, args) if scheme == "shuffle" else []
            if scheme != "shuffle":
                reference = {"plain": held[:SHOWN], "thumbnail": thumbnail(held[:SHOWN], args.block)}
                shown = figures.setdefault(scheme, reference)
                new = mixing_rows(scheme, key, victims, held, prior, args, shown if index == 0 else None)
            rows += [{**row, "key": index} for row in new]
    doc = {"setting": {k: str(v) for k, v in vars(args).items()}, "seconds": time.perf_counter() - t0}
    doc |= {"summary": summary(rows), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json_text(doc))
    print(f"wrote {args.out}")
    if args.figure:
        write_figure(figures, args.figure)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
