"""Using a model: evaluation over a dataset (also during training) and prediction on files.

An adapter brings its own input pipeline: plain inputs are encrypted here with the key it
was trained with (checked by fingerprint and against the key file's pin), ciphertext from
``ppvit encrypt`` is taken as it is (checked against the manifest, or a file's ciphertext
marker), never encrypted twice, and anything else is refused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from ppvit.crypto.ciphers import BlockCipher, Scheme, pinned_cipher
from ppvit.crypto.keys import Key
from ppvit.data.datasets import ArrayDataset, load_test_split
from ppvit.data.images import ciphertext_origin, image_files, read_ciphertext_array, read_image
from ppvit.data.manifest import PLAIN
from ppvit.data.pipeline import BatchPipeline, eval_batches
from ppvit.data.sources import SplitNames
from ppvit.data.streaming import ShardStream
from ppvit.models.adapters import AdapterMeta, adapter_preprocess, load_adapter
from ppvit.models.backbones import input_size
from ppvit.train.runtime import make_accelerator

log = logging.getLogger(__name__)
TEST_BATCH = 256  # the test set's batch, in `train` and `eval` alike (batch composition moves the last bits)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    ds: ArrayDataset | ShardStream,
    pipeline: BatchPipeline,
    batch_size: int,
    accelerator: Accelerator,
    autocast: bool = True,
) -> dict[str, float]:
    """Loss and accuracy over the whole of ``ds``, summed across processes (``autocast``: in the
    accelerator's mixed precision, else float32)."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss sum, correct, count
    for images, labels in eval_batches(ds, batch_size, accelerator.process_index, accelerator.num_processes):
        if len(labels) == 0:
            continue
        labels = labels.to(accelerator.device)
        with accelerator.autocast() if autocast else nullcontext():
            logits = model(pipeline(images.to(accelerator.device), train=False))
        totals[0] += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        totals[1] += (logits.argmax(1) == labels).sum()
        totals[2] += len(labels)
    totals = accelerator.reduce(totals, reduction="sum")
    return {"loss": float(totals[0] / totals[2]), "acc": float(totals[1] / totals[2]), "n": int(totals[2])}


def adapter_cipher(meta: AdapterMeta, size: int, key: Key | None) -> BlockCipher:
    """The cipher that makes plain inputs what the adapter was trained on: its scheme and block size, the key
    it was trained with (checked by fingerprint), and nothing the key file's pin contradicts."""
    if key is None:
        raise ValueError(
            f"this model was trained on images encrypted with scheme {meta.scheme}: pass --key to encrypt "
            "plain inputs, or give inputs encrypted with `ppvit encrypt`"
        )
    if key.fingerprint != meta.key_fingerprint:
        raise ValueError(f"key fingerprint {key.fingerprint} is not the adapter's ({meta.key_fingerprint})")
    return pinned_cipher(key, meta.scheme, meta.block_size, size)[0]


def adapter_pipeline(meta: AdapterMeta, model: torch.nn.Module, key: Key | None, data_encrypted: bool) -> BatchPipeline:
    """The input pipeline an adapter expects: encrypt here with the key, or take ciphertext as it is."""
    cipher = None
    if meta.scheme is not None and not data_encrypted:
        cipher = adapter_cipher(meta, input_size(model), key)
    recipe = adapter_preprocess(meta, model)
    return BatchPipeline(recipe.size, recipe.mean, recipe.std, cipher, data_encrypted)


def evaluate_adapter(
    adapter_dir: str | os.PathLike,
    data: str | os.PathLike | None,
    key: Key | None = None,
    weights: str | os.PathLike | None = None,
    batch_size: int = TEST_BATCH,
    subset: int | None = None,
    splits: SplitNames | None = None,
) -> dict[str, float]:
    """Test-set loss and accuracy of a saved adapter on plain (encrypted here) or encrypted data (``splits``: which
    of its splits is the test split, where it names it otherwise)."""
    model, meta = load_adapter(adapter_dir, weights)
    test, manifest = load_test_split(data, subset, size=input_size(model), splits=splits)
    if manifest is not None:
        if meta.scheme is None and manifest.scheme != PLAIN:  # scored on ciphertext it never saw: a number, exit 0
            raise ValueError(f"{data}: ppvit ciphertext ({manifest.scheme}), but this model takes plain images")
        manifest.check(meta.scheme, meta.block_size, input_size(model), meta.key_fingerprint, where=str(data))
    test = adapter_labels(test, meta, str(data))
    return score_test(model, meta, test, manifest is not None, key, make_accelerator(), batch_size)


def adapter_labels(test: ArrayDataset | ShardStream, meta: AdapterMeta, where: str) -> ArrayDataset | ShardStream:
    """``test`` labelled by the adapter's classes: a split's labels index its own class folders, so a test split
    missing one of the adapter's classes was scored against shifted labels (every image of the classes after
    it wrong); one holding a class the adapter does not know is refused, as a stream whose classes differ."""
    if not meta.classes or tuple(test.classes) == tuple(meta.classes):
        return test
    unknown = [c for c in test.classes if c not in meta.classes]
    if unknown:
        raise ValueError(f"{where}: its test split's class {unknown[0]!r} is none of the adapter's {len(meta.classes)}")
    if not isinstance(test, ArrayDataset):
        raise ValueError(
            f"{where}: its test split has {len(test.classes)} of the adapter's {len(meta.classes)} classes"
        )
    ours = np.array([meta.classes.index(c) for c in test.classes], dtype=test.labels.dtype)
    return ArrayDataset(test.images, ours[test.labels], tuple(meta.classes))


def score_test(
    model: torch.nn.Module,
    meta: AdapterMeta,
    test: ArrayDataset | ShardStream,
    encrypted: bool,
    key: Key | None,
    accelerator: Accelerator,
    batch_size: int = TEST_BATCH,
) -> dict[str, float]:
    """The test accuracy of record: a saved adapter as :func:`load_adapter` rebuilt it, in float32.

    ``train`` (at its end, on the adapter it has just saved) and ``eval`` both measure it here, so a
    run has one test accuracy whichever command reports it. The model in memory at the end of
    training differs from the saved one in its attention kernel (fused on GPUs only while training)
    and its precision (bf16 autocast), which moved borderline predictions: 0.458 in result.json,
    0.472 from eval, on the same 72 images.
    """
    pipeline = adapter_pipeline(meta, model, key, encrypted)
    return evaluate(model.to(accelerator.device), test, pipeline, batch_size, accelerator, autocast=False)


def iter_predictions(
    adapter_dir: str | os.PathLike,
    files: Iterable[str | os.PathLike],
    key: Key | None = None,
    encrypted: bool = False,
    weights: str | os.PathLike | None = None,
    batch_size: int = 64,
    failed: list[tuple[str, str]] | None = None,
) -> Iterator[tuple[str, str, float]]:
    """(file, predicted class, probability) per image file, batch by batch: memory is one batch, not every file.

    Plain files are resized (:func:`ppvit.data.images.resize`) then encrypted with ``key``. ppvit
    ciphertext (a file :func:`~ppvit.data.images.ciphertext_origin` knows, any file when ``encrypted``, or a
    ``.npy`` array of the scheme's ciphertext dtype: a ``mix``/``lift`` ciphertext, as the client sends it)
    is taken as it is: it must be of the model's input size, and what it records (key fingerprint, scheme,
    block size) the adapter's, or the file is refused. A folder stands for the image files under it.
    A file that cannot be used is appended to ``failed`` as (file, problem) and skipped; without a list,
    the first one raises (ValueError naming it).
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    model, meta = load_adapter(adapter_dir, weights)
    recipe = adapter_preprocess(meta, model)
    size = recipe.size
    pipeline = BatchPipeline(size, recipe.mean, recipe.std, None, data_encrypted=meta.scheme is not None)
    cipher = None  # made at the first plain file: ciphertext alone needs no key
    said = False  # the first ciphertext file is said in a log line
    classes = meta.classes or [str(i) for i in range(meta.num_classes)]
    model.eval()
    batch: list[tuple[str, np.ndarray, bool]] = []  # (file, pixels, whether to encrypt them here)
    for path in [*image_files(files), None]:  # None: flush the last batch
        if path is not None:
            try:
                pixels, encrypt_here = _prediction_input(path, meta, size, encrypted)
            except ValueError as exc:
                if failed is None:
                    raise
                failed.append((path, str(exc).removeprefix(f"image {path}: ")))
                continue
            if encrypt_here and cipher is None:
                cipher = adapter_cipher(meta, size, key)
            if not (encrypt_here or encrypted or said) and meta.scheme is not None:
                log.info("%s: ppvit ciphertext under this model's key: taken as it is, not encrypted again", path)
                said = True
            batch.append((path, pixels, encrypt_here))
        if batch and (path is None or len(batch) == batch_size):
            # float32 holds uint8 pixels and every ciphertext dtype exactly (lift's values stay under 2**24)
            x = torch.stack([torch.from_numpy(p).float() for _, p, _ in batch]).permute(0, 3, 1, 2)
            rows = torch.tensor([e for _, _, e in batch])
            if rows.any():
                x[rows] = cipher.encrypt(x[rows].to(torch.uint8).contiguous()).float()
            with torch.inference_mode():
                probs = model(pipeline(x.permute(0, 2, 3, 1), train=False)).softmax(-1)
            for (f, _, _), p in zip(batch, probs, strict=True):
                yield f, classes[int(p.argmax())], float(p.max())
            batch = []


def _prediction_input(path: str, meta: AdapterMeta, size: int, encrypted: bool) -> tuple[np.ndarray, bool]:
    """A file's pixels at the model's input size, and whether to encrypt them here (plain, for an encrypted model)."""
    if path.lower().endswith(".npy"):
        if meta.scheme is None:
            raise ValueError(f"image {path}: a .npy file is taken as ciphertext, but this model takes plain images")
        return read_ciphertext_array(path, size, Scheme.parse(meta.scheme).ciphertext_dtypes), False
    origin = ciphertext_origin(path)
    if origin is not None:
        if meta.scheme is None:
            raise ValueError(f"image {path}: ppvit ciphertext ({origin.scheme}), but this model takes plain images")
        where = f"image {path}: ppvit ciphertext"
        origin.check(meta.scheme, meta.block_size, size, meta.key_fingerprint, where=where)
    plain = origin is None and not encrypted
    return read_image(path, size, resize=plain), plain and meta.scheme is not None


def predict_files(
    adapter_dir: str | os.PathLike,
    files: Iterable[str | os.PathLike],
    key: Key | None = None,
    encrypted: bool = False,
    weights: str | os.PathLike | None = None,
) -> list[tuple[str, str, float]]:
    """Every prediction of :func:`iter_predictions` as a list."""
    return list(iter_predictions(adapter_dir, files, key, encrypted, weights))
