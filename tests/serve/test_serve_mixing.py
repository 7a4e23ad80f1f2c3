"""A `mix` adapter served: the client encrypts to float16 ciphertext and sends it as ``.npy``; the server
answers what local ``ppvit predict`` answers for the same ciphertext, and refuses anything else with a 4xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import KEY, SMALL, train_config
from PIL import Image
from safetensors.torch import save_file
from serving import LiveServer, npy, png

from ppvit import cli
from ppvit.crypto.ciphers import BlockCipher
from ppvit.data.datasets import load_source_split
from ppvit.models.backbones import create_backbone
from ppvit.serve.app import ServeConfig
from ppvit.serve.client import Client
from ppvit.serve.tenants import TenantStore
from ppvit.train.inference import predict_files
from ppvit.train.loop import train


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory, toy_dataset: Path) -> dict:
    """One tenant, lora-pe trained (1 epoch) on `mix` ciphertext in blocks of 4, registered in a store."""
    tmp = tmp_path_factory.mktemp("mixserve")
    weights, key_file = tmp / "base.safetensors", tmp / "k.key"
    torch.manual_seed(0)
    save_file(create_backbone(SMALL, num_classes=4).state_dict(), str(weights))
    KEY.save(key_file)
    run = tmp / "run"
    train(train_config(run, toy_dataset, key_file, scheme="mix", block_size=4, weights=str(weights), epochs=1))
    token = TenantStore(tmp / "root").add("mia", run)
    images = load_source_split(toy_dataset, "test").images[:5]
    return dict(tmp=tmp, weights=weights, key_file=key_file, run=run, root=tmp / "root", token=token, images=images)


@pytest.fixture(scope="module")
def live(mixed: dict) -> Iterator[LiveServer]:
    with LiveServer(ServeConfig(mixed["root"], window_ms=1, max_images=4, max_body_bytes=1 << 20)) as server:
        yield server


def test_a_served_mix_adapter_answers_as_local_predict(mixed: dict, live: LiveServer, capsys) -> None:
    """The client's ciphertext is the cipher's float16 (recomputed here), the server's answer per image is local
    predict's on that ciphertext saved as ``.npy`` and on the plain files with the key, and `ppvit client predict`
    says the same classes (5 images over the server's limit of 4: two requests)."""
    tmp, images = mixed["tmp"], mixed["images"]
    with Client(live.url, mixed["token"], block_size=4) as c:
        ct = c.encrypt(list(images), KEY)
        answers = c.predict(list(images), KEY)
    expected = BlockCipher(KEY, "mix", 4).encrypt(images)
    assert ct.dtype == np.float16 and ct.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(ct, expected)
    files, plain = [], []
    for i, (c16, a) in enumerate(zip(ct, images, strict=True)):
        files.append(tmp / f"{i}.npy")
        np.save(files[-1], c16)
        plain.append(tmp / f"{i}.png")
        Image.fromarray(a).save(plain[-1])
    adapter = mixed["run"] / "adapter"
    local = predict_files(adapter, files, weights=mixed["weights"])
    local_plain = predict_files(adapter, plain, KEY, weights=mixed["weights"])
    assert [a.label for a in answers] == [cls for _, cls, _ in local] == [cls for _, cls, _ in local_plain]
    np.testing.assert_allclose([a.probability for a in answers], [p for _, _, p in local], atol=1e-4)
    np.testing.assert_allclose([p for _, _, p in local_plain], [p for _, _, p in local], atol=1e-6)
    token_file = tmp / "token"
    token_file.write_text(mixed["token"])
    args = ["client", "predict", *map(str, plain), "--server", live.url, "--token-file", str(token_file)]
    assert cli.main([*args, "--key", str(mixed["key_file"]), "--block-size", "4"]) == 0
    said = [line.split("\t")[1] for line in capsys.readouterr().out.splitlines()]
    assert said == [a.label for a in answers]


@pytest.mark.parametrize(
    ("content_type", "make", "status", "words"),
    [
        ("application/x-npy", lambda ct: npy(ct.astype(np.uint8)), 422, "dtype is uint8; send float16"),
        ("application/x-npy", lambda ct: npy(ct.astype(np.float32)), 422, "dtype is float32; send float16"),
        ("application/x-npy", lambda ct: npy(ct[:, :16]), 422, "images are 16x32"),
        ("application/x-npy", lambda ct: npy(ct)[:-2], 400, "needs 6144 bytes"),
        ("application/x-npy", lambda ct: npy(np.full_like(ct, np.inf)), 422, "not finite"),
        ("image/png", lambda ct: png(ct[0].astype(np.uint8)), 415, "float16 ciphertext"),
    ],
    ids=["uint8", "float32", "shape", "short", "inf", "png"],
)
def test_a_wrong_dtype_or_shape_is_one_line_4xx(
    mixed: dict, live: LiveServer, content_type: str, make, status: int, words: str
) -> None:
    ct = BlockCipher(KEY, "mix", 4).encrypt(mixed["images"][:1])
    headers = {"Authorization": f"Bearer {mixed['token']}", "Content-Type": content_type}
    r = httpx.post(f"{live.url}/v1/predict", content=make(ct), headers=headers)
    assert r.status_code == status, r.text
    assert list(r.json()) == ["error"] and words in r.json()["error"] and "\n" not in r.json()["error"]
    ok = httpx.post(f"{live.url}/v1/predict", content=npy(ct), headers={**headers, "Content-Type": "application/x-npy"})
    assert ok.status_code == 200, ok.text
