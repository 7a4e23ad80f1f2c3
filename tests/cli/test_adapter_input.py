"""An adapter folder edited by hand, eval of a plain model on ciphertext, counts below 1 (hostile tester): each
was a traceback, or a number with exit 0."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_tools import toy_run
from conftest import SMALL, adapter_tensors, one_line_error, run_cli, write_adapter_tensors
from PIL import Image
from safetensors.torch import save_file

from ppvit.models.adapters import CONFIG_NAME, WEIGHTS_NAME


def edited(tmp_path: Path, change) -> Path:
    run = toy_run(tmp_path / "run", None, None, None)
    path = run / "adapter" / CONFIG_NAME
    doc = json.loads(path.read_text())
    doc = change(doc) or doc
    path.write_text(json.dumps(doc))
    return run


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda d: d.update(num_classes="4"), "damaged (num_classes '4': must be an integer)"),
        (lambda d: d.update(classes="abcd"), "damaged (classes 'abcd': must be a list of text or null)"),
        (lambda d: d.update(classes=d["classes"][:3]), "damaged (3 class names for 4 classes)"),
        (lambda d: d.update(classes=["a", "b", "a", "c"]), "damaged (a class is named twice)"),
        (lambda d: d.update(method="linear"), "damaged (method 'linear': must be a mapping of text to Any)"),
        (lambda d: d["method"].pop("method") and None, "method names its method"),
        (lambda d: d.update(model=5), "damaged (model 5: must be text)"),
        (lambda d: d.update(block_size="4"), "damaged (block_size '4': must be an integer or null)"),
        (lambda d: d.update(tensors_sha256="abc"), "damaged (tensors_sha256 is 64 hexadecimal digits)"),
        (lambda d: [1, 2], "damaged (not a JSON object)"),
        (lambda d: d.update(model_kwargs={"img_size": "abc"}), "damaged (model_kwargs img_size 'abc': must be a"),
        (lambda d: d["method"].update(method="melo", rank="x"), "damaged (method melo: rank 'x': must be an integer)"),
        (lambda d: d["method"].update(method="melo", dropout=2.0), "damaged (LoRA dropout must be in [0, 1), got 2.0)"),
        (lambda d: d.update(init_seed=2**70), "damaged (init_seed 1180591620717411303424: from -2**63 to 2**64 - 1)"),
        (lambda d: d.update(scheme="bogus"), "damaged (unknown scheme step 'bogus'"),
    ],
    ids=[
        "num_classes",
        "classes text",
        "classes short",
        "classes twice",
        "method text",
        "method unnamed",
        "model",
        "block",
        "sha256",
        "list",
        "img_size text",
        "rank text",
        "dropout 2",
        "seed 2**70",
        "scheme bogus",
    ],
)
def test_an_adapter_config_edited_by_hand_is_one_line_naming_it(tmp_path: Path, capsys, change, says: str) -> None:
    run = edited(tmp_path, change)
    image = tmp_path / "x.npy"
    np.save(image, np.zeros((32, 32, 3), np.uint8))
    one_line_error(["predict", run, image], capsys, f"adapter config {run / 'adapter' / CONFIG_NAME}: ", says)


def test_adapter_model_arguments_the_model_does_not_take_are_one_line(tmp_path: Path, capsys) -> None:
    """``model_kwargs: {"bogus": 1}`` was timm's TypeError traceback in predict, eval and merge (hostile tester)."""
    run = edited(tmp_path, lambda d: d.update(model_kwargs={"bogus": 1}))
    np.save(tmp_path / "x.npy", np.zeros((32, 32, 3), np.uint8))
    one_line_error(["predict", run, tmp_path / "x.npy"], capsys, f"model {SMALL}: ", "'bogus'")


def test_predict_writes_a_control_character_of_a_class_or_file_name_escaped(tmp_path: Path, capsys) -> None:
    """A class folder named with a newline printed predict's answer over two lines of its TSV (hostile tester)."""
    run = edited(tmp_path, lambda d: d.update(classes=["a\nb", "c\td", "e\u202ef", "g"]))
    (tmp_path / "in").mkdir()
    for name in ("x\ny.png", "plain.png"):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "in" / name)
    code, out, err = run_cli(["predict", run, tmp_path / "in"], capsys)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2 and all(len(line.split("\t")) == 3 for line in lines), err
    assert lines[1].startswith(str(tmp_path / "in" / "x\\ny.png") + "\t"), out
    assert {line.split("\t")[1] for line in lines} <= {"a\\nb", "c\\td", "e\\u202ef", "g"}


