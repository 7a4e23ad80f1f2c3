"""Faults injected as a user would meet them: kills, signals, a full disk, a read-only output,
broken links, the umask, two runs in one folder. Each must end in one line and a state a
rerun can finish from.

Full-disk and read-only cases mount a small tmpfs where the tests run as root (skipped
elsewhere); the full-disk cases also run with the error injected in Python.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import adapter_tensors, free_port, train_config, train_flags
from PIL import Image

from ppvit import cli
from ppvit._io import atomic_write_bytes
from ppvit.crypto.keys import Key
from ppvit.data import sinks
from ppvit.train import loop as ppvit_train
from ppvit.train.loop import train
from ppvit.train.runs import RunResult

# -- helpers -------------------------------------------------------------------------------------


def make_tree(root: Path, n: int = 3, size: int = 32, splits: tuple[str, ...] = ("train", "test")) -> Path:
    """<split>/<class>/<i>.png of random pixels (random: PNGs that do not compress)."""
    rng = np.random.default_rng(0)
    for split in splits:
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / cls / f"{i}.png", compress_level=0)
    return root


def files(root: Path) -> dict[str, bytes]:
    """Every file of a tree, hidden ones included: relative path -> bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def temps(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*.tmp")]


def encrypt(src: Path, dst: Path, key: Path, *extra: str) -> int:
    return cli.main(["-q", "encrypt", str(src), str(dst), "--key", str(key), *extra])


def err_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


@contextmanager
def tmpfs(path: Path, size: str = "1m", read_only: bool = False) -> Iterator[Path]:
    """A small tmpfs at ``path`` (root only; the test is skipped where it cannot be mounted)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    opts = f"size={size}" + (",ro" if read_only else "")
    got = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if got.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {got.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last byte; returns the filler file."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as fh:
        for chunk in (1 << 16, 1 << 10, 1):
            try:
                while True:
                    fh.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return filler


def ppid_of(pid: int) -> int | None:
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat_line.rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and ppid_of(int(entry.name)) == parent and int(entry.name) not in found:
                found.add(int(entry.name))
                todo.append(int(entry.name))
    return found


def start_encrypt(src: Path, dst: Path, key: Path, workers: int) -> subprocess.Popen:
    """`ppvit encrypt` in its own session (a terminal's process group); returns once it has written an image."""
    args = [sys.executable, "-m", "ppvit.cli", "-q", "encrypt", str(src), str(dst), "--key", str(key)]
    proc = subprocess.Popen(  # as a terminal starts a foreground job: Ctrl-C not ignored, whatever this process does
        [*args, "--workers", str(workers)],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not any(dst.rglob("*.png")):
        time.sleep(0.01)
    assert proc.poll() is None, f"finished before it could be interrupted: {proc.stderr.read()}"
    return proc


@pytest.fixture(scope="module")
def big_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough images that `ppvit encrypt --workers 2` takes seconds: time to interrupt it."""
    return make_tree(tmp_path_factory.mktemp("big"), n=150, size=256, splits=("train", "test"))


@pytest.fixture(scope="module")
def small_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tree(tmp_path_factory.mktemp("small"))


@pytest.fixture
def sigterm_guard() -> Iterator[None]:
    """A SIGTERM this process sends itself must never end the test session: unhandled, it fails the test."""

    def guard(signum: int, frame: object) -> None:
        raise RuntimeError("SIGTERM reached the test process: nothing handled it")

    old = signal.signal(signal.SIGTERM, guard)
    yield
    signal.signal(signal.SIGTERM, old)


# -- 1, 2: a killed encrypt: its workers, its temporary files -------------------------------------


@pytest.mark.slow  # (minutes in all with the others: make test-slow)
def test_sigkilled_encrypt_leaves_no_workers_and_a_rerun_matches_an_uninterrupted_run(
    tmp_path: Path, big_source: Path, key_file: Path
) -> None:
    dst = tmp_path / "dst"
    proc = start_encrypt(big_source, dst, key_file, workers=2)
    family = descendants(proc.pid)
    try:
        assert len(family) >= 2, family  # the pool's workers
        proc.kill()
        proc.wait()
        deadline = time.time() + 15
        while time.time() < deadline and any(alive(p) for p in family):
            time.sleep(0.05)
        left = [p for p in family if alive(p)]
        assert not left, f"processes of the killed ppvit still running: {left}"
    finally:
        for p in family:  # never leave the orphans of a failed test behind
            if alive(p):
                os.kill(p, signal.SIGKILL)

    assert encrypt(big_source, dst, key_file) == 0  # the rerun finishes the job ...
    assert encrypt(big_source, tmp_path / "clean", key_file) == 0
    assert files(dst) == files(tmp_path / "clean")  # ... and leaves what an uninterrupted run would


@pytest.mark.parametrize("fmt", ["png", "npz"])
def test_a_rerun_removes_temporary_files_a_killed_run_left(
    tmp_path: Path, small_source: Path, key_file: Path, fmt: str
) -> None:
    dst, clean = tmp_path / "dst", tmp_path / "clean"
    assert encrypt(small_source, clean, key_file, "--format", fmt) == 0
    assert encrypt(small_source, dst, key_file, "--format", fmt) == 0
    # what SIGKILL during a write leaves: the temporary file, and no output file yet
    victim = next(p for p in sorted(dst.rglob(f"*.{fmt}")))
    victim.unlink()
    (victim.parent / f".{victim.name}.k3x9_q2z.tmp").write_bytes(b"half a file")
    (dst / ".ppvit-manifest.json.a1b2c3d4.tmp").write_text('{"sch')
    assert encrypt(small_source, dst, key_file, "--format", fmt) == 0
    assert files(dst) == files(clean)


# -- 3: a full disk ------------------------------------------------------------------------------


def test_full_disk_is_one_line_naming_the_output_and_a_rerun_completes(
    tmp_path: Path, small_source: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """ENOSPC injected where the bytes are written: the 4th image finds the disk full half-way."""
    real = Path.write_bytes
    written: list[Path] = []

    def write_bytes(self: Path, data: bytes) -> int:
        if self.name.endswith(".tmp") and ".png." in self.name:
            written.append(self)
            if len(written) == 4:
                real(self, data[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    dst = tmp_path / "dst"
    assert encrypt(small_source, dst, key_file) == 1
    target = written[3].parent / written[3].name[1:].rsplit(".", 2)[0]  # .NAME.XXXXXXXX.tmp -> NAME
    lines = err_lines(capsys)
    assert len(lines) == 1 and str(target) in lines[0] and "No space left on device" in lines[0], lines
    assert not target.exists() and temps(dst) == []  # no partial file
    pngs = sorted(dst.rglob("*.png"))
    assert len(pngs) == 3
    for p in pngs:
        Image.open(p).load()  # complete

    monkeypatch.undo()  # space freed
    assert encrypt(small_source, dst, key_file) == 0
    assert encrypt(small_source, tmp_path / "clean", key_file) == 0
    assert files(dst) == files(tmp_path / "clean")


def test_full_tmpfs_is_one_line_and_a_rerun_after_freeing_space_completes(
    tmp_path: Path, key_file: Path, capsys
) -> None:
    src = make_tree(tmp_path / "src", n=8, size=128)  # 32 x 48 KiB of incompressible PNG: 1.5 MiB
    with tmpfs(tmp_path / "disk", size="1m") as disk:
        dst = disk / "dst"
        assert encrypt(src, dst, key_file) == 1
        lines = err_lines(capsys)
        assert len(lines) == 1 and "No space left on device" in lines[0] and str(dst) in lines[0], lines
        assert temps(dst) == []
        remount(disk, "8m")
        assert encrypt(src, dst, key_file) == 0
        assert encrypt(src, tmp_path / "clean", key_file) == 0
        assert files(dst) == files(tmp_path / "clean")


# -- 4: broken links in the source ----------------------------------------------------------------


def test_dangling_and_looping_links_are_named_and_counted(tmp_path: Path, key_file: Path, capsys) -> None:
    src = make_tree(tmp_path / "src")
    (src / "train" / "cat" / "dangling.png").symlink_to("nowhere.png")
    (src / "train" / "cat" / "loop.png").symlink_to("loop.png")
    (src / "train" / "dog" / "alias.png").symlink_to("../cat/0.png")  # a good link is an image
    assert encrypt(src, tmp_path / "dst", key_file) == 1
    err = capsys.readouterr().err
    assert "train/cat/dangling.png: cannot read (symbolic link to nowhere.png: No such file" in err, err
    assert "train/cat/loop.png: cannot read (symbolic link to loop.png: Too many levels" in err, err
    assert "2 images failed (named above)" in err
    assert (tmp_path / "dst" / "train" / "dog" / "alias.png").exists()


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_link_members_of_an_archive_are_followed_inside_it_only_else_named_and_counted(
    tmp_path: Path, small_source: Path, key_file: Path, capsys, suffix: str
) -> None:
    """Symbolic and hard links in a tar source: one to a member is that image (a good link in a folder is
    too); one that is dangling, loops or leaves the archive is an unreadable image, named and counted. The
    archive is read, never extracted: nothing outside it is ever opened, whatever a link says."""
    outside = tmp_path / "outside.png"  # what an escaping link would reach if it were followed on disk
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(outside)
    links = {  # name: (type, target)
        "train/dog/alias.png": (tarfile.SYMTYPE, "../cat/0.png"),
        "train/dog/hard.png": (tarfile.LNKTYPE, "train/cat/1.png"),
        "train/cat/dangling.png": (tarfile.SYMTYPE, "nowhere.png"),
        "train/cat/loop.png": (tarfile.SYMTYPE, "loop.png"),
        "train/cat/absolute.png": (tarfile.SYMTYPE, str(outside)),
        "train/cat/up.png": (tarfile.SYMTYPE, "../" * 8 + str(outside).lstrip("/")),
        "train/cat/orphan.png": (tarfile.LNKTYPE, "train/cat/gone.png"),
    }
    archive = tmp_path / f"src{suffix}"
    with tarfile.open(archive, "w:gz" if suffix == ".tar.gz" else "w") as tar:
        tar.add(small_source, arcname=".")
        for name, (kind, target) in links.items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
    dst = tmp_path / "dst"
    assert encrypt(archive, dst, key_file) == 1
    err = capsys.readouterr().err
    expected = {
        "train/cat/dangling.png": "symbolic link to nowhere.png: not in the archive",
        "train/cat/loop.png": "symbolic link to loop.png: Too many levels of symbolic links",
        "train/cat/absolute.png": f"symbolic link to {outside}: outside the archive, not followed",
        "train/cat/up.png": "outside the archive, not followed",
        "train/cat/orphan.png": "hard link to train/cat/gone.png: not in the archive",
    }
    for name, why in expected.items():
        assert re.search(rf"{re.escape(name)}: cannot read \(.*{re.escape(why)}", err), (name, err)
    assert f"{len(expected)} images failed (named above)" in err, err
    written = {p.relative_to(dst).as_posix() for p in dst.rglob("*.png")}
    assert written == {p.relative_to(small_source).as_posix() for p in small_source.rglob("*.png")} | {
        "train/dog/alias.png",
        "train/dog/hard.png",
    }
    assert (dst / "train/dog/alias.png").read_bytes() == (dst / "train/cat/0.png").read_bytes()
    assert (dst / "train/dog/hard.png").read_bytes() == (dst / "train/cat/1.png").read_bytes()


# -- 5: file modes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("umask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
@pytest.mark.parametrize("fmt", ["png", "npz"])
def test_outputs_follow_the_umask_and_keys_stay_private(
    tmp_path: Path, small_source: Path, key_file: Path, umask: int, expected: int, fmt: str
) -> None:
    old = os.umask(umask)
    try:
        assert encrypt(small_source, tmp_path / "dst", key_file, "--format", fmt) == 0
        Key.generate().save(tmp_path / "new.key")
        atomic_write_bytes(tmp_path / "secret", b"x", mode=0o600)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "dst").rglob("*") if p.is_file()}
    assert modes and set(modes.values()) == {expected}, modes
    assert stat.S_IMODE((tmp_path / "new.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600


# -- 6: signals and a read-only output ------------------------------------------------------------


@pytest.mark.parametrize("verb", ["encrypt", "decrypt"])
def test_sigterm_stops_encrypt_and_decrypt_with_one_line_and_exit_143(
    tmp_path: Path, small_source: Path, key_file: Path, verb: str, monkeypatch, capsys, sigterm_guard
) -> None:
    src = small_source
    if verb == "decrypt":
        assert encrypt(small_source, tmp_path / "enc", key_file) == 0
        src = tmp_path / "enc"
    real_add, added = sinks.PngSink.add, []

    def add(self, rel: str, arr: np.ndarray) -> None:
        real_add(self, rel, arr)
        added.append(rel)
        if len(added) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(sinks.PngSink, "add", add)
    argv = ["-q", verb, str(src), str(tmp_path / "out"), "--key", str(key_file)]
    assert cli.main(argv) == 128 + signal.SIGTERM
    lines = err_lines(capsys)
    assert len(lines) == 1 and f"ppvit {verb}: interrupted by SIGTERM" in lines[0], lines
    assert len(list((tmp_path / "out").rglob("*.png"))) == 2 and temps(tmp_path / "out") == []
    assert signal.getsignal(signal.SIGTERM).__name__ == "guard"  # the caller's handler is back

    monkeypatch.undo()
    assert cli.main(argv) == 0  # the rerun continues


def test_ctrl_c_with_workers_is_one_line_exit_130_and_no_worker_left(
    tmp_path: Path, big_source: Path, key_file: Path
) -> None:
    """Ctrl-C in a terminal signals the whole process group: the workers too."""
    proc = start_encrypt(big_source, tmp_path / "dst", key_file, workers=2)
    family = descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "ppvit encrypt: interrupted by SIGINT" in lines[0], err[-3000:]
        deadline = time.time() + 15
        while time.time() < deadline and any(alive(p) for p in family):
            time.sleep(0.05)
        assert not [p for p in family if alive(p)]
    finally:
        for p in [proc.pid, *family]:
            if alive(p):
                os.kill(p, signal.SIGKILL)
    assert temps(tmp_path / "dst") == []


def test_read_only_output_is_one_line(tmp_path: Path, small_source: Path, key_file: Path, capsys) -> None:
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        for dst in (ro, ro / "new"):
            assert encrypt(small_source, dst, key_file) == 1
            lines = err_lines(capsys)
            assert len(lines) == 1 and "Read-only file system" in lines[0] and str(dst) in lines[0], lines


# -- 7: train ------------------------------------------------------------------------------------

QUICK = dict(epochs=2, train_subset=32, test_subset=16)  # 3 steps an epoch


def test_sigterm_during_train_saves_a_checkpoint_and_says_how_to_resume(
    tmp_path: Path, toy_dataset: Path, key_file: Path, monkeypatch, capsys, sigterm_guard
) -> None:
    cfg = train_config(tmp_path / "run", toy_dataset, key_file, **QUICK)
    real_get_batch, calls = ppvit_train.get_batch, []

    def get_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # during the 2nd step: it is finished, then the run stops
            os.kill(os.getpid(), signal.SIGTERM)
        return real_get_batch(*args, **kwargs)

    monkeypatch.setattr(ppvit_train, "get_batch", get_batch)
    assert cli.main(["-q", "train", *train_flags(cfg)]) == 128 + signal.SIGTERM
    lines = err_lines(capsys)
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0] and "--resume" in lines[0], lines
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert (state["epoch"], state["step"], state["partial"]["n"]) == (0, 2, 16)
    assert not (tmp_path / "run" / "result.json").exists()
    monkeypatch.undo()

    resumed = train(cfg, resume=True)  # the same result as a run never stopped
    reference = train(train_config(tmp_path / "ref", toy_dataset, key_file, **QUICK))
    assert (resumed.test_acc, resumed.test_loss, resumed.best_val_acc) == (
        reference.test_acc,
        reference.test_loss,
        reference.best_val_acc,
    )
    ref_t, got_t = adapter_tensors(tmp_path / "ref"), adapter_tensors(tmp_path / "run")
    assert all(torch.equal(ref_t[n], got_t[n]) for n in ref_t)


def test_a_second_train_into_a_busy_run_folder_is_refused_and_sigterm_stops_the_first(
    tmp_path: Path, toy_dataset: Path, key_file: Path, monkeypatch, capsys
) -> None:
    run = tmp_path / "run"
    cfg = train_config(run, toy_dataset, key_file, **{**QUICK, "epochs": 100})
    args = [sys.executable, "-m", "ppvit.cli", "-q", "train", *train_flags(cfg)]
    first = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None and not (run / "config.yaml").exists():
            time.sleep(0.02)
        assert first.poll() is None, first.stderr.read()

        def trains(*args, **kwargs):
            raise AssertionError("the second run started training in the busy folder")

        monkeypatch.setattr(ppvit_train, "train_epoch", trains)
        assert cli.main(["-q", "train", *train_flags(cfg), "--resume"]) == 2
        lines = err_lines(capsys)
        assert len(lines) == 1 and f"run folder {run}: in use by another `ppvit train`" in lines[0], lines

        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 128 + signal.SIGTERM, err[-3000:]
    lines = err.strip().splitlines()
    stopped = r"ppvit train: stopped by SIGTERM at epoch \d+, step \d+; checkpoint saved in .*--resume"
    assert len(lines) == 1 and re.match(stopped, lines[0]), err[-3000:]
    assert (run / "checkpoint.pt").exists()
    with open(run / ".lock") as fh:  # released on exit
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.mark.parametrize("disk", ["tmpfs", "injected"])
def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(
    tmp_path: Path, toy_dataset: Path, key_file: Path, monkeypatch, capsys, disk: str
) -> None:
    """The disk fills after epoch 1's checkpoint; the next checkpoint (epoch 2, step 1) fails."""
    with tmpfs(tmp_path / "disk", size="2m") if disk == "tmpfs" else _nothing(tmp_path / "disk") as folder:
        run = folder / "run"
        cfg = train_config(run, toy_dataset, key_file, **QUICK, save_every_steps=2)
        saved: dict[str, bytes] = {}
        real_save = torch.save

        def injected_enospc(obj, f, *args, **kwargs):
            if saved:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_save(obj, f, *args, **kwargs)

        def on_step(step: int, model: torch.nn.Module) -> None:
            if step == 4 and not saved:  # the first step of epoch 2, before its checkpoint
                saved["checkpoint"] = (run / "checkpoint.pt").read_bytes()
                if disk == "tmpfs":
                    fill(folder)
                else:
                    monkeypatch.setattr(torch, "save", injected_enospc)

        monkeypatch.setattr(ppvit_train, "train", functools.partial(train, on_step=on_step))  # looked up per call
        assert cli.main(["-q", "train", *train_flags(cfg)]) == 1
        lines = err_lines(capsys)
        assert len(lines) == 1 and f"{run / 'checkpoint.pt'}: No space left on device" in lines[0], lines
        assert (run / "checkpoint.pt").read_bytes() == saved["checkpoint"]  # the previous one, intact
        assert temps(run) == []

        (folder / "filler").unlink(missing_ok=True)  # space freed
        monkeypatch.undo()
        assert cli.main(["-q", "train", *train_flags(cfg), "--resume"]) == 0
        assert (run / "result.json").exists()


@contextmanager
def _nothing(path: Path) -> Iterator[Path]:
    path.mkdir()
    yield path


# -- 8: distributed train: a peer process dies or hangs -------------------------------------------

# The victim's own fault, at its N-th batch: deterministic, whatever the machine's speed.
PEER_FAULT = """
import os, signal, sys
from ppvit import cli
from ppvit.train import loop as training
real, calls = training.get_batch, []
def get_batch(*args, **kwargs):
    calls.append(1)
    if len(calls) == {at}:
        os.kill(os.getpid(), signal.{fault})
    return real(*args, **kwargs)
training.get_batch = get_batch
sys.exit(cli.main(sys.argv[1:]))
"""


def start_worker(rank: int, port: str, code: list[str], *args: str) -> subprocess.Popen:
    """One of two processes, started as torchrun starts them but directly (as in test_distributed), so
    that each one's exit code and stderr can be read."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
    env |= {"LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    argv = [sys.executable, *code, *args]
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def faulted(proc: subprocess.Popen, fault: str) -> bool:
    if fault == "SIGKILL":
        return proc.poll() is not None
    try:
        return Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


@pytest.mark.parametrize(
    ("fault", "victim"),
    [pytest.param("SIGKILL", 1, marks=pytest.mark.slow), ("SIGSTOP", 0)],  # slow: 35 s
)
@pytest.mark.slow  # (minutes in all with the others: make test-slow)
def test_a_dead_or_hung_peer_process_ends_the_other_within_the_timeout_and_resume_continues(
    tmp_path: Path, toy_dataset: Path, key_file: Path, fault: str, victim: int
) -> None:
    """At its 6th step (epoch 1; the checkpoint of step 4 is on disk) one of two processes is SIGKILLed
    (the OOM killer: its connections close) or SIGSTOPped (a hung peer: they stay open). The other exits
    1 within --dist-timeout-s with one line, and `--resume` continues from step 4: with two processes
    again after the SIGKILL, in one after the SIGSTOP."""
    run, timeout = tmp_path / "run", 10
    cfg = train_config(run, toy_dataset, key_file, epochs=2, save_every_steps=2, dist_timeout_s=timeout)
    port = str(free_port())
    fault_code = ["-c", PEER_FAULT.format(at=6, fault=fault)]
    procs = [
        start_worker(r, port, fault_code if r == victim else ["-m", "ppvit.cli"], "-q", "train", *train_flags(cfg))
        for r in range(2)
    ]
    survivor, dead = procs[1 - victim], procs[victim]
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not faulted(dead, fault) and survivor.poll() is None:
            time.sleep(0.02)
        assert faulted(dead, fault), f"the {fault} never came: {survivor.poll()} {dead.poll()}"
        t0 = time.time()
        try:
            _, err = survivor.communicate(timeout=timeout + 50)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank {1 - victim} still waits for its {fault}ed peer after {time.time() - t0:.0f} s")
        waited = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert survivor.returncode == 1, err[-3000:]
    assert waited < timeout + 20, waited
    lines = err.strip().splitlines()
    peer = r"ppvit train: error: another process of this run died or stopped answering .*--resume"
    assert "Traceback" not in err and len(lines) == 1 and re.match(peer, lines[0]), err[-3000:]
    assert str(run / "checkpoint.pt") in lines[0]
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 4

    if fault == "SIGKILL":  # two processes again (info logs on: they say where they resume)
        port = str(free_port())
        procs = [start_worker(r, port, ["-m", "ppvit.cli"], "train", *train_flags(cfg), "--resume") for r in range(2)]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
            assert f"resumed {run} at epoch 0, step 4" in err, err[-3000:]
        assert RunResult.read(run / "result.json").processes == 2
    else:  # one process
        steps: list[int] = []
        result = train(cfg, resume=True, on_step=lambda step, model: steps.append(step))
        assert steps[0] == 5 and steps[-1] == 18  # after step 4, to the end of epoch 2
        assert result.processes == 1
    assert len(torch.load(run / "checkpoint.pt", weights_only=False)["history"]) == 2 and (run / "adapter").is_dir()
