"""Shared test setup: constants, fixtures, the toy run's config, and the key-material scan.

Test modules import the plain names directly (pytest puts ``tests/`` on ``sys.path``)::

    from conftest import KEY, SMALL, assert_no_key_material, train_config
"""

from __future__ import annotations

import base64
import os
import socket
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.fx.experimental.proxy_tensor import make_fx

from ppvit.crypto.keys import Key
from ppvit.train.config import TrainConfig

SMALL = "vit_micro_d2_patch4_32"  # d 48, 2 blocks, 4x4 patches on 32x32: 64 patch tokens
KEY = Key(bytes(range(32)))  # a fixed key: ciphertexts and maps are the same on every run


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


@pytest.fixture(scope="session")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly generated key in a private (0600) key file; nothing may modify it."""
    path = tmp_path_factory.mktemp("key") / "k.key"
    Key.generate().save(path)
    return path


# -- the toy run ---------------------------------------------------------------------------------


def train_config(out: Path, data: Path, key: Path | None, **settings: Any) -> TrainConfig:
    """A quick run of the micro ViT on the toy dataset (8 images a batch, 3 epochs); ``settings`` on top."""
    base = dict(
        out=str(out),
        data=str(data),
        key=str(key) if key else None,
        model=SMALL,
        method="lora-pe",
        epochs=3,
        batch_size=8,
        lr=3e-3,
        val_fraction=0.25,
        warmup_epochs=0.5,
        quiet=True,
        precision="no",
    )
    return TrainConfig.from_flat(**{**base, **settings})


def train_flags(cfg: TrainConfig) -> list[str]:
    """The same settings as `ppvit train` flags."""
    defaults = TrainConfig.from_flat(method=cfg.method.name).flat()
    out = []
    for name, value in cfg.flat().items():
        if value is None or value == defaults.get(name) or name == "quiet":
            continue
        flag = f"--{name.replace('_', '-')}"
        out += ([flag] if value else [f"--no-{flag[2:]}"]) if isinstance(value, bool) else [flag, str(value)]
    return out


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    """The trained tensors a run saved in its adapter."""
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "ppvit_adapter.safetensors"))


def write_adapter_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the tensors of the adapter in ``folder`` and record their SHA-256 in its config: an adapter
    consistent on disk that holds what a test needs (a file swapped in without its config is refused)."""
    import hashlib
    import json

    from safetensors.torch import save_file

    from ppvit.models.adapters import CONFIG_NAME, WEIGHTS_NAME

    save_file(tensors, str(folder / WEIGHTS_NAME))
    doc = json.loads((folder / CONFIG_NAME).read_text())
    doc["tensors_sha256"] = hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest()
    (folder / CONFIG_NAME).write_text(json.dumps(doc))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- no key material in outputs ------------------------------------------------------------------


def key_encodings(key: Key) -> dict[str, bytes]:
    """The forms in which a key's secret could end up in a file or a message."""
    s = key.secret
    b64, url = base64.b64encode(s), base64.urlsafe_b64encode(s)
    return {
        "raw bytes": s,
        "lowercase hex": s.hex().encode(),
        "uppercase hex": s.hex().upper().encode(),
        "base64": b64,
        "base64 without padding": b64.rstrip(b"="),
        "urlsafe base64": url,
        "urlsafe base64 without padding": url.rstrip(b"="),
    }


def assert_no_key_material(
    where: Path | str | bytes | Iterable[Path | str | bytes], key: Key, skip: Iterable[Path] = ()
) -> None:
    """Fail if the secret of ``key`` occurs, in any of :func:`key_encodings`' forms, in ``where``.

    ``where`` holds paths (``Path``: a file, or a folder searched recursively; each must exist
    and a folder must hold at least one file, so that a wrong path cannot pass vacuously) and
    texts (``str`` or ``bytes``: printed output, messages, reprs). Files are read as bytes.
    ``skip`` names files that may hold the key (a key file written next to the outputs).
    """
    items = [where] if isinstance(where, Path | str | bytes) else list(where)
    forms = key_encodings(key)
    skipped = {Path(p).resolve() for p in skip}

    def check(data: bytes, what: str) -> None:
        for name, form in forms.items():
            if form in data:  # not a bare assert: pytest would print the data, the key with it
                raise AssertionError(f"the key's secret ({name}) is in {what}")

    for item in items:
        if isinstance(item, Path):
            assert item.exists(), f"{item}: nothing there to scan"
            files = [item] if item.is_file() else sorted(p for p in item.rglob("*") if p.is_file())
            files = [f for f in files if f.resolve() not in skipped]
            assert files, f"{item}: no files to scan"
            for f in files:
                check(f.read_bytes(), str(f))
        elif isinstance(item, str):
            check(item.encode("utf-8", "surrogateescape"), "a text")
            check(item.encode("latin-1", "replace"), "a text")  # raw bytes held one per character
        else:
            check(bytes(item), "bytes")


# -- the command line ----------------------------------------------------------------------------


def run_cli(argv: list, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``ppvit -q ARGV`` in process: (exit status, stdout, stderr)."""
    from ppvit import cli

    code = cli.main(["-q", *map(str, argv)])
    printed = capsys.readouterr()
    return code, printed.out, printed.err


def one_line_error(argv: list, capsys: pytest.CaptureFixture[str], *expected: str) -> str:
    """Run ``argv``: exit 2 and exactly one stderr line holding every ``expected`` piece."""
    code, _, err = run_cli(argv, capsys)
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    for piece in expected:
        assert piece in err, err
    return err


def recorder(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """A CPU stand-in for a CUDA graph's capture (``ppvit.models.graphs.Capture``) with its contract: the tensors
    ``fn`` read are fixed at capture (``make_fx`` holds those tensors, not copies: one replaced later is not seen,
    one written in place is) and each replay overwrites one output buffer."""
    traced = make_fx(fn)()
    out: list[torch.Tensor] = []

    def replay() -> torch.Tensor:
        y = traced()
        if not out:
            with torch.inference_mode(False):  # (a graph's output is device memory, written whatever the mode)
                out.append(torch.empty_like(y))
        return out[0].copy_(y)

    return replay


def within_a_minute(pipe: Path, read: Callable[[], object]) -> object:
    """``read()``'s result (its exception raised); a reader waiting on ``pipe`` fails the test, let go first."""
    done: list = []

    def run() -> None:
        try:
            done.append(read())
        except Exception as exc:
            done.append(exc)

    work = threading.Thread(target=run, daemon=True)
    work.start()
    work.join(60)
    if work.is_alive():  # the reader waits on the pipe: a writer's end, closed, lets it go
        os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        work.join(60)
        pytest.fail("the pipe was waited on")
    if isinstance(done[0], Exception):
        raise done[0]
    return done[0]
