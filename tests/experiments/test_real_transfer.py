"""ImageNet ViT-Ti/16 weights at another input size: timm's resampling, exact transformation, presets.

Needs the weights file named by $PPVIT_WEIGHTS (the Makefile points it at ../shared/weights);
the preset wiring also needs the CIFAR-10 copy ($PPVIT_CIFAR10).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed

from ppvit import cli
from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key
from ppvit.models.backbones import create_backbone

TI = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def weights() -> Path:
    path = os.environ.get("PPVIT_WEIGHTS")
    if not path or not Path(path).is_file():
        pytest.skip("PPVIT_WEIGHTS does not name the ViT-Ti/16 weights file")
    return Path(path)


@pytest.fixture(scope="module")
def cifar() -> str:
    data = os.environ.get("PPVIT_CIFAR10")
    if not data:
        pytest.skip("PPVIT_CIFAR10 is not set")
    return data


def test_a_model_built_at_112_equals_timms_own_resampling_of_the_224_weights(weights: Path) -> None:
    built = create_backbone(TI, weights=weights, img_size=112).eval()
    state = load_file(str(weights))
    # independent of the loading path: timm's resampling function applied by hand to the 14x14 grid
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], (7, 7), num_prefix_tokens=1)
    by_hand = timm.create_model(TI, img_size=112).eval()
    by_hand.load_state_dict(state)
    assert built.pos_embed.shape == (1, 1 + 7 * 7, 192)
    x = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(built(x), by_hand(x), rtol=0, atol=0)


def test_transform_model_is_exact_at_112(tmp_path: Path, weights: Path) -> None:
    key_path = tmp_path / "k.key"
    Key.generate().save(key_path)
    out = tmp_path / "t.safetensors"
    args = ["transform-model", str(out), "--model", TI, "--weights", str(weights), "--key", str(key_path)]
    assert cli.main([*args, "--scheme", "shuffle+scramble", "--img-size", "112"]) == 0
    plain = create_backbone(TI, weights=weights, img_size=112).eval()
    keyed = create_backbone(TI, weights=out, img_size=112).eval()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)
    encrypted = BlockCipher(Key.load(key_path), "shuffle+scramble", 16).encrypt(images)

    def tensor(a: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5

    with torch.no_grad():
        torch.testing.assert_close(keyed(tensor(encrypted)), plain(tensor(images)), rtol=1e-5, atol=1e-4)
        assert not torch.allclose(plain(tensor(encrypted)), plain(tensor(images)), atol=1e-2)


@pytest.mark.parametrize("verb", ["params", "train"])
def test_an_input_size_that_is_not_a_multiple_of_the_patch_is_refused(
    verb: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([verb, "--model", TI, "--img-size", "100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ppvit {verb}: error: --img-size 100: not a multiple of {TI}'s patch size 16"]


def test_params_counts_the_position_embedding_at_the_chosen_size(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["params", "--model", TI, "--img-size", "112"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    # ViT-Ti/16: 5,717,416 with the 1000-class head and 197 position tokens; here 10 classes and 50 tokens
    assert int(rows["full"][1].replace(",", "")) == 5_717_416 - 1000 * 193 + 10 * 193 - (197 - 50) * 192
    assert int(rows["lora-pe"][1].replace(",", "")) == 12 * 2 * 4 * (192 + 192) + 768 * 192 + 192 + 10 * 193


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("/nonexistent/vit.safetensors", "weights file /nonexistent/vit.safetensors: not found"),
        ("DAMAGED", "cannot be read"),
        ("", "preset demo needs ImageNet weights for vit_tiny_patch16_224: set PPVIT_WEIGHTS"),
    ],
)
def test_missing_or_damaged_weights_give_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], value: str, message: str
) -> None:
    if value == "DAMAGED":
        value = str(tmp_path / "w.safetensors")
        Path(value).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    monkeypatch.setenv("PPVIT_WEIGHTS", value)
    assert cli.main(["-q", "reproduce", "--preset", "demo", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "--pretrained" in err[0], err
    assert not (tmp_path / "out" / "cells").exists()  # refused before any cell started


def test_a_run_at_another_size_is_rebuilt_at_that_size_by_later_commands(
    tmp_path: Path, toy_dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """vit_micro (4x4 patches, 32x32 by default) trained at 48x48: eval must rebuild it at 48."""
    key_path = tmp_path / "k.key"
    Key.generate().save(key_path)
    run = tmp_path / "run"
    args = ["-q", "train", "--model", "vit_micro_d2_patch4_32", "--img-size", "48", "--data", str(toy_dataset)]
    args += ["--key", str(key_path), "--out", str(run), "--epochs", "2", "--batch-size", "8", "--precision", "no"]
    assert cli.main([*args, "--val-fraction", "0.25", "--lr", "3e-3"]) == 0
    result = json.loads(capsys.readouterr().out)
    meta = json.loads((run / "adapter" / "ppvit_adapter.json").read_text())
    assert meta["model_kwargs"] == {"img_size": 48}
    assert load_file(str(run / "adapter" / "ppvit_adapter.safetensors"))["head.weight"].shape == (4, 48)
    assert cli.main(["eval", str(run), "--data", str(toy_dataset), "--key", str(key_path)]) == 0
    assert json.loads(capsys.readouterr().out)["acc"] == pytest.approx(result["test_acc"])


@pytest.mark.slow  # (minutes in all with the others: make test-slow)
@pytest.mark.data
@pytest.mark.parametrize(("preset", "side"), [("demo", 112), ("gpu", 224)])
def test_imagenet_presets_train_on_a_tiny_subset(
    tmp_path: Path, weights: Path, cifar: str, preset: str, side: int
) -> None:
    """The presets' wiring on 80 images: ImageNet ViT-Ti/16, 16x16 blocks, lora-pe's exact parameter count."""
    out = tmp_path / "out"
    args = ["-q", "reproduce", "--preset", preset, "--out", str(out), "--data", cifar, "--epochs", "1", "--seeds", "0"]
    args += ["--train-subset", "80", "--test-subset", "20", "--methods", "lora-pe", "--schemes", "shuffle"]
    assert cli.main([*args, "--set", "batch_size=8"]) == 0
    cell = out / "cells" / "lora-pe-shuffle-s0"
    result = json.loads((cell / "result.json").read_text())
    assert result["test_images"] == 20 and result["num_classes"] == 10
    assert result["trainable_params"] == 12 * 2 * 4 * (192 + 192) + 768 * 192 + 192 + 10 * 193
    meta = json.loads((cell / "adapter" / "ppvit_adapter.json").read_text())
    assert meta["block_size"] == 16 and meta["model"] == TI and meta["weights_sha256"] is not None
    assert meta["model_kwargs"] == {"img_size": side}
