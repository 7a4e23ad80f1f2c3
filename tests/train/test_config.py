"""The typed schema: one place per setting, flat names for flags, nested YAML, old flat files."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from conftest import SMALL

from ppvit import cli
from ppvit.models.configs import FullConfig, LoraPEConfig, MeloConfig
from ppvit.train.config import SECTIONS, TrainConfig, settings

# a config.yaml as ppvit 0.1 wrote it: flat, every field, method settings as None where unset
OLD_FLAT = {
    "out": "runs/old",
    "data": "data.tar.gz",
    "model": "vit_tiny_d6_patch4_32",
    "weights": None,
    "pretrained": False,
    "method": "melo",
    "rank": 8,
    "alpha": None,
    "lora_targets": "qkv",
    "train_pos_embed": False,
    "train_cls_token": False,
    "patch_embed_init": None,
    "head_init": "zero",
    "scheme": "shuffle",
    "key": "k.key",
    "block_size": None,
    "epochs": 3,
    "batch_size": 64,
    "lr": 0.002,
    "patch_embed_lr_scale": 1.0,
    "weight_decay": 0.05,
    "warmup_epochs": 0.5,
    "label_smoothing": 0.1,
    "clip_grad": 1.0,
    "grad_accum": 1,
    "precision": "auto",
    "augment": "none",
    "mixup": 0.0,
    "cutmix": 0.0,
    "val_fraction": 0.1,
    "part": "1/2",
    "train_subset": 6000,
    "test_subset": None,
    "key_init": False,
    "fused_attn": None,
    "seed": 2,
    "data_seed": None,
    "save_every_steps": None,
    "quiet": True,
}


def test_an_old_flat_config_file_loads_into_the_sections(tmp_path: Path) -> None:
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(OLD_FLAT))
    cfg = TrainConfig.load(tmp_path / "old.yaml")
    assert cfg.method == MeloConfig(rank=8, targets="qkv")
    assert (cfg.backbone.model, cfg.backbone.head_init, cfg.data.part, cfg.data.train_subset) == (
        "vit_tiny_d6_patch4_32",
        "zero",
        "1/2",
        6000,
    )
    assert (cfg.optim.lr, cfg.optim.batch_size, cfg.run.seed, cfg.crypto.key) == (0.002, 64, 2, "k.key")
    # every old setting has exactly one new home with the same value (renamed: lora_targets -> targets)
    flat = cfg.flat()
    for name, value in OLD_FLAT.items():
        new = {"lora_targets": "targets"}.get(name, name)
        if value is not None and new in flat:
            assert flat[new] == value, name


def test_nested_yaml_round_trips_and_names_unknown_settings(tmp_path: Path) -> None:
    cfg = TrainConfig.from_flat(model="vit_micro_d2_patch4_32", method="lora-pe", rank=2, lr=1e-2, img_size=48)
    (tmp_path / "c.yaml").write_text(cfg.dump())
    assert TrainConfig.load(tmp_path / "c.yaml") == cfg
    doc = yaml.safe_load(cfg.dump())
    assert (
        set(doc) == {*SECTIONS, "method"} and doc["method"]["name"] == "lora-pe" and doc["backbone"]["img_size"] == 48
    )
    doc["optim"]["learning_rate"] = 1
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match=r"bad.yaml: unknown settings optim.learning_rate"):
        TrainConfig.load(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="method full takes no rank"):
        TrainConfig.from_flat(method="full", rank=4)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("optim:\n  lr: [1\n", "not valid YAML (line 3, column 1: expected ',' or ']', but got '<stream end>')"),
        ("backbone: 5\n", "section backbone: 5 is not a mapping of settings"),
        ("optim: [1, 2]\n", "section optim: [1, 2] is not a mapping of settings"),
        ("backbone: 0\n", "section backbone: 0 is not a mapping of settings"),
        ("optim: ''\n", "section optim: '' is not a mapping of settings"),
        ("", "empty (no settings)"),  # a run's config.yaml emptied: --resume started a default run, a download
        ("learning_rate:\n", "unknown setting 'learning_rate'"),  # misspelt and left empty: ignored
        (
            "optim:\n  lr: 0.1\nbogus_setting: null\n",
            "unknown settings bogus_setting beside the sections (each belongs in one)",
        ),
    ],
    ids=["syntax", "section a number", "section a list", "section 0", "section empty text", "empty", "null", "beside"],
)
def test_a_config_file_that_is_not_settings_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, says: str
) -> None:
    """PyYAML's message took six lines quoting the file; ``backbone: 5`` said "'int' object is not iterable"."""
    (tmp_path / "c.yaml").write_text(text)
    assert cli.main(["-q", "train", "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert err == f"ppvit train: error: config file {tmp_path / 'c.yaml'}: {says}\n"


@pytest.mark.parametrize("method", ["method: melo\n", "method:\n", "method:\n  name: melo\n"])
def test_a_config_file_with_sections_names_its_method_either_way(tmp_path: Path, method: str) -> None:
    """`method: melo` beside sections was refused with "unknown settings  beside the sections", naming nothing."""
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 0.1\n" + method)
    cfg = TrainConfig.load(tmp_path / "c.yaml")
    assert cfg.optim.lr == 0.1 and cfg.method.name == ("lora-pe" if method == "method:\n" else "melo")


def test_no_setting_is_declared_twice_and_every_one_is_a_train_flag() -> None:
    names = [f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names))
    method_fields = {f.name for cls in (FullConfig, LoraPEConfig) for f in dataclasses.fields(cls)}
    assert not method_fields & set(names)  # rank, targets, train_pos_embed, ... live in the method only
    parser = cli.build_parser()
    train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    flags = {opt for action in train._actions for opt in action.option_strings}
    for s in settings():
        if s.name != "quiet":  # the global -q
            assert "--" + s.name.replace("_", "-") in flags, s.name
    assert {"--lora-targets", "--lora-dropout", "--dropout", "--img-size"} <= flags


def test_replace_keeps_alpha_following_the_rank_and_full_records_what_it_trains() -> None:
    cfg = TrainConfig.from_flat(method="melo", rank=8)
    assert cfg.replace(rank=2).method.lora_alpha == 2.0  # alpha unset: scale stays 1
    assert cfg.replace(alpha=16).replace(rank=2).method.lora_alpha == 16.0
    full = TrainConfig.from_flat(method="full").method
    assert full.train_patch_embed and full.train_pos_embed and full.train_cls_token
    # an adapter config of ppvit 0.1 recorded False for full; it still loads, as what full trains
    assert FullConfig(train_patch_embed=False).train_patch_embed


def test_reproduce_set_is_checked_against_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["reproduce", "--preset", "small-demo", "--set", "learning_rate=3"]) == 2
    assert "--set 'learning_rate=3': expected NAME=VALUE" in capsys.readouterr().err
    assert cli.main(["reproduce", "--preset", "small-demo", "--set", "method=full", "--set", "rank=8"]) == 2
    assert "method full takes no rank" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["full", "linear", "melo", "lora-pe"])
