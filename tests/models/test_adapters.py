"""Adapters: only trained tensors on disk, identical outputs after loading, clear refusals, merge."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import KEY, SMALL, assert_no_key_material
from safetensors.torch import load_file, save_file

from ppvit import cli
from ppvit.models.adapters import (
    CONFIG_NAME,
    LEGACY_NAMES,
    WEIGHTS_NAME,
    AdapterMeta,
    load_adapter,
    merge_to_file,
    save_adapter,
)
from ppvit.models.backbones import create_backbone
from ppvit.models.configs import METHODS, method_config
from ppvit.models.methods import apply_method


def trained(method: str, seed: int = 3, weights: Path | None = None) -> tuple[torch.nn.Module, AdapterMeta]:
    """A model as training leaves it: base built under a seed, trained tensors moved."""
    torch.manual_seed(seed)
    model = apply_method(create_backbone(SMALL, num_classes=5, weights=weights), method_config(method))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    meta = AdapterMeta(
        model=SMALL,
        num_classes=5,
        method=method_config(method).to_dict(),
        classes=list("abcde"),
        init_seed=None if weights else seed,
        weights_sha256=None,
        scheme="shuffle",
        block_size=4,
        key_fingerprint=KEY.fingerprint,
    )
    return model.eval(), meta


@pytest.mark.parametrize("method", list(METHODS))
def test_save_load_gives_identical_outputs(tmp_path: Path, method: str) -> None:
    model, meta = trained(method)
    save_adapter(model, meta, tmp_path / "a")
    loaded, meta2 = load_adapter(tmp_path / "a")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.eval()(x), model(x))
    written = (tmp_path / "a" / WEIGHTS_NAME).read_bytes()
    assert meta2 == replace(meta, tensors_sha256=hashlib.sha256(written).hexdigest())  # recorded beside the rest
    stored = load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    assert set(stored) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_adapter_holds_only_trained_tensors_and_no_key(tmp_path: Path) -> None:
    model, meta = trained("lora-pe")
    save_adapter(model, meta, tmp_path / "a")
    n_values = sum(t.numel() for t in load_file(str(tmp_path / "a" / WEIGHTS_NAME)).values())
    d, r, depth = 48, 4, 2
    assert n_values == depth * 4 * r * d + (4 * 4 * 3 * d + d) + (d * 5 + 5)
    config = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert config["key_fingerprint"] == KEY.fingerprint and config["method"]["method"] == "lora-pe"
    assert_no_key_material(tmp_path / "a", KEY)


def test_vit_b16_lora_pe_adapter_is_about_3_mb(tmp_path: Path) -> None:
    """745,738 float32 values: about 3 MB, against about 343 MB for the full model's 85.8 M."""
    model = apply_method(create_backbone("vit_base_patch16_224", num_classes=10), method_config("lora-pe"))
    meta = AdapterMeta(model="vit_base_patch16_224", num_classes=10, method=method_config("lora-pe").to_dict())
    save_adapter(model, meta, tmp_path / "a")
    size = (tmp_path / "a" / WEIGHTS_NAME).stat().st_size
    assert 745_738 * 4 < size < 745_738 * 4 + 20_000  # the values plus a small header


def test_refuses_mismatched_model_and_classes(tmp_path: Path) -> None:
    model, meta = trained("melo")
    save_adapter(model, meta, tmp_path / "a")
    with pytest.raises(ValueError, match="trained on vit_micro_d2_patch4_32, not vit_tiny_d6_patch4_32"):
        load_adapter(tmp_path / "a", model_name="vit_tiny_d6_patch4_32")
    with pytest.raises(ValueError, match="has 5 classes, not 10"):
        load_adapter(tmp_path / "a", num_classes=10)


