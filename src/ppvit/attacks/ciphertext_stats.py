"""What a ciphertext shows with no key and no key recovery: the eavesdropper's statistics.

Block-wise encryption keeps much of an image in plain sight: each block's brightness (a thumbnail),
its value histogram, whole blocks verbatim under scrambling alone, and the edges that let a jigsaw
put scrambled blocks back. These numbers sit beside the attacks in ``ppvit audit``'s report; the
ciphertext-only recovery of the key itself is :mod:`ppvit.attacks.ciphertext_only`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ppvit.attacks.metrics import assign, block_positions, psnr, ssim, to_blocks

if TYPE_CHECKING:
    from ppvit.crypto.ciphers import Plan


def block_mean_image(images: np.ndarray, p: int) -> np.ndarray:
    """Each block replaced by the mean of all its values (grey): a 1/p thumbnail of the
    image's brightness, which pixel shuffling (even across colour channels) keeps exactly."""
    n, h, w, c = images.shape
    m = images.reshape(n, h // p, p, w // p, p * c).astype(np.float64).mean(axis=(2, 4), keepdims=True)
    return np.broadcast_to(m[..., None], (n, h // p, p, w // p, p, c)).reshape(images.shape).round().astype(np.uint8)


def ciphertext_stats(plain: np.ndarray, enc: np.ndarray, p: int) -> dict[str, float]:
    """What an eavesdropper sees without a key, per image set (NHWC uint8)."""
    pb, eb = to_blocks(plain, p), to_blocks(enc, p)
    sp, se = np.sort(pb, axis=-1), np.sort(eb, axis=-1)

    def found(enc_blocks: np.ndarray, plain_blocks: np.ndarray) -> float:
        """Share of encrypted blocks equal to some plain block of the same image."""
        have = [{r.tobytes() for r in img} for img in plain_blocks]
        return float(np.mean([[r.tobytes() in have[k] for r in img] for k, img in enumerate(enc_blocks)]))

    return {
        "psnr_db": psnr(plain, enc),
        "ssim": ssim(plain, enc),
        # the brightness thumbnail read off the ciphertext against the plain image's own (inf: exact)
        "thumbnail_psnr_db": psnr(block_mean_image(plain, p), block_mean_image(enc, p)),
        # a block's value histogram kept (shuffling, rotation, channel order keep it)
        "block_histograms_kept": found(se, sp),
        # a block readable as it is (block scrambling alone)
        "blocks_verbatim": found(eb, pb),
    }


def source_blocks(plan: Plan, p: int) -> np.ndarray:
    """For each encrypted block position, the plain block its values come from."""
    _, w, c = plan.shape
    first = block_positions(plan.shape, p)[:, 0]  # one value of each output block suffices
    row, col = plan.index[first] // (w * c), plan.index[first] // c % w
    return (row // p) * (w // p) + col // p


def jigsaw_neighbours(enc: np.ndarray, p: int, sigma: np.ndarray) -> float:
    """Ciphertext only: the share of the plain image's left-right and top-bottom block
    neighbours found among the encrypted blocks by edge similarity.

    Every image under one key is scrambled the same way, so an eavesdropper adds up the
    edge mismatches of each pair of block positions over all the images it sees, then pairs
    each position with its best right (bottom) neighbour, one-to-one. ``sigma[b]`` is the
    plain block at encrypted position b (the truth, for scoring only). Near 1: the block
    order is recoverable, hence the images; near 1/blocks: nothing to go on.
    """
    import torch

    n, h, w, c = enc.shape
    gh, gw = h // p, w // p
    blocks = torch.from_numpy(enc).double().reshape(n, gh, p, gw, p, c).permute(1, 3, 0, 2, 4, 5)
    blocks = blocks.reshape(gh * gw, n, p, p, c)
    at = np.argsort(sigma)  # at[a]: the encrypted position of plain block a
    grid = np.arange(gh * gw).reshape(gh, gw)
    found = []
    for first, second, pairs in (
        (blocks[:, :, :, -1], blocks[:, :, :, 0], (grid[:, :-1], grid[:, 1:])),  # right edge, left edge
        (blocks[:, :, -1], blocks[:, :, 0], (grid[:-1], grid[1:])),  # bottom edge, top edge
    ):
        cost = torch.cdist(first.reshape(gh * gw, -1), second.reshape(gh * gw, -1))
        cost.fill_diagonal_(cost.max() + 1)  # a block is not its own neighbour
        nxt = assign((-cost).numpy())
        found.append(nxt[at[pairs[0].ravel()]] == at[pairs[1].ravel()])
    return float(np.concatenate(found).mean())
