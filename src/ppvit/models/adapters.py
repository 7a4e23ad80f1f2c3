"""Adapters on disk: only what a method trained, as safetensors plus a JSON config.

An adapter folder holds ``ppvit_adapter.safetensors`` (the trained tensors under the
model's own parameter names, e.g. ``blocks.0.attn.qkv.lora_A.default.weight``,
``patch_embed.proj.weight``, ``head.weight``) and ``ppvit_adapter.json``, which names
the base model and how to rebuild it (input size included), the method and its settings,
the classes, and the encryption scheme, block size and key fingerprint (never the key).
For ViT-B/16 ``lora-pe`` that is 745,738 values against 85.8 M for the full model.

Folders of ppvit 0.3 and earlier hold the same two files under PEFT's names
(``adapter_config.json``, ``adapter_model.safetensors``) and still load; the names were
changed because PEFT cannot load these folders (docs/ARCHITECTURE.md, "Adapter format").
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load, save, save_file

from ppvit._io import atomic_write, atomic_write_bytes, atomic_write_text, file_sha256, read_json
from ppvit._schema import check_fields
from ppvit.crypto.ciphers import Scheme
from ppvit.data.preprocess import KERNEL, Preprocess
from ppvit.models.backbones import create_backbone, input_size, normalization
from ppvit.models.configs import MethodConfig, method_config
from ppvit.models.methods import apply_method, merge_adapters

CONFIG_NAME = "ppvit_adapter.json"
WEIGHTS_NAME = "ppvit_adapter.safetensors"
LEGACY_NAMES = ("adapter_config.json", "adapter_model.safetensors")  # PEFT's names, not PEFT's format
FORMAT_VERSION = 2  # 2: tensors_sha256 (a release reading 1 calls a 2 "not of format version 1", not "damaged")


def adapter_files(adapter_dir: str | os.PathLike) -> tuple[Path, Path]:
    """(config, weights) of an adapter folder: ppvit's names, or PEFT's names in a folder of an earlier release."""
    folder = Path(adapter_dir)
    if not (folder / CONFIG_NAME).exists() and (folder / LEGACY_NAMES[0]).exists():
        return folder / LEGACY_NAMES[0], folder / LEGACY_NAMES[1]
    return folder / CONFIG_NAME, folder / WEIGHTS_NAME


@dataclass
class AdapterMeta:
    """Everything needed to rebuild the model an adapter belongs to, and to check inputs."""

    model: str
    num_classes: int
    method: dict[str, Any]
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra ``create_backbone`` arguments
    classes: list[str] | None = None
    weights_sha256: str | None = None  # the local base weights file, when one was used
    pretrained: bool = False  # timm's downloadable weights
    init_seed: int | None = None  # random-init base: rebuilt under this torch seed
    scheme: str | None = None
    block_size: int | None = None
    key_fingerprint: str | None = None
    key_init: bool = False  # the frozen backbone was transformed with the key: its changed tensors are saved
    preprocess: Preprocess | None = None  # the input recipe it trained with (None: an earlier release's adapter)
    tensors_sha256: str | None = None  # of the weights file written beside it (None: an earlier release's adapter)

    def __post_init__(self) -> None:
        if isinstance(self.preprocess, dict):  # read from JSON
            self.preprocess = Preprocess.of(self.preprocess, "adapter config")

    def method_config(self) -> MethodConfig:
        opts = {k: v for k, v in self.method.items() if k != "method"}
        return method_config(self.method["method"], **opts)


KEYED_TENSORS = ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed")


def trainable_tensors(model: nn.Module, key_init: bool = False) -> dict[str, torch.Tensor]:
    """The parameters the method trains, by name, contiguous on the CPU; with ``key_init``
    also the frozen tensors the key transformation changed (they cannot be rebuilt without the key)."""
    return {
        n: p.detach().cpu().contiguous()
        for n, p in model.named_parameters()
        if p.requires_grad or (key_init and n in KEYED_TENSORS)
    }


def save_adapter(model: nn.Module, meta: AdapterMeta, out_dir: str | os.PathLike) -> Path:
    """Write the adapter folder; each file atomically, the config last (it marks completion) with the
    SHA-256 of the weights file, which ties the two together."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = trainable_tensors(model, meta.key_init)
    metadata = {"format": "ppvit-adapter", "method": meta.method["method"], "model": meta.model}
    data = save(tensors, metadata=metadata)
    atomic_write_bytes(out / WEIGHTS_NAME, data)
    meta = replace(meta, tensors_sha256=hashlib.sha256(data).hexdigest())
    doc = {"format": "ppvit-adapter", "version": FORMAT_VERSION, **asdict(meta)}
    atomic_write_text(out / CONFIG_NAME, json.dumps(doc, indent=2) + "\n")
    for name in LEGACY_NAMES:  # an earlier release's adapter here is replaced, not left beside the new one
        (out / name).unlink(missing_ok=True)
    return out


