"""The same file gets the same prediction along every path: eval, predict, encrypt-then-predict, a served request.

Before 0.3 training and eval resized with torch's bicubic and the file paths (predict, the
client, ``encrypt --size``) with PIL's: the same image became different pixels, hence a
different ciphertext and sometimes another class. Files here are 48x48 (shrunk to the
model's 32) and 20x20 (grown), so both directions of the one resize are crossed.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port, train_config
from PIL import Image

from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key
from ppvit.data.datasets import load_test_split
from ppvit.data.encrypt import encrypt_collection
from ppvit.models.adapters import load_adapter
from ppvit.train.inference import adapter_pipeline, iter_predictions
from ppvit.train.loop import train

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, toy_dataset: Path) -> dict:
    tmp = tmp_path_factory.mktemp("paths")
    key = tmp / "k.key"
    Key.generate().save(key)
    train(train_config(tmp / "run", toy_dataset, key, epochs=1))
    return {"tmp": tmp, "key": key, "run": tmp / "run"}


def photos(root: Path, side: int) -> list[Path]:
    """A test/ split of smooth-ish photos of ``side`` pixels (not the model's 32), two per class."""
    rng = np.random.default_rng(side)
    files = []
    for c in range(4):
        (root / "test" / f"class{c}").mkdir(parents=True)
        for i in range(2):
            base = rng.integers(0, 256, (side // 4 + 1, side // 4 + 1, 3), dtype=np.uint8)
            img = Image.fromarray(base).resize((side, side), Image.Resampling.BILINEAR)
            files.append(root / "test" / f"class{c}" / f"{i}.png")
            img.save(files[-1])
    return files


def eval_path(run: dict, data: Path) -> dict[str, tuple[str, float]]:
    """What ``ppvit eval`` computes per image: the test split through the adapter's batch pipeline."""
    model, meta = load_adapter(run["run"] / "adapter")
    test, manifest = load_test_split(data)
    assert manifest is None
    pipeline = adapter_pipeline(meta, model, Key.load(run["key"]), data_encrypted=False)
    with torch.no_grad():
        probs = model.eval()(pipeline(torch.from_numpy(test.images), train=False)).softmax(-1)
    files = sorted((data / "test").rglob("*.png"))  # the folder loader's order: class, then name
    return {str(f): (meta.classes[int(p.argmax())], float(p.max())) for f, p in zip(files, probs, strict=True)}


def served_path(run: dict, files: list[Path], root: Path) -> dict[str, tuple[str, float]]:
    import uvicorn

    from ppvit.serve.app import ServeConfig, create_app
    from ppvit.serve.client import Client
    from ppvit.serve.tenants import TenantStore

    token = TenantStore(root).add("alice", run["run"])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ServeConfig(root, window_ms=1)), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    try:
        with Client(f"http://127.0.0.1:{port}", token) as client:
            answers = client.predict([str(f) for f in files], Key.load(run["key"]))
    finally:
        server.should_exit = True
        thread.join(30)
    return {str(f): (a.label, a.probability) for f, a in zip(files, answers, strict=True)}


@pytest.mark.parametrize("side", [48, 20], ids=["shrunk", "grown"])
def test_every_path_gives_the_same_prediction(run: dict, tmp_path: Path, side: int) -> None:
    files = photos(tmp_path / "photos", side)
    key = Key.load(run["key"])
    paths = {
        "eval": eval_path(run, tmp_path / "photos"),
        "predict": {f: (c, p) for f, c, p in iter_predictions(run["run"] / "adapter", files, key, batch_size=3)},
    }
    encrypt_collection(tmp_path / "photos", tmp_path / "enc", BlockCipher(key, "shuffle", 4), size=32, progress=False)
    encrypted = {tmp_path / "enc" / f.relative_to(tmp_path / "photos") for f in files}
    paths["encrypt, predict --encrypted"] = {
        str(tmp_path / "photos" / Path(f).relative_to(tmp_path / "enc")): (c, p)
        for f, c, p in iter_predictions(run["run"] / "adapter", sorted(encrypted), encrypted=True)
    }
    paths["served"] = served_path(run, files, tmp_path / "root")
    reference = paths.pop("eval")
    assert sorted(reference) == sorted(map(str, files))
    for name, got in paths.items():
        for f, (cls, prob) in reference.items():
            assert got[str(f)][0] == cls, f"{name}: {f}"
            assert got[str(f)][1] == pytest.approx(prob, abs=1e-5), f"{name}: {f}"


def test_predict_reads_one_batch_at_a_time(run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory is one batch: the first answers come before the later files are read, in order."""
    import ppvit.train.inference as inference

    files = photos(tmp_path / "photos", 32)
    reads: list[str] = []
    real = inference.read_image
    monkeypatch.setattr(inference, "read_image", lambda f, *a, **k: (reads.append(str(f)), real(f, *a, **k))[1])
    found = iter_predictions(run["run"] / "adapter", [tmp_path / "photos"], Key.load(run["key"]), batch_size=3)
    first = next(found)
    assert len(reads) == 3 and first[0] == reads[0]
    rest = list(found)
    assert [first[0], *(r[0] for r in rest)] == reads == sorted(map(str, files))
    with pytest.raises(ValueError, match="batch size"):
        next(iter_predictions(run["run"] / "adapter", files, Key.load(run["key"]), batch_size=0))
