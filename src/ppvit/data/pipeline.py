"""Batches: the order of an epoch, each process's share, and the pipeline to model input.

The path of one image (see README):

    client:  decode -> plain augmentation -> resize to model input -> encrypt -> uint8
    server:  ciphertext -> ciphertext-safe augmentation -> float -> normalise -> model

Everything after decoding runs batch-wise on torch tensors (:class:`BatchPipeline`), on
whatever device trains, so the loader costs one gather.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ppvit.crypto.ciphers import BlockCipher
from ppvit.data.augment import PlainAugment, random_crop_flip
from ppvit.data.datasets import ArrayDataset
from ppvit.data.images import resize
from ppvit.data.preprocess import KERNEL, Preprocess, normalize
from ppvit.data.streaming import ShardStream


@dataclass(frozen=True)
class DeviceDataset:
    """An :class:`ArrayDataset` resident on a device (uint8 NHWC images, int64 labels): a batch
    is a gather there, with no host copy per step (a GPU run's splits; ``train.fast``)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    @classmethod
    def of(cls, ds: ArrayDataset, device: torch.device) -> DeviceDataset:
        images = torch.from_numpy(ds.images).to(device)
        return cls(images, torch.from_numpy(ds.labels).long().to(device), ds.classes)

    def __len__(self) -> int:
        return len(self.labels)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch ``epoch``: fixed by (seed, epoch), so a resumed run repeats it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def eval_batches(
    ds: ArrayDataset | DeviceDataset | ShardStream, batch_size: int, rank: int, world: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This process's share of every image of ``ds`` once, in order (streamed: in its shards' order)."""
    if isinstance(ds, ShardStream):
        yield from ds.batches(max(1, batch_size // world), rank, world)
        return
    order = torch.arange(len(ds))
    for start in range(0, len(ds), batch_size):
        yield get_batch(ds, order[start : start + batch_size], rank, world)


def get_batch(
    ds: ArrayDataset | DeviceDataset, index: torch.Tensor, rank: int, world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's contiguous share of one global batch of indices.

    ``tensor_split`` always gives ``world`` shares (``chunk`` may give fewer: a last batch of
    one image over two processes had no share for rank 1). Shares differ in size by at most
    one; training refuses batch sizes that do not divide, evaluation sums over processes.
    """
    share = torch.tensor_split(index, world)[rank]
    if isinstance(ds, DeviceDataset):
        share = share.to(ds.images.device, non_blocking=True)
        return ds.images[share], ds.labels[share]
    share = share.numpy()
    return torch.from_numpy(ds.images[share]), torch.from_numpy(ds.labels[share])


class BatchPipeline:
    """uint8 NHWC batch -> normalised float NCHW model input, in the documented order.

    ``cipher`` set means encryption happens here (the client's side, simulated): plain
    augmentation, resize, then encrypt. ``cipher`` None with ``data_encrypted`` means the
    batch is ciphertext already: plain augmentation is refused.
    """

    def __init__(
        self,
        size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        cipher: BlockCipher | None = None,
        data_encrypted: bool = False,
        augment: PlainAugment = "none",
    ) -> None:
        if augment != "none" and data_encrypted:
            raise ValueError(
                f"augmentation {augment!r} does not commute with block-wise encryption and the data arrive "
                "encrypted; use --mixup or --cutmix (ciphertext-safe) instead"
            )
        if cipher is not None and data_encrypted:
            raise ValueError("the data are encrypted already; do not encrypt them again")
        self.size, self.cipher, self.augment, self.data_encrypted = size, cipher, augment, data_encrypted
        self.recipe = Preprocess(size, KERNEL, tuple(mean), tuple(std))  # what the adapter records

    def __call__(self, images: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2)  # NHWC uint8 -> NCHW uint8 (a view)
        if train and self.augment == "crop-flip":
            x = random_crop_flip(x, pad=x.shape[-1] // 8, generator=generator)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            if self.data_encrypted:
                raise ValueError(
                    f"encrypted images are {x.shape[-2]}x{x.shape[-1]} but the model takes {self.size}x{self.size}; "
                    "resizing would destroy the ciphertext: encrypt with --size"
                )
            x = resize(x, self.size)
        if self.cipher is not None:
            x = self.cipher.encrypt(x.contiguous())
        return normalize(x, self.recipe.mean, self.recipe.std)
