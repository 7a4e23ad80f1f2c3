"""What a run is made of, built from its config: the model with its method and new head, the
optimiser's parameter groups, the cipher when this process encrypts, and the adapter's metadata.

Used by the loop (:mod:`ppvit.train.loop`) and by whatever must build the same model outside a
run (``reproduce``'s speed probe, ``benchmarks/bench_gpu.py``).
"""

from __future__ import annotations

from typing import Any

import torch

from ppvit._io import file_sha256
from ppvit.crypto.ciphers import BlockCipher, Scheme
from ppvit.crypto.keys import Key
from ppvit.data.manifest import Manifest
from ppvit.data.preprocess import Preprocess
from ppvit.models.adapters import AdapterMeta
from ppvit.models.backbones import create_backbone
from ppvit.models.methods import apply_method
from ppvit.models.transform import transform_model
from ppvit.train.config import TrainConfig


def build_model(cfg: TrainConfig, num_classes: int, cipher: BlockCipher | None = None) -> torch.nn.Module:
    """The backbone (same frozen weights on every call) with the method applied and a new head.

    Random draws (a random-init backbone, the new head, LoRA's A) come from the torch stream
    seeded with ``cfg.run.seed`` inside ``fork_rng``: reproducible, and the caller's stream
    is left as it was. With ``key_init`` (the key holder's case) the backbone is first
    transformed with the key, so training starts from a model exact on the encrypted images.
    """
    b = cfg.backbone
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(cfg.run.seed)
        model = create_backbone(
            b.model, num_classes=num_classes, pretrained=b.pretrained, weights=b.weights, img_size=b.img_size
        )
        model.reset_classifier(num_classes)
        if b.head_init == "zero":
            torch.nn.init.zeros_(model.head.weight)
            torch.nn.init.zeros_(model.head.bias)
        fused = b.fused_attn if b.fused_attn is not None else torch.cuda.is_available()
        for block in model.blocks:
            block.attn.fused_attn = fused
        if cfg.crypto.key_init:
            if cipher is None:
                raise ValueError("--key-init needs the key and an encrypting run (--key, a scheme, plain data)")
            transform_model(model, cipher.key, cipher.scheme, cipher.block_size)
        return apply_method(model, cfg.method)


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: no decay on 1-D tensors and embeddings; the patch embedding's own lr."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and not name.endswith(("pos_embed", "cls_token", "reg_token"))
        groups.setdefault(("patch_embed." in name, decay), []).append(p)
    o = cfg.optim
    return [
        {"params": ps, "lr": o.lr * (o.patch_embed_lr_scale if pe else 1.0), "weight_decay": o.weight_decay * decay}
        for (pe, decay), ps in sorted(groups.items())
    ]


def make_cipher(cfg: TrainConfig, block_size: int) -> BlockCipher | None:
    """The cipher when this process encrypts (it holds the key), else None."""
    if not cfg.crypto.encrypted:
        return None
    if cfg.crypto.key is None:
        raise ValueError("encrypting needs --key KEY (or data already encrypted with `ppvit encrypt`)")
    return BlockCipher(Key.load(cfg.crypto.key), Scheme.parse(cfg.crypto.scheme), block_size)


def run_fingerprint(cipher: BlockCipher | None, manifest: Manifest | None) -> str | None:
    """The key a run trains with, by fingerprint: its cipher's (it holds the key) or its ciphertext's manifest's."""
    if cipher is not None:
        return cipher.key.fingerprint
    return None if manifest is None else manifest.key_fingerprint


def adapter_meta(
    cfg: TrainConfig,
    classes: tuple[str, ...],
    cipher: BlockCipher | None,
    manifest: Manifest | None,
    preprocess: Preprocess | None = None,
) -> AdapterMeta:
    """What the adapter must remember: base model and input size, method, classes, the encryption (no key),
    and the input recipe (resize kernel, mean and std) it trained with."""
    scheme = block = None
    if cipher is not None:
        scheme, block = str(cipher.scheme), cipher.block_size
    elif manifest is not None:
        scheme, block = manifest.scheme, manifest.block_size
    b = cfg.backbone
    return AdapterMeta(
        model=b.model,
        num_classes=len(classes),
        method=cfg.method.to_dict(),
        model_kwargs={"img_size": b.img_size} if b.img_size else {},
        classes=list(classes),
        weights_sha256=file_sha256(b.weights) if b.weights else None,
        pretrained=bool(b.pretrained),
        init_seed=None if (b.weights or b.pretrained) else cfg.run.seed,
        scheme=scheme,
        block_size=block,
        key_fingerprint=run_fingerprint(cipher, manifest),
        key_init=cfg.crypto.key_init,
        preprocess=preprocess,
    )