def read_adapter_meta(adapter_dir: str | os.PathLike) -> AdapterMeta:
    path = adapter_files(adapter_dir)[0]
    try:
        doc = read_json(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"adapter {adapter_dir}: no {CONFIG_NAME} (not an adapter folder?)") from None
    except (OSError, ValueError) as exc:  # JSON, or not UTF-8
        raise ValueError(f"adapter config {path}: cannot be read ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"adapter config {path}: damaged (not a JSON object)")
    if doc.pop("format", None) != "ppvit-adapter" or doc.pop("version", None) not in (1, FORMAT_VERSION):
        raise ValueError(f"adapter config {path}: not a ppvit adapter of format version 1 or {FORMAT_VERSION}")
    doc.pop("extra", None)  # an unused field of the first release: always empty
    if doc.get("pretrained", False) is None:  # written as null where the run left it to its default: not downloaded
        doc["pretrained"] = False
    try:
        meta = AdapterMeta(**doc)
        check_fields(meta)  # a field edited by hand: a traceback later (a class name, a method, the model)
        if meta.num_classes < 1 or not isinstance(meta.method.get("method"), str):
            raise ValueError("num_classes is at least 1, method names its method")
        if meta.classes is not None and len(meta.classes) != meta.num_classes:
            raise ValueError(f"{len(meta.classes)} class names for {meta.num_classes} classes")
        if meta.classes is not None and len(set(meta.classes)) != len(meta.classes):  # which one did it answer?
            raise ValueError("a class is named twice")
        if meta.block_size is not None and meta.block_size < 1:
            raise ValueError(f"block_size {meta.block_size}: at least 1")
        size = meta.model_kwargs.get("img_size", 1)
        if not (type(size) is int and size >= 1):  # other arguments: create_backbone's refusal names them
            raise ValueError(f"model_kwargs img_size {size!r}: must be a positive integer")
        if meta.init_seed is not None and not -(2**63) <= meta.init_seed < 2**64:  # torch.manual_seed's range
            raise ValueError(f"init_seed {meta.init_seed}: from -2**63 to 2**64 - 1")
        if meta.scheme not in (None, "none", "plain"):  # plain, as an earlier release may have written it
            Scheme.parse(meta.scheme)
        meta.method_config()  # the method's own checks (a rank of "x", a dropout of 2)
        if meta.tensors_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", meta.tensors_sha256):
            raise ValueError("tensors_sha256 is 64 hexadecimal digits")
    except (TypeError, ValueError) as exc:  # missing or unknown fields, a malformed recipe
        raise ValueError(f"adapter config {path}: damaged ({exc})") from None
    return meta


def read_adapter_tensors(adapter_dir: str | os.PathLike, meta: AdapterMeta) -> dict[str, torch.Tensor]:
    """The adapter's tensors, held to the SHA-256 its config recorded: another run's file of the same
    shapes, copied over this one, would otherwise load and answer with that run's model."""
    path = adapter_files(adapter_dir)[1]
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"adapter weights {path}: cannot be read ({exc.strerror or exc})") from None
    if meta.tensors_sha256 is not None and hashlib.sha256(data).hexdigest() != meta.tensors_sha256:
        raise ValueError(f"adapter weights {path}: not the file its {CONFIG_NAME} was written with (sha256 differs)")
    try:
        return load(data)
    except SafetensorError as exc:
        raise ValueError(f"adapter weights {path}: cannot be read ({exc})") from None


