"""A newcomer's mistakes through the real CLI: exit 2 and one line naming the file and the problem;
eval, predict and merge find the base weights a run recorded."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SMALL, one_line_error, run_cli, train_config
from safetensors.torch import load_file, save_file

from ppvit import cli
from ppvit._io import file_sha256
from ppvit.models.adapters import CONFIG_NAME, AdapterMeta, load_adapter, save_adapter
from ppvit.models.backbones import create_backbone
from ppvit.models.configs import method_config
from ppvit.models.methods import apply_method

CLASSES = [f"class{c}" for c in range(4)]  # the toy dataset's


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, toy_dataset: Path) -> Path:
    """A run folder as `ppvit train` leaves it on a local base weights file (1000-class head, as ImageNet's):
    config.yaml recording that file, and a lora-pe adapter on plain images."""
    root = tmp_path_factory.mktemp("errors")
    base = root / "base.safetensors"
    torch.manual_seed(0)
    save_file(create_backbone(SMALL, num_classes=1000).state_dict(), str(base))
    torch.manual_seed(1)
    model = apply_method(create_backbone(SMALL, num_classes=4, weights=base), method_config("lora-pe"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    meta = AdapterMeta(
        model=SMALL,
        num_classes=4,
        method=method_config("lora-pe").to_dict(),
        classes=CLASSES,
        weights_sha256=file_sha256(base),
    )
    out = root / "run"
    save_adapter(model, meta, out / "adapter")
    (out / "config.yaml").write_text(train_config(out, toy_dataset, None, weights=str(base)).resolved().dump())
    return out


def test_a_file_that_is_no_key_is_called_so_whatever_its_mode(
    run: Path, toy_dataset: Path, tmp_path: Path, capsys
) -> None:
    image = next((toy_dataset / "test" / "class0").glob("*.png"))
    for not_a_key in (image, run / "adapter" / CONFIG_NAME):
        mistaken = tmp_path / not_a_key.name
        shutil.copy(not_a_key, mistaken)
        mistaken.chmod(0o644)
        err = one_line_error(
            ["predict", run, image, "--key", mistaken], capsys, f"key file {mistaken}: not a ppvit key"
        )
        assert "chmod" not in err


@pytest.mark.parametrize(
    "model, problem",
    [
        ("resnet50", "ppvit needs a timm VisionTransformer, got ResNet"),
        ("vit_no_such_model", "not a timm model name"),
    ],
)
def test_a_model_that_is_no_vit_names_where_to_find_names(
    model: str, problem: str, run: Path, key_file: Path, tmp_path: Path, capsys
) -> None:
    listing = "timm.list_models('vit_*')"
    one_line_error(["params", "--model", model], capsys, f"model {model}: {problem}", listing, SMALL)
    base = run.parent / "base.safetensors"
    transform = ["transform-model", tmp_path / "t.safetensors", "--weights", base, "--key", key_file]
    one_line_error([*transform, "--model", model], capsys, f"model {model}: {problem}", listing)


@pytest.mark.parametrize(
    "kwargs, drop, difference",
    [
        (dict(embed_dim=96), None, "embed dim 96 vs vit_micro_d2_patch4_32's 48"),
        (dict(depth=3), None, "3 blocks vs vit_micro_d2_patch4_32's 2"),
        (dict(mlp_ratio=2.0), None, "blocks.0.mlp.fc1.bias is (96,) vs vit_micro_d2_patch4_32's (192,)"),
        ({}, "blocks.1.norm1.bias", "1 of vit_micro_d2_patch4_32's tensors missing, e.g. blocks.1.norm1.bias"),
    ],
)
def test_weights_of_another_model_say_how_they_differ(
    kwargs: dict, drop: str | None, difference: str, key_file: Path, tmp_path: Path, capsys
) -> None:
    other = tmp_path / "other.safetensors"
    state = create_backbone(SMALL, num_classes=10, **kwargs).state_dict()
    save_file({k: v for k, v in state.items() if k != drop}, str(other))
    argv = ["transform-model", tmp_path / "t.safetensors", "--model", SMALL, "--weights", other, "--key", key_file]
    one_line_error(argv, capsys, f"weights file {other}: made for a different model ({difference})")


def test_a_missing_weights_file_is_named(run: Path, toy_dataset: Path, tmp_path: Path, capsys) -> None:
    image = next((toy_dataset / "test" / "class0").glob("*.png"))
    gone = tmp_path / "gone.safetensors"
    for argv in (["predict", run, image], ["eval", run, "--data", toy_dataset], ["merge", run, tmp_path / "m"]):
        err = one_line_error([*argv, "--weights", gone], capsys, f"weights file {gone}: not found")
        assert "Errno" not in err


def test_a_recorded_weights_file_that_is_gone_is_one_line(run: Path, toy_dataset: Path, tmp_path: Path, capsys) -> None:
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    config = moved / "config.yaml"
    config.write_text(config.read_text().replace(str(run.parent / "base.safetensors"), str(tmp_path / "gone.st")))
    for folder in (moved, moved / "adapter"):
        one_line_error(
            ["eval", folder, "--data", toy_dataset],
            capsys,
            f"weights file {tmp_path / 'gone.st'}: recorded in {config}",
        )


@pytest.mark.parametrize("folder", ["run", "adapter"])
def test_eval_predict_merge_take_either_folder_and_the_recorded_weights(
    folder: str, run: Path, toy_dataset: Path, tmp_path: Path, capsys
) -> None:
    given = run if folder == "run" else run / "adapter"
    base = run.parent / "base.safetensors"
    test_dir = toy_dataset / "test" / "class1"
    outputs = {}
    for weights in ([], ["--weights", base]):  # recorded, then explicit: the same answers
        code, out, err = run_cli(["eval", given, "--data", toy_dataset, *weights], capsys)
        assert code == 0, err
        code, predicted, err = run_cli(["predict", given, test_dir, *weights], capsys)  # a folder: its images
        assert code == 0, err
        merged = tmp_path / f"merged{len(weights)}.safetensors"
        code, _, err = run_cli(["merge", given, merged, *weights], capsys)
        assert code == 0, err
        outputs[len(weights)] = (json.loads(out), predicted, load_file(str(merged)))
    (evaluated, predicted, merged), explicit = outputs[0], outputs[2]
    assert evaluated == explicit[0] and evaluated["n"] == 32
    lines = [line.split("\t") for line in predicted.splitlines()]
    assert [f for f, _, _ in lines] == sorted(str(p) for p in test_dir.glob("*.png")) and predicted == explicit[1]
    assert all(cls in CLASSES for _, cls, _ in lines)
    assert merged.keys() == explicit[2].keys() and all(torch.equal(merged[k], explicit[2][k]) for k in merged)
    model, _ = load_adapter(run / "adapter", base)
    plain = create_backbone(SMALL, num_classes=4)
    plain.load_state_dict(merged)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-5)


def test_loading_a_base_for_a_new_head_logs_no_missing_head_keys(run: Path, caplog: pytest.LogCaptureFixture) -> None:
    """timm logs "Missing keys (head.weight, head.bias)" when it replaces a file's head; ppvit, which does that
    knowingly and loads the file itself, says in its own line that the head is new."""
    import timm

    base = run.parent / "base.safetensors"
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="timm")  # the command quiets timm: a CLI test run before may have
    timm.create_model(SMALL, num_classes=4, pretrained=True, pretrained_cfg_overlay=dict(file=str(base)))
    assert "Missing keys (head.weight, head.bias)" in caplog.text  # plain timm says it: the filter is needed
    caplog.clear()
    create_backbone(SMALL, num_classes=4, weights=base)
    load_adapter(run / "adapter", base)
    assert "Missing keys" not in caplog.text and "loaded into vit_micro_d2_patch4_32 with a new head" in caplog.text


def test_client_with_no_server_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It was a traceback (the client's ServerError escaped the command)."""
    pytest.importorskip("httpx")
    token = tmp_path / "t.token"
    token.write_text("x")
    token.chmod(0o600)
    code = cli.main(
        ["client", "predict", "a.png", "--server", "http://127.0.0.1:9", "--token-file", str(token), "--plain"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "127.0.0.1:9" in err[0]


def test_a_negative_time_budget_is_one_line(tmp_path: Path, capsys) -> None:
    one_line_error(["reproduce", "--out", tmp_path / "r", "--minutes", "-5"], capsys, "--minutes -5: must be 0")
    assert not (tmp_path / "r").exists()
