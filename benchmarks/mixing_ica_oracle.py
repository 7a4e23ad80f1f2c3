"""Where the ICA attack on ``mix`` fails: separating components, or matching them? (issue 28)

Same setting as ``mixing_attack_study.py`` (2,000 CIFAR-10 train images as the prior, the first
N test images encrypted, 32 others held out, 112x112, 16x16 blocks, one fresh key). Per N and
rank k: how well the ICA components of the two sides correspond under the true key (|corr| of
key-matched pairs), the reconstruction when the attacker's matching is replaced by the key's
(an upper bound for any matching of these components), the whitened problem solved with the
key (the bound of rank k), and the attack's own matching.

Usage: PYTHONPATH=src PPVIT_CIFAR10=... python benchmarks/mixing_ica_oracle.py > docs/key-recovery/mixing_ica_oracle.txt
"""

import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from mixing_attack_study import chunks

from ppvit.attacks.block_mixing import BlockStats, LinearDecryptor, _whitened_problem, fastica, ica_attack
from ppvit.attacks.metrics import psnr, upscale
from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key
from ppvit.crypto.mixing import block_mixing
from ppvit.data.datasets import load_source_split, stratified_subset, test_images

data = os.environ["PPVIT_CIFAR10"]
t0 = time.time()
pool = test_images(data, 1032)
victims, held = pool[:1000], upscale(pool[-32:], 112, "bicubic")
public = stratified_subset(load_source_split(data, "train"), 2000, seed=0).images
public = public[np.random.default_rng(1).permutation(len(public))]
prior = BlockStats.of(chunks(public, 112), 16)
key = Key.generate()
cipher = BlockCipher(key, "mix", 16)
A = block_mixing(key, "mix", 16, 3).matrix
enc_held = cipher.encrypt(held)
stats, seen = BlockStats(16), 0
for n in (100, 1000):
    for b in chunks(victims[seen:n], 112, cipher):
        stats.add(b)
    seen = n
    for k in (8, 24):
        wx, wx_pinv, wy, lags, mx, my = _whitened_problem(stats, prior, "mix", k)
        zx = (np.concatenate(prior.sample) - prior.mean) @ wx.T
        zy = (np.concatenate(stats.sample) - stats.mean) @ wy.T
        ux, uy = fastica(zx), fastica(zy)
        qtrue = wy @ A @ wx_pinv  # z_y ~ qtrue z_x (exact only if the subspaces agree)
        m = uy @ qtrue @ ux.T
        cols = np.abs(m).argmax(1)
        p = np.zeros((k, k))
        p[np.arange(k), cols] = np.sign(m[np.arange(k), cols])
        q = uy.T @ p @ ux
        mat = wx_pinv @ q.T @ wy
        dec = LinearDecryptor(mat, prior.mean - mat @ stats.mean)
        mat2 = wx_pinv @ qtrue.T @ wy  # the whitened problem solved exactly with the key
        dec2 = LinearDecryptor(mat2, prior.mean - mat2 @ stats.mean)
        sv = np.linalg.svd(qtrue, compute_uv=False)
        own = ica_attack(stats, prior, "mix", k=k, refine=False).decrypt(enc_held, 16)
        corr = np.abs(m).max(1)
        print(
            f"N={n} k={k}: |corr| of key-matched ICA components median {np.median(corr):.2f} "
            f"min {corr.min():.2f}, distinct {len(set(cols))}/{k}; "
            f"qtrue singular values {sv.min():.2f}-{sv.max():.2f}; "
            f"ICA+key matching {psnr(held, dec.decrypt(enc_held, 16)):.2f} dB; "
            f"whitened key {psnr(held, dec2.decrypt(enc_held, 16)):.2f} dB; ica attack {psnr(held, own):.2f} dB",
            flush=True,
        )
print(f"{time.time() - t0:.0f} s")
