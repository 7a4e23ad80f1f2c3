"""The 0.2 data modules' public names still resolve at their old paths (deprecated) for one release."""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import pytest
from conftest import KEY

OLD_NAMES = {
    "ppvit.dataset_io": "MANIFEST_NAME IMAGE_SUFFIXES LOSSY_SUFFIXES SHARD_SIZE WDS_SHARD_SIZE PLAIN Format FORMATS "
    "OLD_FORMATS ImageItem iter_image_bytes decode iter_images class_of split_of Manifest read_manifest "
    "write_manifest Summary check_output PR_SET_PDEATHSIG transform_collection encrypt_collection "
    "decrypt_collection load_encrypted_split wds_shard_files iter_wds_split png_array",
    "ppvit.sources": "SPLIT_NAMES WDS_IMAGE_EXTS UNLABELLED Select Columns optional source_kind identity "
    "split_from_path iter_source_bytes iter_source_images source_paths find_columns wds_shards",
    "ppvit.streaming": "SHUFFLE_BUFFER is_val count_keys ShardStream",
    "ppvit.data": "CIFAR10_ENV CACHE_ENV ArrayDataset cifar10_path download_cifar10 cache_dir load_image_folder "
    "test_images split_train_val stratified_subset take_part DataSplits load_splits load_test_split epoch_order "
    "eval_batches get_batch BatchPipeline PlainAugment random_crop_flip mix_batch",
}


@pytest.mark.parametrize("old", sorted(OLD_NAMES))
def test_old_names_resolve(old: str) -> None:
    module = importlib.import_module(old)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        missing = [name for name in OLD_NAMES[old].split() if getattr(module, name, None) is None]
    assert not missing, f"{old} lost {missing}"


def test_old_functions_still_work(tmp_path: Path, toy_dataset: Path) -> None:
    from ppvit.crypto.ciphers import BlockCipher

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from ppvit import data, dataset_io, sources

        assert data.cifar10_path(toy_dataset) == toy_dataset and data.cifar10_path("cifar10") is None
        assert data.load_image_folder(toy_dataset, "test").images.shape == (32, 32, 32, 3)
        assert sources.source_kind(toy_dataset) == "files"
        assert len(list(sources.iter_source_bytes(toy_dataset))) == 128
        assert [r for r, _ in dataset_io.iter_image_bytes(toy_dataset / "test" / "class1")][:2] == ["0.png", "1.png"]
        dataset_io.encrypt_collection(toy_dataset, tmp_path / "enc", BlockCipher(KEY, "shuffle", 4), progress=False)
        images, labels, classes = dataset_io.load_encrypted_split(tmp_path / "enc", "test")
        assert images.shape == (32, 32, 32, 3) and sorted(set(labels.tolist())) == [0, 1, 2, 3] and len(classes) == 4
