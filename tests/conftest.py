"""Shared fixtures: a private cache folder, and a small learnable ImageFolder dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoded-dataset caches go to a temporary folder, never the user's ~/.cache."""
    monkeypatch.setenv("PPVIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def toy_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ and test/ of 32x32 images in 4 classes that differ by colour and a stripe: learnable fast."""
    root = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])
    for split, n in (("train", 96), ("test", 32)):
        for c, colour in enumerate(colours):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(n // 4):
                img = np.clip(colour + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                img[:, 4 * c : 4 * c + 4] = 255
                Image.fromarray(img).save(root / split / f"class{c}" / f"{i}.png")
    return root
