"""ppvit's small ViTs live in timm's own registry: plain timm builds them, with the weights ppvit built before."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import timm.models._builder
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

import ppvit.models.backbones  # noqa: F401  (registers the small ViTs with timm)
from ppvit.models.backbones import SMALL_VITS, create_backbone, normalization


def test_plain_timm_builds_every_small_vit_after_import_ppvit() -> None:
    assert set(SMALL_VITS) <= set(timm.list_models("vit_*"))
    model = timm.create_model("vit_tiny_d6_patch4_32", num_classes=10)
    assert (len(model.blocks), model.embed_dim, model.patch_embed.patch_size, model.patch_embed.img_size) == (
        6,
        192,
        (4, 4),
        (32, 32),
    )
    assert normalization(model) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_registered_small_vits_initialise_exactly_as_timms_vit_tiny_with_the_same_arguments() -> None:
    """The registry must not change a random-init backbone: earlier runs rebuild it from their seed."""
    for name, (kwargs, _) in SMALL_VITS.items():
        torch.manual_seed(3)
        ours = create_backbone(name, num_classes=10)
        torch.manual_seed(3)
        theirs = timm.create_model("vit_tiny_patch16_224", num_classes=10, **kwargs)
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def _saved_small_vit(path: Path, num_classes: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    state = create_backbone("vit_micro_d2_patch4_32", num_classes=num_classes).state_dict()
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return state


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_local_weights_file_loads_without_timms_pretrained_loader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    """timm 1.0.29 sent a local safetensors file to ViT's JAX .npz reader (issue 30): ppvit reads the file itself."""

    def like_timm_1_0_29(*args: object, **kwargs: object) -> None:
        raise RuntimeError("VisionTransformer.load_pretrained() expected an original JAX/Flax NumPy .npz checkpoint")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", like_timm_1_0_29)
    state = _saved_small_vit(tmp_path / f"w{suffix}")
    same_head = create_backbone("vit_micro_d2_patch4_32", num_classes=4, weights=tmp_path / f"w{suffix}").state_dict()
    assert all(torch.equal(same_head[k], state[k]) for k in state)
    torch.manual_seed(9)
    new_head = create_backbone("vit_micro_d2_patch4_32", num_classes=7, weights=tmp_path / f"w{suffix}").state_dict()
    torch.manual_seed(9)
    fresh = create_backbone("vit_micro_d2_patch4_32", num_classes=7).state_dict()
    assert all(torch.equal(new_head[k], state[k]) for k in state if not k.startswith("head."))
    assert new_head["head.weight"].shape == (7, 48) and torch.equal(new_head["head.weight"], fresh["head.weight"])


@pytest.mark.parametrize(("written_as", "named"), [(".safetensors", "w.bin"), (".pth", "w.safetensors")])
def test_a_weights_file_is_read_by_its_content_not_its_name(tmp_path: Path, written_as: str, named: str) -> None:
    """A safetensors file saved as ``.bin`` was unpickled by torch: "cannot be read (KeyError: 53)"."""
    state = _saved_small_vit(tmp_path / f"w{written_as}")
    (tmp_path / f"w{written_as}").rename(tmp_path / named)
    loaded = create_backbone("vit_micro_d2_patch4_32", num_classes=4, weights=tmp_path / named).state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_weights_at_another_input_size_get_timms_resampled_position_embeddings(tmp_path: Path) -> None:
    state = _saved_small_vit(tmp_path / "w.safetensors")
    model = create_backbone("vit_micro_d2_patch4_32", num_classes=4, weights=tmp_path / "w.safetensors", img_size=48)
    by_hand = resample_abs_pos_embed(state["pos_embed"], (12, 12), num_prefix_tokens=1)  # 48 / 4 = 12 patches a side
    assert model.pos_embed.shape == (1, 1 + 12 * 12, 48)
    torch.testing.assert_close(model.pos_embed.detach(), by_hand, rtol=0, atol=0)


def test_weights_of_another_model_are_refused_in_one_line(tmp_path: Path) -> None:
    _saved_small_vit(tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match=r"w.safetensors: made for a different model \(embed dim 48 vs"):
        create_backbone("vit_tiny_d6_patch4_32", weights=tmp_path / "w.safetensors")