def adapter_preprocess(meta: AdapterMeta, model: nn.Module) -> Preprocess:
    """The input recipe of an adapter on ``model``: its own record, checked against the model, or for an
    adapter without one (written by an earlier release) the model's size, ppvit's kernel and timm's mean and std."""
    mean, std = normalization(model)
    own = Preprocess(input_size(model), KERNEL, mean, std)
    if meta.preprocess is None:
        return own
    meta.preprocess.check(replace(own, mean=None, std=None), f"adapter of {meta.model}")  # size and kernel
    if meta.preprocess.mean is None or len(meta.preprocess.mean) != len(mean):
        have = meta.preprocess.mean
        raise ValueError(f"adapter of {meta.model}: preprocess mean {have} does not fit {len(mean)} channels")
    return meta.preprocess


def build_base(meta: AdapterMeta, weights: str | os.PathLike | None = None) -> nn.Module:
    """The base model an adapter was trained on, checked against the adapter's record."""
    if meta.weights_sha256 is not None:
        if weights is None:
            raise ValueError(
                f"this adapter was trained on a local weights file (sha256 {meta.weights_sha256[:12]}); "
                "pass it with --weights"
            )
        if not Path(weights).is_file():
            raise FileNotFoundError(f"weights file {weights}: not found (the base weights this adapter was trained on)")
        if file_sha256(weights) != meta.weights_sha256:
            raise ValueError(f"weights file {weights}: not the base model this adapter was trained on (sha256 differs)")
    elif weights is not None and not meta.pretrained:  # a file may stand in for timm's download, not a random init
        raise ValueError(f"weights file {weights}: the adapter's base is a random-init {meta.model}; drop --weights")
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        if meta.init_seed is not None:  # a random-init base is rebuilt from the seed it was trained from
            torch.manual_seed(meta.init_seed)
        return create_backbone(
            meta.model, num_classes=meta.num_classes, pretrained=meta.pretrained, weights=weights, **meta.model_kwargs
        )


def load_adapter(
    adapter_dir: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    model_name: str | None = None,
    num_classes: int | None = None,
) -> tuple[nn.Module, AdapterMeta]:
    """Rebuild base model + method and load the adapter's tensors; outputs equal the trained model's.

    ``model_name``/``num_classes`` are the caller's expectations: a mismatch is an error.
    """
    meta = read_adapter_meta(adapter_dir)
    path = adapter_files(adapter_dir)[1]
    if model_name is not None and model_name != meta.model:
        raise ValueError(f"adapter {adapter_dir}: trained on {meta.model}, not {model_name}")
    if num_classes is not None and num_classes != meta.num_classes:
        raise ValueError(f"adapter {adapter_dir}: has {meta.num_classes} classes, not {num_classes}")
    model = apply_method(build_base(meta, weights), meta.method_config())
    tensors = read_adapter_tensors(adapter_dir, meta)
    expected = {n: p for n, p in model.named_parameters() if p.requires_grad or (meta.key_init and n in KEYED_TENSORS)}
    if set(tensors) != set(expected):
        diff = sorted(set(tensors) ^ set(expected))
        raise ValueError(f"adapter weights {path}: do not fit {meta.model} with {meta.method['method']} ({diff[:2]})")
    with torch.no_grad():
        for name, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():  # every prediction would be class 0
                raise ValueError(f"adapter weights {path}: {name} holds NaN or infinite values")
            if t.shape != expected[name].shape:
                raise ValueError(
                    f"adapter weights {path}: {name} is {tuple(t.shape)}, the model needs {tuple(expected[name].shape)}"
                )
            expected[name].copy_(t)
    return model, meta


def merge_to_file(adapter_dir: str | os.PathLike, out: str | os.PathLike, weights: str | os.PathLike | None) -> None:
    """Fold an adapter into a plain timm state dict (safetensors) for inference.

    The merged model's float32 outputs equal the adapter's within rtol = atol = 1e-5.
    """
    model, meta = load_adapter(adapter_dir, weights)
    state = {k: v.contiguous() for k, v in merge_adapters(model).state_dict().items()}
    info = {"format": "timm-state-dict", "model": meta.model, "merged_from": meta.method["method"]}
    if meta.key_fingerprint:
        info["key_fingerprint"] = meta.key_fingerprint
    atomic_write(out, lambda tmp: save_file(state, str(tmp), metadata=info))
