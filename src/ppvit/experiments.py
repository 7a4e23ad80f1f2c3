"""Things to look at and to run end to end: preview grids and the README's demo."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from ._io import atomic_write
from .adapters import merge_to_file
from .ciphers import BlockCipher
from .data import cache_dir, cifar10_path
from .dataset_io import decrypt_collection, encrypt_collection, iter_images
from .keys import Key
from .methods import param_report
from .train import TrainConfig, train

log = logging.getLogger(__name__)

PREVIEW_SCHEMES = ("shuffle", "scramble", "rotate", "negpos", "channel", "shuffle+scramble")


def sample_images(src: str | os.PathLike, n: int, size: int | None, prefix: str = "") -> list[np.ndarray]:
    """The first ``n`` decodable images of a source (under ``prefix``), resized to ``size``."""
    out = []
    for item in iter_images(src, select=(lambda r: r.startswith(prefix)) if prefix else None):
        if item.error is None:
            im = item.image if size is None else item.image.resize((size, size), Image.Resampling.BICUBIC)
            out.append(np.asarray(im))
        if len(out) == n:
            break
    if not out:
        raise ValueError(f"source {src}: no readable images" + (f" under {prefix}" if prefix else ""))
    return out


def preview_grid(
    images: list[np.ndarray], key: Key, schemes: tuple[str, ...], block_size: int, out: str | os.PathLike
) -> Path:
    """A PNG: one row of plain images, then one row per scheme, labelled, upscaled to >= 128 px."""
    h, w, _ = images[0].shape
    zoom = max(1, 128 // max(h, w))
    cell_w, cell_h, label_w, pad = w * zoom, h * zoom, 150, 4
    rows = [("plain", images)] + [(s, list(BlockCipher(key, s, block_size).encrypt(np.stack(images)))) for s in schemes]
    grid = Image.new("RGB", (label_w + len(images) * (cell_w + pad), len(rows) * (cell_h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (name, row) in enumerate(rows):
        y = r * (cell_h + pad)
        draw.text((4, y + cell_h // 2 - 6), name, fill="black")
        for c, im in enumerate(row):
            tile = Image.fromarray(im).resize((cell_w, cell_h), Image.Resampling.NEAREST)
            grid.paste(tile, (label_w + c * (cell_w + pad), y))
    out = Path(out)
    atomic_write(out, lambda tmp: grid.save(tmp, format="PNG"))
    return out


@dataclass
class DemoReport:
    images: int
    size: int
    block_size: int
    scheme: str
    encrypt_seconds: float
    decrypt_seconds: float
    round_trip_exact: bool
    failed: int
    out: Path

    def lines(self) -> list[str]:
        verdict = "bit-exact" if self.round_trip_exact else "MISMATCH"
        return [
            f"encrypted {self.images} CIFAR-10 test images at {self.size}x{self.size}, scheme {self.scheme}, "
            f"{self.block_size}x{self.block_size} blocks, in {self.encrypt_seconds:.1f} s "
            f"({self.images / self.encrypt_seconds:.0f} img/s, PNG output)",
            f"decrypted them in {self.decrypt_seconds:.1f} s; round trip against the resized originals: {verdict}",
            f"outputs in {self.out}: key (0600), encrypted/, decrypted/, preview.png",
        ]


def encryption_demo(
    data: str | os.PathLike, out: str | os.PathLike, n: int = 200, size: int = 224, block_size: int = 16
) -> DemoReport:
    """Encrypt, decrypt and verify ``n`` test images of the CIFAR-10 copy; write a preview.

    A throwaway key is created in ``out``; the run refuses an ``out`` that holds one already.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = Key.generate()
    key.save(out / "demo.key")
    cipher = BlockCipher(key, "shuffle", block_size)
    per_class = max(1, n // 10)
    counts: dict[str, int] = {}

    def select(rel: str) -> bool:  # the first n // 10 test images of each class folder
        parts = rel.split("/")
        if len(parts) != 3 or parts[0] != "test" or counts.get(parts[1], 0) >= per_class:
            return False
        counts[parts[1]] = counts.get(parts[1], 0) + 1
        return True

    originals = {
        Path(item.relpath).with_suffix(".png").as_posix(): np.asarray(
            item.image.resize((size, size), Image.Resampling.BICUBIC)
        )
        for item in iter_images(data, select)
        if item.error is None
    }
    chosen = {Path(rel).with_suffix("").as_posix() for rel in originals}
    enc = encrypt_collection(
        data,
        out / "encrypted",
        cipher,
        size=size,
        progress=False,
        select=lambda r: str(Path(r).with_suffix("")) in chosen,
    )
    dec = decrypt_collection(out / "encrypted", out / "decrypted", key, progress=False)
    decrypted = {item.relpath: np.asarray(item.image) for item in iter_images(out / "decrypted")}
    exact = decrypted.keys() == originals.keys() and all(np.array_equal(decrypted[r], originals[r]) for r in originals)
    preview_grid(sample_images(data, 6, size, "test/"), key, PREVIEW_SCHEMES, block_size, out / "preview.png")
    return DemoReport(
        enc.written + enc.skipped,
        size,
        block_size,
        "shuffle",
        enc.seconds,
        dec.seconds,
        exact,
        len(enc.failed) + len(dec.failed),
        out,
    )


# -- reproducing the paper's comparison ------------------------------------------------------------


@dataclass(frozen=True)
class Upstream:
    """Pretraining on plain images: the CPU stand-in for ImageNet weights.

    It uses part 0/2 of the training set and the fine-tuning cells part 1/2 (``data.take_part``:
    a fixed stratified split), so upstream and downstream never share an image.
    """

    epochs: int
    batch_size: int = 128
    lr: float = 1e-3
    train_subset: int | None = None


@dataclass(frozen=True)
class Preset:
    """One comparison: methods x data (plain, encrypted) x seeds, with shared settings."""

    name: str
    help: str
    model: str
    methods: tuple[str, ...]
    schemes: tuple[str, ...]  # "none" is plain images
    seeds: tuple[int, ...]
    train: dict = field(default_factory=dict)  # TrainConfig settings of every cell
    per_method: dict = field(default_factory=dict)  # method -> TrainConfig settings
    upstream: Upstream | None = None  # None: ImageNet weights (online, or --weights)
    paper: dict = field(default_factory=dict)  # method -> the paper's encrypted accuracy (%)


METHOD_LRS = {"full": {"lr": 5e-4}, "linear": {"lr": 5e-3}, "melo": {"lr": 2e-3}, "lora-pe": {"lr": 2e-3}}
# The new head per method (RESULTS.md, 3 seeds each): zero for the LoRA methods (with a random one, lora-pe on
# shuffled images swung 15 points with the seed), random for full (a zero one cost it 7 points on shuffled images).
CPU_TRAIN = dict(part="1/2", batch_size=128, warmup_epochs=0.5, val_fraction=0.1, head_init="zero")
CPU_METHODS = {
    **METHOD_LRS,
    "full": {"lr": 5e-4, "head_init": "random"},
    "lora-pe": {"lr": 2e-3, "patch_embed_lr_scale": 5.0},
}

PRESETS: dict[str, Preset] = {
    "paper": Preset(
        "paper",
        "timm ViT-B/16 with ImageNet weights, CIFAR-10 at 224x224, 16x16 pixel shuffling, MeLo rank 4 (needs a GPU)",
        "vit_base_patch16_224",
        ("full", "linear", "melo", "lora-pe"),
        ("none", "shuffle"),
        (0,),
        train=dict(epochs=5, batch_size=64, warmup_epochs=0.5, val_fraction=0.1),
        per_method={"full": {"lr": 1e-4}, "linear": {"lr": 1e-3}, "melo": {"lr": 1e-3}, "lora-pe": {"lr": 1e-3}},
        paper={"full": 96.16, "melo": 90.05, "lora-pe": 96.35},
    ),
    "cpu": Preset(
        "cpu",
        "ViT-Tiny geometry, 6 blocks, 4x4 patches on 32x32 CIFAR-10; pretrained here on half the training set",
        "vit_tiny_d6_patch4_32",
        ("full", "linear", "melo", "lora-pe"),
        ("none", "shuffle"),
        (0, 1, 2),
        train=dict(CPU_TRAIN, epochs=3, train_subset=6_000),
        per_method=CPU_METHODS,
        upstream=Upstream(epochs=6),  # sized for 60 minutes on 2 cores without fast bf16
    ),
    "demo": Preset(
        "demo",
        "a reduced cpu table (one seed, fewer images and epochs): the README's main job, about 13 minutes on 2 cores",
        "vit_tiny_d6_patch4_32",
        ("full", "linear", "melo", "lora-pe"),
        ("none", "shuffle"),
        (0,),
        train=dict(CPU_TRAIN, epochs=2, train_subset=4_000, test_subset=5_000),
        per_method=CPU_METHODS,
        upstream=Upstream(epochs=2),
    ),
}


def pretrain(model: str, upstream: Upstream, data: str | os.PathLike | None, quiet: bool = True) -> tuple[Path, dict]:
    """Train ``model`` on plain images of part 0/2 and cache it, keyed by its configuration.

    Returns the weights file (a plain timm state dict) and the upstream run's result
    (its test accuracy is the quality that decides whether a comparison means anything).
    """
    source = cifar10_path(data)
    ident = json.dumps([model, asdict(upstream), str(source.resolve()) if source else "cifar10"], sort_keys=True)
    run = cache_dir() / "pretrained" / f"{model}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"
    weights = run / "weights.safetensors"
    if not (weights.exists() and (run / "result.json").exists()):
        cfg = TrainConfig(
            out=str(run),
            data=str(source) if source else "cifar10",
            model=model,
            method="full",
            scheme="none",
            epochs=upstream.epochs,
            batch_size=upstream.batch_size,
            lr=upstream.lr,
            part="0/2",
            train_subset=upstream.train_subset,
            augment="crop-flip",
            warmup_epochs=1.0,
            quiet=quiet,
        )
        train(cfg, resume=(run / "config.yaml").exists())
        merge_to_file(run / "adapter", weights, None)
    return weights, json.loads((run / "result.json").read_text())


def cell_config(preset: Preset, method: str, scheme: str, seed: int, out: Path, key: Path, **common) -> dict:
    """The TrainConfig settings of one cell, as written to its YAML file."""
    cfg = {**preset.train, **preset.per_method.get(method, {}), **common}
    cfg.update(out=str(out), model=preset.model, method=method, scheme=scheme, seed=seed, quiet=True)
    cfg["key"] = str(key) if scheme != "none" else None
    return cfg


def run_cell(cfg: dict, cell: Path) -> dict:
    """Train one cell in its own process (its peak memory is its own; a crash stays its own)."""
    if (cell / "result.json").exists():
        return json.loads((cell / "result.json").read_text())
    cell.mkdir(parents=True, exist_ok=True)
    atomic_write(cell / "cell.yaml", lambda tmp: tmp.write_text(yaml.safe_dump(cfg, sort_keys=False)))
    args = [sys.executable, "-m", "ppvit.cli", "-q", "train", "--config", str(cell / "cell.yaml"), "--resume"]
    done = subprocess.run(args, capture_output=True, text=True)
    (cell / "stderr.log").write_text(done.stderr)
    if done.returncode != 0:
        last = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or ["no message"]
        return {"error": f"exit {done.returncode}: {last[0][:300]}"}
    return json.loads((cell / "result.json").read_text())


def reproduce(
    preset: Preset,
    out: str | os.PathLike,
    data: str | os.PathLike | None = None,
    key: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    pretrained: bool | None = None,
    overrides: dict | None = None,
    progress: bool = True,
) -> ResultTable:
    """Run every cell of ``preset`` (finished cells are skipped), then tabulate and plot."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key_path = Path(key) if key else out / "reproduce.key"
    if not key_path.exists():
        Key.generate().save(key_path)
    source = cifar10_path(data)
    common: dict = {"data": str(source) if source else "cifar10", **(overrides or {})}
    upstream_acc = None
    if preset.upstream is not None and weights is None:
        log.info("pretraining %s upstream (cached after the first run)", preset.model)
        weights, upstream = pretrain(preset.model, preset.upstream, data, quiet=not progress)
        upstream_acc = upstream["test_acc"]
    if weights is not None:
        common["weights"] = str(weights)
    elif pretrained if pretrained is not None else preset.upstream is None:
        common["pretrained"] = True
    cells = []
    for seed in preset.seeds:  # seed by seed: an interrupted run leaves whole tables of the first seeds
        for method in preset.methods:
            for scheme in preset.schemes:
                cell = out / "cells" / f"{method}-{scheme}-s{seed}"
                t0 = time.perf_counter()
                result = run_cell(cell_config(preset, method, scheme, seed, cell, key_path, **common), cell)
                log.info(
                    "%s %s seed %d: %s (%.0f s)",
                    method,
                    scheme,
                    seed,
                    result.get("error") or f"test acc {result['test_acc']:.4f}",
                    time.perf_counter() - t0,
                )
                cells.append({**result, "method": method, "scheme": scheme, "seed": seed})
    table = ResultTable.from_cells(preset, cells, upstream_acc)
    table.write(out)
    return table


@dataclass
class ResultRow:
    method: str
    data: str  # "plain" or the scheme
    seeds: int
    acc_mean: float | None
    acc_std: float | None
    trainable: int
    pct_of_full: float
    seconds: float | None
    images_per_s: float | None
    peak_mb: float | None
    paper: float | None = None
    errors: list[str] = field(default_factory=list)


@dataclass
class ResultTable:
    preset: str
    model: str
    upstream_acc: float | None
    rows: list[ResultRow]
    cells: list[dict]

    @classmethod
    def from_cells(cls, preset: Preset, cells: list[dict], upstream_acc: float | None) -> ResultTable:
        classes = next((c["num_classes"] for c in cells if "num_classes" in c), 10)
        counts = {r.method: r.trainable for r in param_report(preset.model, classes)}
        rows = []
        for method in preset.methods:
            for scheme in preset.schemes:
                group = [c for c in cells if c["method"] == method and c["scheme"] == scheme]
                ok = [c for c in group if "error" not in c]
                accs = np.array([100 * c["test_acc"] for c in ok])

                def mean(key: str, cells: list[dict] = ok) -> float | None:
                    vals = [c[key] for c in cells if c.get(key) is not None]
                    return float(np.mean(vals)) if vals else None

                rows.append(
                    ResultRow(
                        method,
                        "plain" if scheme == "none" else scheme,
                        len(ok),
                        float(accs.mean()) if len(ok) else None,
                        float(accs.std(ddof=1)) if len(ok) > 1 else None,
                        counts[method],
                        100 * counts[method] / counts["full"],
                        mean("train_seconds"),
                        mean("images_per_s"),
                        max((c["peak_rss_mb"] for c in ok if c.get("peak_rss_mb")), default=None),
                        preset.paper.get(method) if scheme != "none" else None,
                        [c["error"] for c in group if "error" in c],
                    )
                )
        return cls(preset.name, preset.model, upstream_acc, rows, cells)

    def markdown(self) -> str:
        def f(v: float | None, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        lines = [
            f"preset `{self.preset}`, model `{self.model}`"
            + (f", upstream (plain) test accuracy {100 * self.upstream_acc:.2f}%" if self.upstream_acc else ""),
            "",
            "| method | data | test acc. % (mean ± sd, n seeds) | paper % | trainable | M | 2^20 | % of full "
            "| train s | img/s | peak MB |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            acc = "failed" if r.acc_mean is None else f"{r.acc_mean:.2f} ± {f(r.acc_std, '.2f')} (n={r.seeds})"
            lines.append(
                f"| {r.method} | {r.data} | {acc} | {f(r.paper, '.2f')} | {r.trainable:,} | {r.trainable / 1e6:.3f} "
                f"| {r.trainable / 2**20:.2f} | {r.pct_of_full:.3f} | {f(r.seconds, '.0f')} "
                f"| {f(r.images_per_s, '.0f')} | {f(r.peak_mb, '.0f')} |"
            )
        errors = [f"- {r.method} / {r.data}: {e}" for r in self.rows for e in r.errors]
        return "\n".join(lines + (["", "Failed cells:", *errors] if errors else [])) + "\n"

    def write(self, out: Path) -> None:
        """results.md, results.csv, results.json and results.png, each written atomically."""
        atomic_write(out / "results.md", lambda tmp: tmp.write_text(self.markdown()))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=[k for k in asdict(self.rows[0]) if k != "errors"])
        writer.writeheader()
        for r in self.rows:
            writer.writerow({k: v for k, v in asdict(r).items() if k != "errors"})
        atomic_write(out / "results.csv", lambda tmp: tmp.write_text(buf.getvalue()))
        doc = json.dumps(asdict(self), indent=2, default=str) + "\n"
        atomic_write(out / "results.json", lambda tmp: tmp.write_text(doc))
        self.plot(out / "results.png")

    def plot(self, path: Path) -> None:
        """Accuracy against trainable parameters (log scale), plain and encrypted marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for data, marker in (("plain", "o"), *((d, "s") for d in {r.data for r in self.rows} - {"plain"})):
            rows = [r for r in self.rows if r.data == data and r.acc_mean is not None]
            ax.errorbar(
                [r.trainable for r in rows],
                [r.acc_mean for r in rows],
                yerr=[r.acc_std or 0 for r in rows],
                fmt=marker,
                capsize=3,
                label=data if data == "plain" else f"encrypted ({data})",
            )
            for r in rows:
                ax.annotate(r.method, (r.trainable, r.acc_mean), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set(
            xscale="log",
            xlabel="trainable parameters",
            ylabel="test accuracy (%)",
            title=f"ppvit reproduce --preset {self.preset} ({self.model})",
        )
        ax.legend()
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
        plt.close(fig)
