"""In-memory datasets: the stratified validation split and the disjoint parts."""

from __future__ import annotations

import numpy as np
import pytest
from data_arrays import dataset

from ppvit.data.datasets import split_train_val, take_part


def test_val_split_is_stratified_disjoint_and_seeded() -> None:
    ds = dataset(400, classes=4)
    train, val = split_train_val(ds, 0.25, seed=1)
    assert len(val) == 100 and np.bincount(val.labels).tolist() == [25] * 4
    t_keys = {im.tobytes() for im in train.images}
    assert not t_keys & {im.tobytes() for im in val.images}
    assert len(t_keys) + len(val) == 400
    _, val2 = split_train_val(ds, 0.25, seed=1)
    np.testing.assert_array_equal(val.images, val2.images)


def test_parts_are_disjoint_and_cover_the_set() -> None:
    ds = dataset(300, classes=3)
    a, b = take_part(ds, "0/2"), take_part(ds, "1/2")
    ka, kb = {im.tobytes() for im in a.images}, {im.tobytes() for im in b.images}
    assert not ka & kb and len(ka | kb) == 300
    assert np.bincount(a.labels).tolist() == [50] * 3
    with pytest.raises(ValueError, match="i/k"):
        take_part(ds, "2/2")
