"""Training end to end on a toy dataset: learning on ciphertext, resume after SIGKILL, NaN stop, precision.

Two processes: see test_distributed.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import SMALL, adapter_tensors, assert_no_key_material, train_config, train_flags

from ppvit import cli
from ppvit.crypto.keys import Key
from ppvit.data.manifest import read_manifest, write_manifest
from ppvit.data.preprocess import Preprocess
from ppvit.models.backbones import create_backbone, normalization
from ppvit.train import loop as ppvit_train
from ppvit.train import runtime
from ppvit.train import session as ppvit_session
from ppvit.train.config import TrainConfig
from ppvit.train.loop import TrainingDiverged, train
from ppvit.train.runtime import resolve_precision


def shuffle_reference(images: np.ndarray, key: Key, p: int) -> np.ndarray:
    """Pixel shuffling written from its definition, without ppvit's ciphers: the values of each
    p x p x 3 block, flattened in (row, column, channel) order, permuted by the key's permutation."""
    n, h, w, c = images.shape
    perm = key.permutation(f"ppvit/v1/shuffle/p={p}/c={c}", p * p * c)
    blocks = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h // p, w // p, -1)
    return blocks[..., perm].reshape(n, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)


@pytest.fixture
def first_train_batch(monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """Records the first training batch: the plain uint8 images drawn, and the tensor the model is given."""
    seen: dict[str, torch.Tensor] = {}
    real_get_batch, real_build_model = ppvit_train.get_batch, ppvit_session.build_model

    def get_batch(*args, **kwargs):
        images, labels = real_get_batch(*args, **kwargs)
        seen.setdefault("plain", images.clone())
        return images, labels

    def build_model(*args, **kwargs):
        model = real_build_model(*args, **kwargs)

        def record(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if module.training:  # not validation
                seen.setdefault("input", inputs[0].detach().clone())

        model.register_forward_pre_hook(record)
        return model

    monkeypatch.setattr(ppvit_train, "get_batch", get_batch)
    monkeypatch.setattr(ppvit_session, "build_model", build_model)
    return seen


@pytest.mark.parametrize("method", ["full", "linear", "melo", "lora-pe"])
def test_each_method_learns_on_encrypted_data(
    tmp_path: Path, toy_dataset: Path, key_file: Path, method: str, first_train_batch: dict[str, torch.Tensor]
) -> None:
    result = train(train_config(tmp_path / "run", toy_dataset, key_file, method=method, epochs=4))
    assert result.test_acc > 0.5, result  # 4 classes: chance is 0.25

    # what the model learnt from was ciphertext: the first batch it was given is the independently
    # computed shuffle of the images drawn (normalised), and not those images themselves
    plain = first_train_batch["plain"].numpy()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in normalization(create_backbone(SMALL, num_classes=4)))
    seen = first_train_batch["input"] * std + mean  # back to [0, 1]
    ciphertext = torch.from_numpy(shuffle_reference(plain, Key.load(key_file), 4)).permute(0, 3, 1, 2) / 255
    as_plain = torch.from_numpy(plain).permute(0, 3, 1, 2) / 255
    assert seen.shape == (8, 3, 32, 32)
    changed = float(((seen - as_plain).abs() > 1e-3).float().mean())
    assert changed > 0.5, f"the model was given the plain images ({changed:.0%} of values changed): not encrypted"
    torch.testing.assert_close(seen, ciphertext, rtol=0, atol=1e-5)

    run = tmp_path / "run"
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert (run / "curves.png").stat().st_size > 0
    meta = json.loads((run / "adapter" / "ppvit_adapter.json").read_text())
    assert meta["scheme"] == "shuffle" and meta["key_fingerprint"] == Key.load(key_file).fingerprint
    assert yaml.safe_load((run / "config.yaml").read_text())["method"]["name"] == method
    assert result.precision == "no"
    assert_no_key_material(run, Key.load(key_file))


@pytest.mark.parametrize(
    ("cuda", "cuda_bf16", "speedup", "expected"),
    [(False, False, 2.6, "bf16"), (False, False, 0.5, "no"), (True, True, 0.5, "bf16"), (True, False, 2.6, "fp16")],
)
def test_auto_precision_takes_bf16_only_where_it_is_fast(
    monkeypatch: pytest.MonkeyPatch, cuda: bool, cuda_bf16: bool, speedup: float, expected: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: cuda_bf16)
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: speedup)
    assert resolve_precision("auto") == expected
    assert resolve_precision("fp16") == "fp16" and resolve_precision("no") == "no"