def test_defaults_are_the_documented_recipe(method: str) -> None:
    """Without flags a run trains the README's recipe: ImageNet ViT-Ti/16, the method's lr, head and PE rate."""
    cfg = TrainConfig.from_flat(method=method)
    recipe = {  # RESULTS.md / README, written out independently of MethodConfig.recipe
        "full": (1e-4, "random", 1.0),
        "linear": (1e-2, "zero", 1.0),
        "melo": (3e-3, "zero", 1.0),
        "lora-pe": (3e-3, "zero", 0.1),
    }[method]
    assert cfg.backbone.model == "vit_tiny_patch16_224"
    assert (cfg.optim.lr, cfg.backbone.head_init, cfg.optim.patch_embed_lr_scale) == recipe
    assert TrainConfig.from_flat(method=method, lr=0.5, head_init="random").optim.lr == 0.5  # flags still win


def test_unset_weights_resolve_to_a_stated_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tmp_path / "vit-ti.safetensors"
    weights.write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PPVIT_WEIGHTS", "vit-ti.safetensors")
    cfg = TrainConfig.from_flat(data=".", out="run").resolved()
    assert (cfg.backbone.weights, cfg.backbone.pretrained) == (str(weights), False)
    assert cfg.data.data == str(tmp_path) and cfg.run.out == str(tmp_path / "run")  # absolute: resumable anywhere
    assert f"from weights {weights}" in cfg.describe_start()
    monkeypatch.delenv("PPVIT_WEIGHTS")
    assert TrainConfig.from_flat().resolved().backbone.pretrained is True  # timm's download, said so
    assert "timm's pretrained weights" in TrainConfig.from_flat().resolved().describe_start()
    small = TrainConfig.from_flat(model="vit_micro_d2_patch4_32").resolved()
    assert small.backbone.pretrained is False and "random initialisation" in small.describe_start()
    monkeypatch.setenv("PPVIT_WEIGHTS", str(weights))
    other = TrainConfig.from_flat(model="vit_small_patch16_224").resolved()  # PPVIT_WEIGHTS is the default model's
    assert other.backbone.weights is None and other.backbone.pretrained is True


