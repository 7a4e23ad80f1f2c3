"""Random uint8 datasets for the pipeline, augmentation and split tests."""

from __future__ import annotations

import numpy as np

from ppvit.data.datasets import ArrayDataset


def dataset(n: int = 200, classes: int = 4, size: int = 8, seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = np.arange(n) % classes
    return ArrayDataset(images, labels.astype(np.int64), tuple(f"c{i}" for i in range(classes)))