def test_cpu_bf16_speedup_is_fp32_time_over_bf16_time_best_of_reps(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock that each matrix multiply moves on by a set time per dtype: warm-up, then the reps.

    Best of 3: fp32 2.0 s, bf16 0.25 s, so 8.0 exactly; counting the warm-ups would give 2.0,
    the inverse 0.125, means 5.14, medians 6.0.
    """
    durations = {torch.float32: [0.125, 3.0, 2.0, 4.0], torch.bfloat16: [0.0625, 1.0, 0.25, 0.5]}
    clock = [100.0]

    def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        assert a.dtype == b.dtype and a.shape == b.shape == (16, 16)
        clock[0] += durations[a.dtype].pop(0)
        return a

    monkeypatch.setattr(torch.Tensor, "__matmul__", matmul)
    monkeypatch.setattr(runtime, "time", type("FakeTime", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    assert runtime.cpu_bf16_speedup.__wrapped__(n=16, reps=3) == 8.0
    assert durations == {torch.float32: [], torch.bfloat16: []}  # one warm-up and 3 timed multiplies per dtype


def test_cpu_bf16_speedup_measures_a_real_matmul() -> None:
    ratio = runtime.cpu_bf16_speedup.__wrapped__(n=64, reps=2)
    assert np.isfinite(ratio) and ratio > 0


def test_eval_and_predict_reproduce_the_run(tmp_path: Path, toy_dataset: Path, key_file: Path, capsys) -> None:
    result = train(train_config(tmp_path / "run", toy_dataset, key_file))
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "run"), "--data", str(toy_dataset), "--key", str(key_file)]) == 0
    printed = [capsys.readouterr()]
    evaluated = json.loads(printed[0].out)
    assert evaluated["acc"] == pytest.approx(result.test_acc) and evaluated["n"] == 32
    assert cli.main(["eval", str(tmp_path / "run"), "--data", str(toy_dataset)]) == 2  # no key: refused
    printed.append(capsys.readouterr())
    files = sorted(str(p) for p in (toy_dataset / "test" / "class2").glob("*.png"))[:3]
    assert cli.main(["predict", str(tmp_path / "run"), *files, "--key", str(key_file)]) == 0
    printed.append(capsys.readouterr())
    lines = printed[-1].out.strip().splitlines()
    assert len(lines) == 3 and all(line.split("\t")[0] in files for line in lines)
    assert_no_key_material([tmp_path / "run", *(p.out + p.err for p in printed)], Key.load(key_file))


def test_key_init_adapter_reloads_with_its_transformed_backbone(
    tmp_path: Path, toy_dataset: Path, key_file: Path, capsys
) -> None:
    result = train(train_config(tmp_path / "run", toy_dataset, key_file, scheme="shuffle+scramble", key_init=True))
    meta = json.loads((tmp_path / "run" / "adapter" / "ppvit_adapter.json").read_text())
    assert meta["key_init"] and "pos_embed" in adapter_tensors(tmp_path / "run")
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "run"), "--data", str(toy_dataset), "--key", str(key_file)]) == 0
    printed = capsys.readouterr()
    assert json.loads(printed.out)["acc"] == pytest.approx(result.test_acc)
    assert_no_key_material([tmp_path / "run", printed.out, printed.err], Key.load(key_file))
    with pytest.raises(ValueError, match="--key-init needs the key"):
        train(train_config(tmp_path / "plain", toy_dataset, None, scheme="none", key_init=True))


def test_plain_training_needs_no_key(tmp_path: Path, toy_dataset: Path) -> None:
    result = train(train_config(tmp_path / "run", toy_dataset, None, scheme="none", augment="crop-flip"))
    assert result.scheme == "plain" and result.test_acc > 0.5


def test_training_on_data_encrypted_on_disk(tmp_path: Path, toy_dataset: Path, key_file: Path) -> None:
    enc = tmp_path / "enc"
    assert cli.main(["-q", "encrypt", str(toy_dataset), str(enc), "--key", str(key_file), "--block-size", "4"]) == 0
    result = train(train_config(tmp_path / "run", enc, None, mixup=0.2, cutmix=1.0))
    assert result.test_acc > 0.5
    with pytest.raises(ValueError, match="does not commute"):
        train(train_config(tmp_path / "run2", enc, None, augment="crop-flip"))
    with pytest.raises(ValueError, match="records scheme shuffle, not shuffle\\+scramble"):
        train(train_config(tmp_path / "run3", enc, None, scheme="shuffle+scramble"))
    manifest = read_manifest(enc)
    manifest.preprocess = Preprocess(32, "pil-bilinear", None, None)  # resized by another kernel than ppvit's
    write_manifest(enc, manifest)
    with pytest.raises(ValueError, match="preprocess kernel is pil-bilinear, not torch-bicubic"):
        train(train_config(tmp_path / "run4", enc, None))
    assert_no_key_material([enc, tmp_path / "run"], Key.load(key_file))


def test_run_folder_is_not_reused_by_accident(tmp_path: Path, toy_dataset: Path, key_file: Path) -> None:
    cfg = train_config(tmp_path / "run", toy_dataset, key_file, epochs=1)
    train(cfg)
    with pytest.raises(ValueError, match="already holds a run"):
        train(cfg)
    with pytest.raises(ValueError, match="different settings \\(lr\\)"):
        train(train_config(tmp_path / "run", toy_dataset, key_file, epochs=1, lr=1.0), resume=True)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(
    tmp_path: Path, toy_dataset: Path, key_file: Path
) -> None:
    cfg = train_config(tmp_path / "run", toy_dataset, key_file, epochs=2)
    train(cfg)
    good = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    bad = train_config(tmp_path / "run", toy_dataset, key_file, epochs=4, lr=1e38)  # (a NaN lr is refused upfront)
    (tmp_path / "run" / "config.yaml").unlink()  # let the same folder take the changed settings
    # step 1 of epoch 3 makes the weights overflow; step 2 sees the non-finite loss and stops
    with pytest.raises(TrainingDiverged, match=r"loss is (nan|inf) at epoch 3, step 2"):
        train(bad, resume=True)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == good


@pytest.mark.slow  # (minutes in all with the others: make test-slow)
def test_resume_after_sigkill_mid_epoch_ends_like_an_uninterrupted_run(
    tmp_path: Path, toy_dataset: Path, key_file: Path
) -> None:
    settings = dict(epochs=3, save_every_steps=2, precision="bf16")
    reference = train(train_config(tmp_path / "ref", toy_dataset, key_file, **settings))

    run = tmp_path / "killed"
    cfg = train_config(run, toy_dataset, key_file, **settings)
    args = [sys.executable, "-m", "ppvit.cli", "-q", "train", *train_flags(cfg)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        ckpt = run / "checkpoint.pt"
        if ckpt.exists():
            state = torch.load(ckpt, weights_only=False)
            if state["epoch"] >= 1 and "partial" in state:  # mid-epoch, after at least one epoch
                proc.send_signal(signal.SIGKILL)
                killed_at = (state["epoch"], state["step"])
                break
        time.sleep(0.005)
    proc.wait()
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (run / "result.json").exists()
    assert [p.name for p in run.iterdir() if p.name.endswith(".tmp")] == []  # no half-written files

    resumed = train(cfg, resume=True)
    for k in ("test_acc", "test_loss", "best_epoch", "best_val_acc"):
        assert getattr(resumed, k) == getattr(reference, k), (k, killed_at)
    ref_t, got_t = adapter_tensors(tmp_path / "ref"), adapter_tensors(run)
    assert all(torch.equal(ref_t[n], got_t[n]) for n in ref_t)
    assert_no_key_material([tmp_path / "ref", run, proc.stderr.read()], Key.load(key_file))


def test_gradient_accumulation_equals_the_larger_batch(tmp_path: Path, toy_dataset: Path, key_file: Path) -> None:
    # a random head, as before the recipe defaults: with a zero head Adam's first steps divide near-zero
    # gradients by their own size, and summation-order rounding (7e-5 on one head tensor) is amplified
    same = {"epochs": 2, "head_init": "random"}
    big = train(train_config(tmp_path / "big", toy_dataset, key_file, batch_size=8, **same))
    acc = train(train_config(tmp_path / "acc", toy_dataset, key_file, batch_size=4, grad_accum=2, **same))
    assert acc.test_acc == big.test_acc
    one, two = adapter_tensors(tmp_path / "big"), adapter_tensors(tmp_path / "acc")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("head_init", ["random", "zero"])
def test_a_zero_head_sends_no_gradient_to_the_backbone_at_first(tmp_path: Path, head_init: str) -> None:
    cfg = TrainConfig.from_flat(out=str(tmp_path), model=SMALL, method="lora-pe", head_init=head_init, scheme="none")
    model = ppvit_session.build_model(cfg, num_classes=10)
    torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4)).backward()
    head = model.head.weight
    assert torch.count_nonzero(head.grad) > 0
    backbone = [p.grad for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    assert len(backbone) > 2  # the patch embedding and the LoRA matrices train
    moved = sum(int(torch.count_nonzero(g)) for g in backbone if g is not None)
    if head_init == "zero":
        assert torch.count_nonzero(head) == 0 and moved == 0
    else:
        assert moved > 0


def test_data_seed_picks_the_data_and_seed_the_rest(
    tmp_path: Path, toy_dataset: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = []
    real = ppvit_session.load_splits
    monkeypatch.setattr(ppvit_session, "load_splits", lambda *a, **kw: seen.append(a[2]) or real(*a, **kw))
    default = train(train_config(tmp_path / "default", toy_dataset, key_file, seed=1, epochs=1))
    same = train(train_config(tmp_path / "same", toy_dataset, key_file, seed=1, data_seed=1, epochs=1))
    train(train_config(tmp_path / "mixed", toy_dataset, key_file, seed=0, data_seed=1, epochs=1))
    assert seen == [1, 1, 1]  # the subset and split come from data_seed, else from seed (order too: not observed here)
    assert same.test_acc == default.test_acc
    one, two, other = (adapter_tensors(tmp_path / n) for n in ("default", "same", "mixed"))
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=0)
    assert any(not torch.equal(other[n], one[n]) for n in one)  # seed still decides the initialisation


def test_yaml_config_with_flags_on_top(tmp_path: Path, toy_dataset: Path, key_file: Path, capsys) -> None:
    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump(
            {
                "model": SMALL,
                "method": "melo",
                "epochs": 1,
                "batch_size": 8,
                "rank": 2,
                "precision": "no",
                "val_fraction": 0.25,
            }
        )
    )
    args = [
        "-q",
        "train",
        "--config",
        str(tmp_path / "c.yaml"),
        "--data",
        str(toy_dataset),
        "--key",
        str(key_file),
        "--out",
        str(tmp_path / "run"),
        "--rank",
        "3",
    ]
    assert cli.main(args) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["method"]["name"] == "melo" and saved["method"]["rank"] == 3 and saved["optim"]["epochs"] == 1
    lora_a = adapter_tensors(tmp_path / "run")["blocks.0.attn.qkv.lora_A.default.weight"]
    assert lora_a.shape[0] == 2 * 3  # A_q and A_v of rank 3
    (tmp_path / "bad.yaml").write_text("epochs: 1\nlearning_rate: 3\n")
    capsys.readouterr()
    assert cli.main(["train", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "bad.yaml: unknown setting 'learning_rate'" in capsys.readouterr().err
    assert_no_key_material(tmp_path / "run", Key.load(key_file))


def test_cifar10_download_path_and_its_offline_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from ppvit.data import datasets as data
    from ppvit.data.sources import cifar10

    class FakeCIFAR10:
        classes = ("a", "b")

        def __init__(self, root: str, train: bool, download: bool) -> None:
            n = 40 if train else 10
            self.data = np.full((n, 32, 32, 3), 7, dtype=np.uint8)
            self.targets = [i % 2 for i in range(n)]

    monkeypatch.delenv("PPVIT_CIFAR10", raising=False)
    monkeypatch.setattr(cifar10, "torchvision_split", lambda root, train: FakeCIFAR10(str(root), train, True))
    splits = data.load_splits(None, 0.25, 0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 10, 10)
    assert splits.train.classes == ("a", "b") and not splits.encrypted

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(cifar10, "torchvision_split", offline)
    with pytest.raises(ValueError, match=r"CIFAR-10 download failed .* set PPVIT_CIFAR10"):
        data.load_splits("cifar10", 0.25, 0)


@pytest.mark.data
def test_lora_pe_on_the_cifar10_copy(tmp_path: Path, key_file: Path) -> None:
    """The real data path: the CIFAR-10 tar decoded, half of the training set, encrypted on the fly."""
    data = os.environ.get("PPVIT_CIFAR10")
    if not data:
        pytest.skip("PPVIT_CIFAR10 is not set")
    settings = dict(part="1/2", train_subset=600, test_subset=300, epochs=1, batch_size=64, val_fraction=0.1)
    result = train(train_config(tmp_path / "run", Path(data), key_file, **settings))
    assert result.test_images == 300 and result.num_classes == 10 and result.scheme == "shuffle"
    meta = json.loads((tmp_path / "run" / "adapter" / "ppvit_adapter.json").read_text())
    assert meta["classes"][:2] == ["airplane", "automobile"] and meta["block_size"] == 4
    assert_no_key_material(tmp_path / "run", Key.load(key_file))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux only")
def test_peak_memory_of_a_child_is_its_own_not_its_parents() -> None:
    """`ppvit reproduce` runs each cell in a child process of a parent that may be large."""
    ballast = np.ones(600 * 2**20, dtype=np.uint8)  # touch 600 MiB in this (parent) process
    parent = runtime.peak_rss_mb()
    code = "from ppvit.train.runtime import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    del ballast
    assert parent > 600 and child < parent - 400, (parent, child)


def test_every_run_logs_each_epoch(tmp_path: Path, toy_dataset: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The per-epoch line is logged with or without a tracker (it had moved under ``report_to``)."""
    with caplog.at_level("INFO", logger="ppvit.train"):
        train(train_config(tmp_path / "run", toy_dataset, None, scheme="none", epochs=2, report_to="none"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1", "epoch 2"] and all("| val loss" in x for x in lines)


def test_resume_with_only_the_run_folder_from_anywhere(
    tmp_path: Path, toy_dataset: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """`ppvit train --resume --out RUN` continues RUN with its own settings, whatever the current folder."""
    work = tmp_path / "work"
    shutil.copytree(toy_dataset, work / "data")
    shutil.copy(key_file, work / "k.key")
    monkeypatch.chdir(work)  # relative paths, as a user types them
    cfg = train_config(Path("run"), Path("data"), Path("k.key"), epochs=1)
    assert cli.main(["train", *train_flags(cfg)]) == 0
    first = json.loads(capsys.readouterr().out)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["-q", "train", "--resume", "--out", str(work / "run")]) == 0
    assert json.loads(capsys.readouterr().out)["test_acc"] == first["test_acc"]
    saved = yaml.safe_load((work / "run" / "config.yaml").read_text())
    assert saved["data"]["data"] == str(work / "data") and saved["crypto"]["key"] == str(work / "k.key")
    shutil.move(work / "run", tmp_path / "moved")  # it said "--resume with different settings (out)"
    assert cli.main(["-q", "train", "--resume", "--out", "moved", "--epochs", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs"] == 2
    saved = yaml.safe_load((tmp_path / "moved" / "config.yaml").read_text())
    assert saved["run"]["out"] == str(tmp_path / "moved") and not (work / "run").exists()


def test_a_refused_run_leaves_no_empty_folder(tmp_path: Path, capsys) -> None:
    code = cli.main(
        ["-q", "train", "--out", str(tmp_path / "new"), "--data", str(tmp_path / "missing"), "--scheme", "none"]
    )
    assert code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists()


def test_a_one_epoch_run_draws_its_curves(tmp_path: Path) -> None:
    """One epoch is one point: drawn with a marker (a bare line of one point is invisible)."""
    from PIL import Image

    from ppvit.train.runs import write_metrics

    row = {"epoch": 1, "train_loss": 1.0, "val_loss": 0.8, "train_acc": 0.5, "val_acc": 0.6}
    write_metrics(tmp_path, [row])
    pixels = np.asarray(Image.open(tmp_path / "curves.png").convert("RGB")).astype(int)
    coloured = (pixels.max(-1) - pixels.min(-1)) > 60  # matplotlib's blue and orange, not grey text or axes
    assert coloured.sum() > 300  # measured: 554 with markers, 120 (the legend alone) without


def test_run_records_are_strict_json_even_when_a_value_is_not_finite(tmp_path: Path) -> None:
    """A diverged epoch (NaN loss) or an infinite value still gives JSON that strict parsers read."""
    from ppvit.train.runs import RunResult, write_metrics

    def strict(text: str) -> object:
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    row = {"epoch": 1, "train_loss": float("nan"), "val_loss": float("inf"), "train_acc": 0.5, "val_acc": 0.6}
    write_metrics(tmp_path, [row])
    assert strict((tmp_path / "metrics.jsonl").read_text())["train_loss"] is None
    result = RunResult(
        test_acc=0.5,
        test_loss=float("nan"),
        test_images=4,
        best_epoch=1,
        best_val_acc=0.5,
        epochs=1,
        method="full",
        scheme="plain",
        num_classes=4,
        trainable_params=1,
        train_seconds=1.0,
        images_per_s=None,
        peak_rss_mb=1.0,
        processes=1,
        precision="no",
    )
    result.write(tmp_path / "result.json")
    assert strict((tmp_path / "result.json").read_text())["test_loss"] is None


@pytest.mark.parametrize("scheme", ["mix", "lift"])
def test_dense_mixing_trains_on_its_stored_ciphertext_without_the_key(
    tmp_path: Path, toy_dataset: Path, key_file: Path, scheme: str, first_train_batch: dict[str, torch.Tensor]
) -> None:
    """The server's case: `ppvit encrypt --scheme mix|lift --format npz` output trains with no key, and the first
    batch the model is given is the one the simulated client gives it for the same images and key (the stored
    float16 / integer values through the one normalisation); `eval` on that ciphertext needs no key either."""
    enc = tmp_path / "enc"
    flags = ["--key", str(key_file), "--scheme", scheme, "--block-size", "4", "--format", "npz"]
    assert cli.main(["-q", "encrypt", str(toy_dataset), str(enc), *flags]) == 0
    result = train(train_config(tmp_path / "server", enc, None, epochs=1))
    served = first_train_batch.pop("input")
    first_train_batch.clear()
    train(train_config(tmp_path / "client", toy_dataset, key_file, scheme=scheme, block_size=4, epochs=1))
    simulated = first_train_batch["input"]
    std = torch.tensor(normalization(create_backbone(SMALL, num_classes=4))[1]).view(1, 3, 1, 1)
    ulp = 0.25 if scheme == "mix" else 0.0  # float16's unit at 256-512: a BLAS may round the last bit otherwise
    torch.testing.assert_close(served, simulated, rtol=0, atol=ulp / 255 / float(std.min()) + 1e-6)
    meta = json.loads((tmp_path / "server" / "adapter" / "ppvit_adapter.json").read_text())
    assert (meta["scheme"], meta["block_size"], meta["key_fingerprint"]) == (scheme, 4, Key.load(key_file).fingerprint)
    assert 0 <= result.test_acc <= 1 and result.test_images == 32
    assert cli.main(["-q", "eval", str(tmp_path / "server"), "--data", str(enc)]) == 0


@pytest.mark.parametrize("scheme", ["mix", "lift"])
def test_dense_mixing_trains_through_the_simulated_client(
    tmp_path: Path, toy_dataset: Path, key_file: Path, scheme: str, first_train_batch: dict[str, torch.Tensor]
) -> None:
    """`--scheme mix|lift` with --key-init: the model is given the mixed blocks (float16 / integers, the
    documented map recomputed from the key's matrix) and the adapter reloads for `eval` with the key."""
    from ppvit.crypto.mixing import block_mixing

    result = train(train_config(tmp_path / "run", toy_dataset, key_file, scheme=scheme, key_init=True, epochs=2))
    plain = first_train_batch["plain"].numpy().astype(np.float64)
    mixing = block_mixing(Key.load(key_file), scheme, 4, 3)
    n = len(plain)
    blocks = plain.reshape(n, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, 64, 48)
    mixed = blocks @ mixing.matrix.T + 255 * mixing.offset  # the real-valued ciphertext
    expected = torch.from_numpy(mixed.reshape(n, 8, 8, 4, 4, 3).transpose(0, 5, 1, 3, 2, 4).reshape(n, 3, 32, 32))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in normalization(create_backbone(SMALL, num_classes=4)))
    seen = (first_train_batch["input"] * std + mean) * 255
    torch.testing.assert_close(seen.double(), expected, rtol=0, atol=0.3 if scheme == "mix" else 1e-3)
    assert cli.main(["eval", str(tmp_path / "run"), "--data", str(toy_dataset), "--key", str(key_file)]) == 0
    assert result.test_acc >= 0


def test_lora_dropout_draws_the_same_masks_in_a_rerun_and_a_resumed_run(
    tmp_path: Path, toy_dataset: Path, key_file: Path
) -> None:
    """LoRA dropout drew from torch's global RNG, neither seeded by the run nor checkpointed: two runs with
    ``--dropout`` differed, and so did a resumed run from an uninterrupted one. Seeded per step now."""
    settings = dict(epochs=2, dropout=0.5, save_every_steps=1)
    train(train_config(tmp_path / "ref", toy_dataset, key_file, **settings))
    torch.rand(7)  # the caller's RNG moved on: the run does not follow it
    state = torch.random.get_rng_state()
    train(train_config(tmp_path / "again", toy_dataset, key_file, **settings))
    assert torch.equal(torch.random.get_rng_state(), state)  # and the caller's RNG is given back as it was

    def stop_at_step_3(step: int, model: torch.nn.Module) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # checkpointed at the next step, then TrainingStopped

    cfg = train_config(tmp_path / "stopped", toy_dataset, key_file, **settings)
    with pytest.raises(ppvit_train.TrainingStopped):
        train(cfg, on_step=stop_at_step_3)
    train(cfg, resume=True)
    train(train_config(tmp_path / "no-dropout", toy_dataset, key_file, epochs=2, save_every_steps=1))
    ref = adapter_tensors(tmp_path / "ref")
    for run in ("again", "stopped"):
        got = adapter_tensors(tmp_path / run)
        assert all(torch.equal(ref[n], got[n]) for n in ref), run
    plain = adapter_tensors(tmp_path / "no-dropout")
    assert not all(torch.equal(ref[n], plain[n]) for n in ref)  # the dropout acted