def test_train_help_states_each_default_once_and_per_method_where_it_differs(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse's line wrapping undone
    assert "default: None" not in text and "else the model's)" in text and "the model's) (default" not in text
    assert "--lr LR peak learning rate (AdamW) (default per method: full 0.0001, linear 0.01, melo 0.003" in text
    assert (
        "train the position embedding (default per method: full True, linear False, melo False, lora-pe False)" in text
    )
    assert "train the patch embedding (weight and bias) (default per method: full True" in text


@pytest.mark.parametrize("argv", [["-q", "train"], ["train", "-q"], ["train"]])
def test_quiet_goes_before_or_after_the_verb(argv: list[str]) -> None:
    assert cli.build_parser().parse_args(argv).quiet is ("-q" in argv)


def test_the_command_does_not_log_each_http_request(tmp_path: Path) -> None:
    import logging

    assert cli.main(["keygen", str(tmp_path / "k.key")]) == 0
    assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)  # `ppvit client` printed "HTTP Request: ..."
    assert not logging.getLogger("timm").isEnabledFor(logging.INFO)  # "Loading pretrained weights ..." per model


@pytest.mark.parametrize("spelling", ["", "none", "plain"])
def test_no_encryption_has_one_spelling(spelling: str) -> None:
    from ppvit.train.config import CryptoConfig

    crypto = CryptoConfig(scheme=spelling)
    assert crypto.scheme == "none" and not crypto.encrypted


def test_an_unset_scheme_is_settled_by_resolving_shuffle_without_a_pin_or_manifest() -> None:
    """None is "not given", as every flat setting: a key's pin or a manifest may settle it (tests/cli/test_pins.py)."""
    from ppvit.train.config import CryptoConfig

    assert CryptoConfig(scheme=None).scheme is None and CryptoConfig().encrypted
    assert TrainConfig.from_flat(scheme=None).resolved().crypto.scheme == "shuffle"
    assert TrainConfig.from_flat(scheme="Shuffle+Scramble").resolved().crypto.scheme == "shuffle+scramble"


def test_reproduce_set_reads_each_value_as_its_settings_type() -> None:
    """`--set precision=no` was read by YAML as false (and `lr=1e-3` as a string)."""
    from ppvit.cli.experiments import _parse_sets

    parsed = _parse_sets(["precision=no", "lr=1e-3", "rank=8", "key=none", "lora-targets=qkv", "key_init=true"])
    assert parsed == {"precision": "no", "lr": 1e-3, "rank": 8, "key": None, "targets": "qkv", "key_init": True}
    with pytest.raises(cli.common.UserError, match="rank takes int values"):
        _parse_sets(["rank=x"])


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("clip_grad", -1.0, "clip_grad -1.0: must be at least 0"),
        ("lr", 0.0, "lr 0.0: must be above 0"),
        ("epochs", 0, "epochs 0: must be at least 1"),
        ("val_fraction", 1.0, "val_fraction 1.0: must be at least 0 and below 1"),
        ("seed", -1, "seed -1: must be at least 0 and below 2**32"),
        ("log_every_steps", 0, "log_every_steps 0: must be at least 1"),  # was let in, as -3
    ],
)
def test_a_setting_out_of_its_range_is_refused_naming_it(name: str, value: float, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        TrainConfig.from_flat(**{name: value})


def test_clip_grad_0_turns_clipping_off() -> None:
    """Its help said "none to disable", which neither the flag (a float) nor YAML (null is the default) could say."""
    assert TrainConfig.from_flat(clip_grad=0.0).optim.clip_grad == 0.0
    assert TrainConfig.from_flat().optim.clip_grad == 1.0
    assert "0 to disable" in next(s.help for s in settings() if s.name == "clip_grad")


def test_a_diverging_run_is_one_line_and_exit_1(tmp_path: Path, toy_dataset: Path, key_file: Path, capsys) -> None:
    """Too high a learning rate ended in TrainingDiverged's traceback."""
    argv = ["-q", "train", "--model", SMALL, "--data", toy_dataset, "--key", key_file, "--out", tmp_path / "run"]
    argv += ["--method", "full", "--lr", "1e30", "--warmup-epochs", "0", "--epochs", "2", "--precision", "no"]
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("ppvit train: error: loss is ")
    assert len(err.strip().splitlines()) == 1, err


def test_a_path_with_bytes_that_are_not_utf8_is_a_setting_like_any_other() -> None:
    """Python decodes a file name's non-UTF-8 bytes to lone surrogates ('caf\\udce9'): a check refusing those
    in every settings read made Latin-1 folders untrainable and older run folders unreadable (second reader)."""
    cfg = TrainConfig.from_flat(data="caf\udce9/enc", out="runs/caf\udce9")
    assert TrainConfig.from_dict(cfg.to_dict()).data.data == "caf\udce9/enc"
