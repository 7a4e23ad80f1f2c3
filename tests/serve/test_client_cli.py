"""`ppvit client train` as a user reads it: the model the server offers, progress, what is served at the end."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from conftest import SMALL

from ppvit.cli import client as client_cli
from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key
from ppvit.data.encrypt import encrypt_collection
from ppvit.data.manifest import read_manifest
from ppvit.serve.datasets import Dataset
from ppvit.serve.jobs import JobError, ServiceLimits, job_config


def test_the_model_may_be_left_out_when_the_server_offers_one(tmp_path: Path, toy_dataset: Path) -> None:
    work = tmp_path / "toy"  # the shards a job's batch is checked against
    encrypt_collection(toy_dataset, work, BlockCipher(Key.generate(), "shuffle", 4), 32, "wds", progress=False)
    dataset = Dataset("toy", work, read_manifest(work), 0, [], {"train": 96, "test": 32})
    cfg = job_config({"epochs": 1}, dataset, ServiceLimits({SMALL: None}), tmp_path / "run")
    assert cfg.backbone.model == SMALL
    with pytest.raises(JobError) as refused:
        job_config({"epochs": 1}, dataset, ServiceLimits({SMALL: None, "vit_tiny_patch16_224": None}), tmp_path)
    assert refused.value.status == 422
    assert f"this server offers {SMALL}, vit_tiny_patch16_224: choose one with --model" in str(refused.value)


def job(state: str, epoch: int = 0, loss: float | None = None, acc: float | None = None, **more: object) -> dict:
    return {
        "id": "job-1",
        "state": state,
        "dataset": "toy",
        "epoch": epoch,
        "epochs": 2,
        "train_loss": loss,
        "val_acc": acc,
        "version": None,
        "error": None,
        "activate": False,
        **more,
    }


class FakeClient:
    """What `client train` asks of the server, answered from a script of job states."""

    def __init__(self, states: list[dict], served: int = 2) -> None:
        self.states, self.served = states, served

    def follow(self, job_id: str, on_update) -> dict:
        for state in self.states:
            on_update(state)
        return self.states[-1]

    def info(self) -> dict:
        return {"version": self.served}


def test_progress_says_queued_then_real_figures_never_zeros(capsys) -> None:
    states = [job("queued"), job("running"), job("running", 1, 1.2345, 0.5), job("succeeded", 2, 0.9, 0.75)]
    client_cli._follow(FakeClient(states), states[0])
    err = capsys.readouterr().err
    assert "0.000" not in err and "queued" in err and "loss 1.234 val acc 0.500" in err, err


def test_a_job_trained_without_activate_says_what_is_served_and_how_to_serve_it(
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """It ended with "version 3" as if served while version 2 still was, and never said `client activate`."""
    done = job("succeeded", 2, 0.9, 0.75, version=3, test_acc=0.8125, test_images=32)
    monkeypatch.setattr(client_cli, "_train_remote", lambda client, args: done)
    args = argparse.Namespace(action="train", server="http://127.0.0.1:9", token_file="alice.token", activate=False)
    monkeypatch.setattr(client_cli, "warn_threat_model", lambda: None, raising=False)
    client_cli._service_call(FakeClient([done]), args)
    out = capsys.readouterr().out
    assert "test accuracy 0.812 on 32 images" in out
    assert "version 3 is trained but not served (version 2 still is)" in out
    assert "ppvit client activate job-1 --server http://127.0.0.1:9 --token-file alice.token" in out
    served = job("succeeded", 2, 0.9, 0.75, version=3, activate=True, test_acc=0.8125, test_images=32)
    monkeypatch.setattr(client_cli, "_train_remote", lambda client, args: served)
    client_cli._service_call(FakeClient([served], served=3), argparse.Namespace(**{**vars(args), "activate": True}))
    out = capsys.readouterr().out
    assert "version 3 is served" in out and "client activate" not in out


@pytest.mark.parametrize("scheme", ["mix", "lift"])
def test_client_train_refuses_a_dense_mixing_saying_where_it_trains(tmp_path: Path, scheme: str) -> None:
    """The service's datasets are uint8 wds shards: a mixing's float/int ciphertext cannot go there (it
    said "use --format npz", a flag `client train` does not have), and nothing is encrypted or sent."""
    from ppvit.crypto.keys import Key

    Key.generate().save(tmp_path / "k.key")
    (tmp_path / "src").mkdir()

    class Unreachable:
        def upload(self, *a: object) -> None:
            raise AssertionError("nothing is sent")

    args = argparse.Namespace(
        key=str(tmp_path / "k.key"), src=str(tmp_path / "src"), name="toy", work=str(tmp_path / "work"),
        scheme=scheme, block_size=4, img_size=32, shard_size=None,
    )  # fmt: skip
    with pytest.raises(ValueError, match=rf"scheme {scheme}: the service trains on uint8 shards.*ppvit train --data"):
        client_cli._train_remote(Unreachable(), args)
    assert not (tmp_path / "work").exists()


def test_the_client_skips_an_unreadable_file_when_asked_to_and_names_it(tmp_path: Path) -> None:
    """`client predict` stopped at the first unreadable file (issue 29); with a list it leaves it out."""
    import numpy as np
    from PIL import Image

    from ppvit.crypto.ciphers import BlockCipher
    from ppvit.crypto.keys import Key
    from ppvit.serve.client import Client

    key = Key.generate()

    class Offline(Client):
        def info(self) -> dict:
            return {"scheme": "shuffle", "block_size": 4, "input_size": 8, "key_fingerprint": key.fingerprint}

    rng = np.random.default_rng(0)
    good = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(2)]
    files = [tmp_path / "a.png", tmp_path / "broken.png", tmp_path / "b.png"]
    Image.fromarray(good[0]).save(files[0])
    files[1].write_bytes(b"not a png")
    Image.fromarray(good[1]).save(files[2])
    client = Offline("http://127.0.0.1:9", "t")
    failed: list[tuple[str, str]] = []
    sent = client.encrypt(files, key, failed=failed)
    assert [f for f, _ in failed] == [str(files[1])]
    np.testing.assert_array_equal(sent, BlockCipher(key, "shuffle", 4).encrypt(np.stack(good)))
    with pytest.raises(ValueError, match=r"broken\.png"):
        client.encrypt(files, key)  # no list: the first unreadable file stops it, named
    with pytest.raises(ValueError, match="none of the 1 images could be used"):
        client.encrypt([files[1]], key, failed=[])