def test_refuses_a_different_base_weights_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = create_backbone(SMALL, num_classes=5)
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    from ppvit._io import file_sha256

    model, meta = trained("melo", weights=tmp_path / "base.safetensors")
    meta.weights_sha256 = file_sha256(tmp_path / "base.safetensors")
    save_adapter(model, meta, tmp_path / "a")
    loaded, _ = load_adapter(tmp_path / "a", weights=tmp_path / "base.safetensors")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.eval()(x), model(x))
    torch.manual_seed(1)
    save_file(create_backbone(SMALL, num_classes=5).state_dict(), str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not the base model this adapter was trained on"):
        load_adapter(tmp_path / "a", weights=tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="pass it with --weights"):
        load_adapter(tmp_path / "a")


def test_refuses_tensors_of_another_method(tmp_path: Path) -> None:
    model, meta = trained("melo")
    save_adapter(model, meta, tmp_path / "a")
    config = tmp_path / "a" / CONFIG_NAME
    doc = json.loads(config.read_text())
    doc["method"] = method_config("lora-pe").to_dict()
    config.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="do not fit"):
        load_adapter(tmp_path / "a")


def test_refuses_a_weights_file_for_a_random_init_base(tmp_path: Path) -> None:
    model, meta = trained("melo")
    save_adapter(model, meta, tmp_path / "a")
    save_file(create_backbone(SMALL, num_classes=5).state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match=r"w\.safetensors: the adapter's base is a random-init"):
        load_adapter(tmp_path / "a", weights=tmp_path / "w.safetensors")


def test_damaged_config_is_a_one_line_error_naming_the_file(tmp_path: Path) -> None:
    model, meta = trained("melo")
    save_adapter(model, meta, tmp_path / "a")
    config = tmp_path / "a" / CONFIG_NAME
    doc = json.loads(config.read_text())
    del doc["num_classes"]
    config.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"ppvit_adapter\.json: damaged") as err:
        load_adapter(tmp_path / "a")
    assert "\n" not in str(err.value)


def test_model_kwargs_rebuild_the_base(tmp_path: Path) -> None:
    """A timm name plus create_backbone arguments (here 16x16 patches on 32x32 inputs, 1 block)."""
    kwargs = dict(img_size=32, depth=1, embed_dim=48, num_heads=3)
    torch.manual_seed(4)
    model = apply_method(create_backbone("vit_tiny_patch16_224", num_classes=3, **kwargs), method_config("lora-pe"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    meta = AdapterMeta(
        model="vit_tiny_patch16_224",
        num_classes=3,
        method=method_config("lora-pe").to_dict(),
        model_kwargs=kwargs,
        init_seed=4,
    )
    save_adapter(model, meta, tmp_path / "a")
    loaded, meta2 = load_adapter(tmp_path / "a")
    x = torch.randn(2, 3, 32, 32)
    assert replace(meta2, tensors_sha256=None) == meta and loaded.patch_embed.patch_size == (16, 16)
    assert torch.equal(loaded.eval()(x), model.eval()(x))


@pytest.mark.parametrize("method", list(METHODS))
def test_merge_to_file_gives_a_plain_model_with_equal_outputs(tmp_path: Path, method: str) -> None:
    model, meta = trained(method)
    save_adapter(model, meta, tmp_path / "a")
    merge_to_file(tmp_path / "a", tmp_path / "m.safetensors", None)
    plain = create_backbone(SMALL, num_classes=5)
    plain.load_state_dict(load_file(str(tmp_path / "m.safetensors")))  # strict: timm keys only
    assert type(plain.blocks[0].attn.qkv) is torch.nn.Linear
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain.eval()(x), model(x), rtol=1e-5, atol=1e-5)
    assert_no_key_material(tmp_path / "m.safetensors", KEY)


def test_merge_cli_writes_a_plain_timm_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, meta = trained("lora-pe")
    save_adapter(model, meta, tmp_path / "a")
    assert cli.main(["merge", str(tmp_path / "a"), str(tmp_path / "m.safetensors")]) == 0
    plain = create_backbone(SMALL, num_classes=5)
    plain.load_state_dict(load_file(str(tmp_path / "m.safetensors")))  # strict: timm keys only
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain.eval()(x), model(x), rtol=1e-5, atol=1e-5)
    assert cli.main(["merge", str(tmp_path / "a"), str(tmp_path / "m.safetensors")]) == 2  # no overwrite
    printed = capsys.readouterr()
    assert_no_key_material([tmp_path / "m.safetensors", printed.out, printed.err], KEY)


