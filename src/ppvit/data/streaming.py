"""Encrypted WebDataset shards read as a stream: training on data larger than memory.

``ppvit encrypt --format wds`` writes ``<split>/shard-000000.tar`` files of ``KEY.png`` +
``KEY.cls``. A :class:`ShardStream` is one split of them (or the training or validation part
of one), read by ``webdataset`` shard by shard in DataLoader worker processes and handed on as
uint8 NHWC batches to the same :class:`~ppvit.data.datasets.BatchPipeline` as an in-memory dataset.
Memory is bounded by the shuffle buffer (raw PNG bytes) and the batches in flight, never by
the size of the dataset.

Order: each epoch shuffles the shard list and then the samples through a buffer, both seeded
by ``(data_seed, epoch)``, so an epoch's order is the same on every run with the same number of
loader workers. Several processes each decode every ``world``-th sample of the stream (their
shares are disjoint; each reads the shards' bytes). The validation part of the ``train`` split
is chosen by a hash of each sample's key (``val_fraction`` of them, not stratified by class).
An epoch is ``len // batch_size`` steps; a stream that runs short of that (the partial batches
of several workers are dropped) starts its shards again for the remaining steps.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from ppvit.data.sources.encrypted_wds import labelled, png_array
from ppvit.data.sources.wds import count_samples, read_samples

SHUFFLE_BUFFER = 1000  # raw samples held for shuffling: with 224x224 PNGs about 150 MB


def is_val(key: str, fraction: float) -> bool:
    """Whether a sample belongs to the validation part: a fixed hash of its key, not a random draw."""
    return zlib.crc32(key.encode()) % 10_000 < round(fraction * 10_000)


class _Samples(IterableDataset):
    """(HWC uint8 image, label) of this process's share of the stream, decoded in the worker that reads it."""

    def __init__(
        self,
        shards: list[Path],
        n_classes: int,
        keep: Callable[[str], bool] | None,
        shuffle: bool,
        seed: int,
        rank: int,
        world: int,
    ) -> None:
        self.shards, self.n_classes, self.keep, self.shuffle, self.seed = shards, n_classes, keep, shuffle, seed
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        info = torch.utils.data.get_worker_info()
        wid, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = list(range(len(self.shards)))
        if self.shuffle:
            random.Random(self.seed).shuffle(order)
        mine = [self.shards[i] for i in order[wid::workers]]
        stream = (
            (shard, sample["__key__"], *labelled(shard, sample, self.n_classes))
            for shard, sample in read_samples(mine)
            if self.keep is None or self.keep(sample["__key__"])
        )
        if self.shuffle:
            stream = _buffer_shuffle(stream, SHUFFLE_BUFFER, random.Random(self.seed * 31 + wid))
        for c, (shard, key, png, label) in enumerate(stream):
            if c % self.world == self.rank:
                yield png_array(png, f"{shard}: {key}"), label


def _buffer_shuffle(stream: Iterator, size: int, rng: random.Random) -> Iterator:
    """Samples in a seeded random order through a buffer of ``size`` (webdataset's shuffle, but seeded)."""
    buf: list = []
    for item in stream:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


def _collate(items: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.stack([im for im, _ in items]))
    return images, torch.tensor([label for _, label in items], dtype=torch.int64)


class ShardStream:
    """One split of encrypted WebDataset shards (or the train or validation part of one), streamed.

    Has what training asks of a dataset (``len``, ``classes``) but no random access: batches come
    from :meth:`batches`.
    """

    def __init__(
        self,
        shards: list[Path],
        classes: tuple[str, ...],
        keep: Callable[[str], bool] | None = None,
        workers: int = 0,
        where: str = "",
    ) -> None:
        if not shards:
            raise ValueError(f"encrypted dataset {where}: no shards")
        self.shards, self.classes, self.keep, self.workers = shards, classes, keep, workers
        self.n = count_samples(shards, keep)

    def __len__(self) -> int:
        return self.n

    def batches(
        self,
        per_process: int,
        rank: int,
        world: int,
        shuffle: bool = False,
        seed: int = 0,
        skip: int = 0,
        steps: int | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This process's batches: ``steps`` full ones after skipping ``skip`` (training), or the whole
        share once with a short last batch (``steps`` None: evaluation)."""
        done, cycle, workers = 0, 0, self.workers
        while True:
            loader = DataLoader(
                _Samples(self.shards, len(self.classes), self.keep, shuffle, seed * 1_000_003 + cycle, rank, world),
                batch_size=per_process,
                num_workers=workers,
                collate_fn=_collate,
                drop_last=steps is not None,
                persistent_workers=False,
            )
            got = 0
            for batch in loader:
                got += 1
                if done >= skip:
                    yield batch
                done += 1
                if steps is not None and done == skip + steps:
                    return
            if steps is None:
                return
            if got == 0 and workers > 1:  # each worker batched its own shards and none filled one (1,500 images,
                workers = 0  # batches of 1,200, 2 workers): this cycle again as one stream, as a rerun does
                continue
            if got == 0:
                raise ValueError(f"{self.n} streamed images give no batch of {per_process} per process")
            cycle, workers = cycle + 1, self.workers