def test_adapter_tensors_holding_nan_are_refused(tmp_path: Path, capsys, toy_dataset: Path) -> None:
    """eval answered ``"loss": NaN`` (not JSON) and accuracy 0.25, every argmax class 0; predict ``class0 nan``."""
    run = toy_run(tmp_path / "run", None, None, None)
    tensors = adapter_tensors(run)
    name = sorted(tensors)[0]
    write_adapter_tensors(run / "adapter", {**tensors, name: torch.full_like(tensors[name], float("nan"))})
    one_line_error(["eval", run, "--data", toy_dataset], capsys, f"{name} holds NaN or infinite values")


def test_eval_prints_strict_json_when_a_finite_adapter_overflows(tmp_path: Path, capsys, toy_dataset: Path) -> None:
    """A head of finite 1e38 weights (passing the NaN check) made eval print ``"loss": NaN``, not JSON (hostile
    tester): the one JSON writer writes it as null."""
    run = toy_run(tmp_path / "run", None, None, None)
    tensors = adapter_tensors(run)
    write_adapter_tensors(run / "adapter", {**tensors, "head.weight": torch.full_like(tensors["head.weight"], 1e38)})
    code, out, err = run_cli(["eval", run, "--data", toy_dataset], capsys)
    assert code == 0, err
    result = json.loads(out, parse_constant=lambda word: pytest.fail(f"not strict JSON: {word}"))
    assert result["loss"] is None and 0 <= result["acc"] <= 1


def test_a_weights_file_swapped_in_from_another_run_is_refused(tmp_path: Path, capsys) -> None:
    """Another run's tensors of the same shapes loaded and answered as this adapter (hostile tester): the config
    records the SHA-256 of the file it was written with."""
    run = toy_run(tmp_path / "run", None, None, None)
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    assert run_cli(["predict", run, image], capsys)[0] == 0  # as written: it loads
    path = run / "adapter" / WEIGHTS_NAME
    save_file({n: t * 2 for n, t in adapter_tensors(run).items()}, str(path))
    one_line_error(
        ["predict", run, image], capsys, f"adapter weights {path}: not the file its {CONFIG_NAME} was written with"
    )


def test_an_adapter_of_an_earlier_release_without_a_hash_loads(tmp_path: Path, capsys) -> None:
    """Adapters written before the hash was recorded load as before (nothing to hold them to)."""
    run = toy_run(tmp_path / "run", None, None, None)
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    code, before, _ = run_cli(["predict", run, image], capsys)
    assert code == 0 and "x.png" in before
    config = run / "adapter" / CONFIG_NAME
    doc = json.loads(config.read_text())
    assert len(doc.pop("tensors_sha256")) == 64
    config.write_text(json.dumps(doc))
    assert run_cli(["predict", run, image], capsys)[1] == before


def test_eval_refuses_ciphertext_for_a_model_of_plain_images(
    tmp_path: Path, capsys, toy_dataset: Path, key_file: Path
) -> None:
    """It scored a plain model on ciphertext (exit 0, a number); predict already refused the same files."""
    run = toy_run(tmp_path / "run", None, None, None)
    shutil.copytree(toy_dataset / "test", tmp_path / "plain" / "test")
    argv = ["encrypt", tmp_path / "plain", tmp_path / "enc", "--key", key_file, "--block-size", "4"]
    assert run_cli(argv, capsys)[0] == 0
    one_line_error(["eval", run, "--data", tmp_path / "enc"], capsys, "but this model takes plain images")


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "RUN", "--data", "DATA", "--subset", "-1"],
        ["params", "--num-classes", "-5"],
        ["transform-model", "OUT.safetensors", "--key", "KEY", "--num-classes", "0"],
    ],
    ids=["eval --subset", "params --num-classes", "transform-model --num-classes"],
)
def test_counts_below_1_are_refused_by_the_parser(tmp_path: Path, capsys, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        run_cli([a.replace("RUN", str(tmp_path)) for a in argv], capsys)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "must be at least 1" in err, err


def test_resume_of_a_folder_with_no_run_says_so(tmp_path: Path, capsys) -> None:
    """It said "CIFAR-10 download failed": with no run there and no settings, the defaults' dataset was fetched."""
    one_line_error(
        ["train", "--resume", "--out", tmp_path / "empty"], capsys, "empty: no run to resume (no config.yaml"
    )