def test_merge_to_file_of_missing_adapter_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not an adapter folder"):
        merge_to_file(tmp_path, tmp_path / "m.safetensors", None)


def as_earlier_release(folder: Path) -> None:
    """ppvit 0.3 wrote the same two files under PEFT's names (the contents are unchanged, format version 1)."""
    for new, old in zip((CONFIG_NAME, WEIGHTS_NAME), LEGACY_NAMES, strict=True):
        (folder / new).rename(folder / old)


@pytest.mark.parametrize("method", ["melo", "lora-pe"])
def test_an_adapter_folder_of_an_earlier_release_still_loads(tmp_path: Path, method: str) -> None:
    from ppvit.train.runs import adapter_dir

    model, meta = trained(method)
    save_adapter(model, meta, tmp_path / "run" / "adapter")
    as_earlier_release(tmp_path / "run" / "adapter")
    assert adapter_dir(tmp_path / "run") == tmp_path / "run" / "adapter"  # a run folder of 0.3 is still found
    loaded, meta2 = load_adapter(tmp_path / "run" / "adapter")
    x = torch.randn(2, 3, 32, 32)
    assert replace(meta2, tensors_sha256=None) == meta and torch.equal(loaded.eval()(x), model(x))
    merge_to_file(tmp_path / "run" / "adapter", tmp_path / "m.safetensors", None)
    plain = create_backbone(SMALL, num_classes=5)
    plain.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    torch.testing.assert_close(plain.eval()(x), model(x), rtol=1e-5, atol=1e-5)
    save_adapter(model, meta, tmp_path / "run" / "adapter")  # rewritten (a resumed run): one adapter, ppvit's names
    assert sorted(p.name for p in (tmp_path / "run" / "adapter").iterdir()) == sorted((CONFIG_NAME, WEIGHTS_NAME))


def test_peft_does_not_take_a_ppvit_adapter_for_its_own(tmp_path: Path) -> None:
    """PEFT cannot load these folders (q/v LoRA on a fused qkv, bare parameters, full and linear); under PEFT's
    names it failed obscurely (KeyError 'peft_type'); now it says at once there is no PEFT adapter."""
    import peft

    model, meta = trained("lora-pe")
    save_adapter(model, meta, tmp_path / "a")
    with pytest.raises(ValueError, match=r"Can't find 'adapter_config\.json'"):
        peft.PeftConfig.from_pretrained(str(tmp_path / "a"))


def test_the_input_recipe_is_recorded_and_an_adapter_without_one_takes_timms(tmp_path: Path) -> None:
    from dataclasses import replace

    from ppvit.data.preprocess import KERNEL, Preprocess
    from ppvit.models.adapters import adapter_preprocess, read_adapter_meta

    model, meta = trained("melo")
    recipe = Preprocess(32, KERNEL, (0.25, 0.5, 0.75), (0.1, 0.2, 0.3))
    save_adapter(model, replace(meta, preprocess=recipe), tmp_path / "a")
    doc = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert doc["preprocess"] == {"size": 32, "kernel": KERNEL, "mean": [0.25, 0.5, 0.75], "std": [0.1, 0.2, 0.3]}
    assert adapter_preprocess(read_adapter_meta(tmp_path / "a"), model) == recipe  # its own record, not timm's
    del doc["preprocess"]  # an adapter of an earlier release: timm's config, as before
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(doc))
    timms = Preprocess(32, KERNEL, (0.5,) * 3, (0.5,) * 3)
    assert adapter_preprocess(read_adapter_meta(tmp_path / "a"), model) == timms
    for other, words in (({"kernel": "pil-bilinear"}, "kernel is pil-bilinear"), ({"size": 224}, "size is 224")):
        bad = replace(meta, preprocess=replace(recipe, **other))
        with pytest.raises(ValueError, match=words):
            adapter_preprocess(bad, model)
    doc["preprocess"] = {"size": 32, "kernel": KERNEL, "mean": [0.5] * 3, "std": [0.0] * 3}
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=f"adapter config {tmp_path / 'a' / CONFIG_NAME}: damaged .*std"):
        read_adapter_meta(tmp_path / "a")
