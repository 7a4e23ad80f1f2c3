"""`ppvit encrypt` / `decrypt` / `preview` / `keygen` end to end, in process."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import KEY, assert_no_key_material
from PIL import Image

from ppvit import cli
from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key
from ppvit.data.datasets import ArrayDataset, load_source_split, load_splits
from ppvit.data.images import resize_array
from ppvit.data.manifest import read_manifest
from ppvit.data.preprocess import KERNEL, Preprocess
from ppvit.data.sources.encrypted_npz import read_npz


def make_tree(root: Path, n: int = 3, size: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """train/<class>/i.png and test/<class>/i.png with random pixels; returns relpath -> array."""
    rng = np.random.default_rng(seed)
    out = {}
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            for i in range(n):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                rel = f"{split}/{cls}/{i}.png"
                (root / split / cls).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(root / rel)
                out[rel] = arr
    return out


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(p.relative_to(root).as_posix().encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.parametrize("scheme", ["shuffle", "shuffle+scramble+rotate+negpos+channel"])
def test_folder_round_trip_keeps_layout_and_is_exact(tmp_path: Path, key_file: Path, scheme: str) -> None:
    src = tmp_path / "src"
    images = make_tree(src)
    before = tree_digest(src)
    assert (
        cli.main(
            [
                "-q",
                "encrypt",
                str(src),
                str(tmp_path / "enc"),
                "--key",
                str(key_file),
                "--scheme",
                scheme,
                "--block-size",
                "4",
            ]
        )
        == 0
    )
    cipher = BlockCipher(Key.load(key_file), scheme, 4)
    for rel, arr in images.items():
        np.testing.assert_array_equal(read_png(tmp_path / "enc" / rel), cipher.encrypt(arr))
    assert cli.main(["-q", "decrypt", str(tmp_path / "enc"), str(tmp_path / "dec"), "--key", str(key_file)]) == 0
    for rel, arr in images.items():
        np.testing.assert_array_equal(read_png(tmp_path / "dec" / rel), arr)
    assert tree_digest(src) == before  # the source is never modified
    manifest = read_manifest(tmp_path / "enc")
    assert manifest.counts == {"train": 6, "test": 6} and manifest.classes["train"] == ["cat", "dog"]
    assert manifest.key_fingerprint == Key.load(key_file).fingerprint and manifest.complete
    assert_no_key_material([tmp_path / "enc", tmp_path / "dec"], Key.load(key_file))


def test_tar_source_with_resize_and_workers(tmp_path: Path, key_file: Path) -> None:
    src = tmp_path / "src"
    images = make_tree(src, size=8)
    with tarfile.open(tmp_path / "data.tar.gz", "w:gz") as tar:
        tar.add(src, arcname=".")
    code = cli.main(
        [
            "-q",
            "encrypt",
            str(tmp_path / "data.tar.gz"),
            str(tmp_path / "enc"),
            "--key",
            str(key_file),
            "--size",
            "32",
            "--block-size",
            "16",
            "--workers",
            "2",
        ]
    )
    assert code == 0
    cipher = BlockCipher(Key.load(key_file), "shuffle", 16)
    for rel, arr in images.items():
        resized = resize_array(arr, 32)  # the one resize (data.images) every path uses
        np.testing.assert_array_equal(read_png(tmp_path / "enc" / rel), cipher.encrypt(resized))
    assert_no_key_material(tmp_path / "enc", cipher.key)
    # the recipe as data: resized to 32 with the one kernel; mean and std are the training model's
    assert read_manifest(tmp_path / "enc").preprocess == Preprocess(32, KERNEL, None, None)


def test_single_image(tmp_path: Path, key_file: Path) -> None:
    arr = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "one.png")
    assert cli.main(["-q", "encrypt", str(tmp_path / "one.png"), str(tmp_path / "enc"), "--key", str(key_file)]) == 0
    cipher = BlockCipher(Key.load(key_file), "shuffle", 16)
    np.testing.assert_array_equal(read_png(tmp_path / "enc" / "one.png"), cipher.encrypt(arr))
    assert_no_key_material(tmp_path / "enc", cipher.key)


def test_npy_shards_load_as_an_encrypted_dataset(tmp_path: Path, key_file: Path) -> None:
    src = tmp_path / "src"
    images = make_tree(src, n=5)
    args = ["-q", "encrypt", str(src), str(tmp_path / "enc"), "--key", str(key_file), "--block-size", "4"]
    assert cli.main([*args, "--format", "npz"]) == 0
    ds = load_source_split(tmp_path / "enc", "train")
    got, labels, classes = ds.images, ds.labels, list(ds.classes)
    cipher = BlockCipher(Key.load(key_file), "shuffle", 4)
    want = {rel: cipher.encrypt(a) for rel, a in images.items() if rel.startswith("train/")}
    assert classes == ["cat", "dog"] and sorted(labels.tolist()) == [0] * 5 + [1] * 5
    assert sorted(g.tobytes() for g in got) == sorted(w.tobytes() for w in want.values())
    splits = load_splits(tmp_path / "enc", val_fraction=0.2, seed=0)
    assert splits.encrypted and isinstance(splits.train, ArrayDataset) and len(splits.test) == 10
    assert_no_key_material(tmp_path / "enc", cipher.key)


def test_wrong_key_is_refused_and_nothing_written(tmp_path: Path, key_file: Path, capsys) -> None:
    make_tree(tmp_path / "src")
    assert (
        cli.main(
            ["-q", "encrypt", str(tmp_path / "src"), str(tmp_path / "enc"), "--key", str(key_file), "--block-size", "4"]
        )
        == 0
    )
    other = tmp_path / "other.key"
    Key.generate().save(other)
    assert cli.main(["-q", "decrypt", str(tmp_path / "enc"), str(tmp_path / "dec"), "--key", str(other)]) == 2
    err = capsys.readouterr().err
    assert "key fingerprint" in err
    assert not (tmp_path / "dec").exists()
    # nor may another key write into the same encrypted folder
    assert (
        cli.main(
            ["-q", "encrypt", str(tmp_path / "src"), str(tmp_path / "enc"), "--key", str(other), "--block-size", "4"]
        )
        == 2
    )
    err += capsys.readouterr().err
    for key in (Key.load(key_file), Key.load(other)):
        assert_no_key_material([tmp_path / "enc", err], key)


def test_corrupt_images_are_listed_others_written(tmp_path: Path, key_file: Path, capsys) -> None:
    src = tmp_path / "src"
    make_tree(src)
    (src / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    code = cli.main(["-q", "encrypt", str(src), str(tmp_path / "enc"), "--key", str(key_file), "--block-size", "4"])
    assert code == 1
    err = capsys.readouterr().err
    assert "train/cat/broken.png" in err and "1 image failed (named above)" in err
    assert len(list((tmp_path / "enc").rglob("*.png"))) == 12
    assert not read_manifest(tmp_path / "enc").complete
    assert_no_key_material([tmp_path / "enc", err], Key.load(key_file))


def test_rerun_skips_finished_outputs(tmp_path: Path, key_file: Path, capsys) -> None:
    make_tree(tmp_path / "src")
    args = ["-q", "encrypt", str(tmp_path / "src"), str(tmp_path / "enc"), "--key", str(key_file), "--block-size", "4"]
    assert cli.main(args) == 0
    victim = tmp_path / "enc" / "train" / "cat" / "0.png"
    victim.unlink()
    mtime = (tmp_path / "enc" / "test" / "dog" / "1.png").stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "encrypted 1 images" in out and "(11 already there)" in out
    assert victim.exists() and (tmp_path / "enc" / "test" / "dog" / "1.png").stat().st_mtime_ns == mtime
    assert_no_key_material([tmp_path / "enc", out], Key.load(key_file))


@pytest.mark.parametrize("change", ["added", "removed"])
@pytest.mark.parametrize("fmt", ["png", "npz", "wds"])
def test_a_rerun_after_the_source_changed_is_refused_and_writes_nothing(
    tmp_path: Path, key_file: Path, capsys, fmt: str, change: str
) -> None:
    """An interrupted run continued after an image was added to (or removed from) the source: the images were dealt
    anew over the shards kept (wds: some twice, the new one missing; npz: the new one missing; png: the removed one
    kept), manifest counts that were not the source's, exit 0 (hostile client). Now one line, nothing written; the
    source as it was continues the run to exactly its images."""
    src, enc = tmp_path / "src", tmp_path / "enc"
    make_tree(src, n=4)
    args = ["-q", "encrypt", str(src), str(enc), "--key", str(key_file), "--block-size", "4", "--format", fmt]
    args += ["--shard-size", "3"] if fmt == "wds" else []
    assert cli.main(args) == 0
    outputs = sorted(p for p in enc.rglob("*") if p.is_file() and p.name != "ppvit-manifest.json")
    outputs[-1].unlink()  # the run stopped before its last output
    extra, gone = src / "train" / "cat" / "new.png", src / "train" / "dog" / "3.png"
    if change == "added":
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(extra)
    else:
        gone.rename(tmp_path / "away.png")
    before = tree_digest(enc)
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"output {enc}: was written from other images than {src}" in err and "new output folder" in err
    assert len(err.strip().splitlines()) == 1 and tree_digest(enc) == before

    extra.unlink(missing_ok=True)
    if not gone.exists():
        (tmp_path / "away.png").rename(gone)
    assert cli.main(args) == 0
    assert read_manifest(enc).counts == {"test": 8, "train": 8}
    if fmt == "wds":  # each image once
        names = []
        for shard in enc.rglob("*.tar"):
            with tarfile.open(shard) as tar:
                names += [(shard.parent.name, m) for m in tar.getnames() if m.endswith(".png")]
        assert len(names) == len(set(names)) == 16


@pytest.mark.parametrize("bad", [["--format", "jpg"], ["DST.jpg"]])
def test_lossy_output_is_refused(tmp_path: Path, key_file: Path, capsys, bad: list[str]) -> None:
    make_tree(tmp_path / "src")
    dst = str(tmp_path / (bad[0] if bad[0].endswith(".jpg") else "enc"))
    extra = [] if bad[0].endswith(".jpg") else bad
    assert cli.main(["-q", "encrypt", str(tmp_path / "src"), dst, "--key", str(key_file), *extra]) == 2
    err = capsys.readouterr().err
    assert "lossy" in err
    assert_no_key_material(err, Key.load(key_file))


def _mixed(root: Path) -> None:
    make_tree(root, n=2, size=16)
    Image.fromarray(np.zeros((24, 16, 3), np.uint8)).save(root / "train" / "dog" / "1.png")


def _empty(root: Path) -> None:
    (root / "train" / "cat").mkdir(parents=True)


def _one_name_twice(root: Path, other: str = "0.jpg") -> None:
    """Two images a PNG output (or a wds sample's key) cannot tell apart: the second was taken for the first's
    output already there (exit 0, one image lost without a word)."""
    make_tree(root, n=1, size=16)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "train" / "cat" / other)


def _one_key_twice(root: Path) -> None:
    _one_name_twice(root, "0.x.png")  # a wds key has no dot: 0_x, as 0_x.png's
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "train" / "cat" / "0_x.png")


@pytest.mark.parametrize(
    ("make", "extra", "says"),
    [
        (lambda r: make_tree(r, n=1, size=20), [], "images are 20x20, not a multiple of the block size 16"),
        (lambda r: make_tree(r, n=1, size=16), ["--size", "100"], "--size 100 is not a multiple of the block size 16"),
        (_mixed, ["--block-size", "4"], "train/dog/1.png is 16x24); pass --size"),
        (_empty, [], "no images found"),
        (lambda r: make_tree(r, n=1, size=16), ["--scheme", "mix"], "float16 ciphertext; png holds uint8"),
        (lambda r: make_tree(r, n=1, size=16), ["--scheme", "lift", "--format", "wds"], "wds holds uint8"),
        # a typo's size: 120 GB allocated for one image's resize, then a traceback
        (lambda r: make_tree(r, n=1, size=16), ["--size", "100000", "--block-size", "16"], "--size 100000: at most"),
        (_one_name_twice, [], "train/cat/0.jpg and train/cat/0.png would both be written as train/cat/0.png"),
        (_one_key_twice, ["--format", "wds"], "0_x.png would both be written as train/cat/0_x"),
        # npz keeps both paths, but its decryption writes PNG files: never decryptable whole (second reader)
        (_one_name_twice, ["--format", "npz"], "train/cat/0.jpg and train/cat/0.png would both be written as"),
        # a mixing's matrix is (3 p^2)^2: 18 GiB at blocks of 128, then a MemoryError's traceback
        (
            lambda r: make_tree(r, n=1, size=64),
            ["--scheme", "lift", "--block-size", "64", "--format", "npz"],
            "at most 3072",
        ),
    ],
    ids=[
        "block-vs-image",
        "block-vs-size",
        "mixed-sizes",
        "empty",
        "mix-as-png",
        "lift-as-wds",
        "huge-size",
        "one-png-name",
        "one-wds-key",
        "one-npz-name",
        "huge-mixing",
    ],
)
def test_parameter_mistakes_are_one_line_before_any_work(
    tmp_path: Path, key_file: Path, capsys, make, extra: list[str], says: str
) -> None:
    make(tmp_path / "src")
    code = cli.main(["-q", "encrypt", str(tmp_path / "src"), str(tmp_path / "enc"), "--key", str(key_file), *extra])
    err = capsys.readouterr().err
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "enc").exists()  # nothing written, not even the manifest


@pytest.mark.parametrize("where", ["the source", "inside the source", "a folder of other files"])
def test_an_output_over_its_source_or_a_foreign_folder_is_refused(
    tmp_path: Path, key_file: Path, capsys, where: str
) -> None:
    """``encrypt SRC SRC`` took every plain image for its own output already there: exit 0, and a manifest declaring
    the plain images ciphertext (hostile tester). An output is now apart from its source, and a folder holding
    files is continued only where it holds a ppvit manifest."""
    src = tmp_path / "src"
    make_tree(src, n=1, size=16)
    dst = {"the source": src, "inside the source": src / "enc", "a folder of other files": tmp_path / "mine"}[where]
    if where == "a folder of other files":
        make_tree(dst, n=1, size=16, seed=1)
    before = tree_digest(src), tree_digest(dst)
    code = cli.main(["-q", "encrypt", str(src), str(dst), "--key", str(key_file)])
    err = capsys.readouterr().err
    says = "give a new or empty folder" if where == "a folder of other files" else "overlaps the source"
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert (tree_digest(src), tree_digest(dst)) == before  # nothing written, not even a manifest


def test_an_output_folder_of_hidden_files_only_is_taken_and_a_name_that_is_no_folder_overlaps_nothing(
    tmp_path: Path, key_file: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder holding only ``.DS_Store`` was refused as "holds files"; a source named, not on disk (``cifar10``,
    a hub name) was compared as a folder of the working directory (second reader)."""
    from ppvit.data.encrypt import check_apart

    make_tree(tmp_path / "src", n=1, size=16)
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / ".DS_Store").write_bytes(b"x")
    code = cli.main(["-q", "encrypt", str(tmp_path / "src"), str(tmp_path / "enc"), "--key", str(key_file)])
    assert code == 0, capsys.readouterr().err
    monkeypatch.chdir(tmp_path)

    check_apart("cifar10", Path("cifar10/enc"))  # no error: nothing named cifar10 here


def test_a_run_that_fails_mid_shard_leaves_no_temporary_shard(
    tmp_path: Path, key_file: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk under ``--format wds``: the shard being written stayed as a temporary file, and tarfile's
    stream, collected later, printed "Exception ignored ... Traceback ... No space left on device" after the one
    error line (hostile tester). The run's open shards are now closed and deleted."""
    import gc
    import sys

    from ppvit.data import sinks

    class Full(io.FileIO):
        def write(self, b: bytes) -> int:
            if self.tell() + len(b) > 3000:
                raise OSError(28, "No space left on device")
            return super().write(b)

    monkeypatch.setattr(sinks.os, "fdopen", lambda fd, mode: Full(fd, "w"))
    unraisable: list = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    make_tree(tmp_path / "src", n=4, size=16)
    code = cli.main(
        ["-q", "encrypt", str(tmp_path / "src"), str(tmp_path / "enc"), "--key", str(key_file), "--format", "wds"]
    )
    gc.collect()
    err = capsys.readouterr().err
    assert code != 0 and "No space left on device" in err and len(err.strip().splitlines()) == 1, err
    assert unraisable == [] and list((tmp_path / "enc").rglob("*.tmp")) == []
    assert list((tmp_path / "enc").rglob("*.tar")) == []  # and nothing half-written committed


def test_workers_are_bounded_by_the_images_and_cpus(
    tmp_path: Path, key_file: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--workers 300`` for 4 images forked 300 processes (100,000: thousands, before the machine stopped it)."""
    from ppvit.data import encrypt

    started: list[int] = []
    run = encrypt.transform_all
    monkeypatch.setattr(
        encrypt, "transform_all", lambda items, init, n, consume: (started.append(n), run(items, init, 1, consume))
    )
    make_tree(tmp_path / "src", n=1, size=16)  # 4 images
    code = cli.main(
        ["-q", "encrypt", str(tmp_path / "src"), str(tmp_path / "enc"), "--key", str(key_file), "--workers", "300"]
    )
    assert code == 0, capsys.readouterr().err
    assert started == [min(4, os.cpu_count() or 1)]


def test_key_never_appears_in_outputs_or_messages(tmp_path: Path, key_file: Path, capsys) -> None:
    make_tree(tmp_path / "src")
    cli.main(["encrypt", str(tmp_path / "src"), str(tmp_path / "enc"), "--key", str(key_file), "--block-size", "4"])
    cli.main(
        [
            "preview",
            str(tmp_path / "src"),
            str(tmp_path / "p.png"),
            "--key",
            str(key_file),
            "--size",
            "16",
            "--block-size",
            "4",
        ]
    )
    out = capsys.readouterr()
    assert "encrypted 12 images" in out.out  # not quiet: messages were printed, and are scanned
    assert_no_key_material([tmp_path / "enc", tmp_path / "p.png", out.out, out.err], Key.load(key_file))
    assert Image.open(tmp_path / "p.png").size[0] > 0


def test_keygen_refuses_overwrite(tmp_path: Path, capsys) -> None:
    path = tmp_path / "k.key"
    assert cli.main(["keygen", str(path)]) == 0
    content = path.read_bytes()
    assert cli.main(["keygen", str(path)]) == 2
    assert path.read_bytes() == content
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    out = capsys.readouterr()
    assert_no_key_material([out.out, out.err], Key.load(path))


@pytest.mark.slow  # (minutes in all with the others: make test-slow)
@pytest.mark.data
def test_cifar10_copy_encrypts_at_224(tmp_path: Path, key_file: Path) -> None:
    data = os.environ.get("PPVIT_CIFAR10")
    if not data:
        pytest.skip("PPVIT_CIFAR10 is not set")
    from ppvit.experiments.preview import encryption_demo

    report = encryption_demo(data, tmp_path / "demo", n=20)
    assert report.images == 20 and report.round_trip_exact and report.failed == 0
    enc = next((tmp_path / "demo" / "encrypted").rglob("*.png"))
    assert read_png(enc).shape == (224, 224, 3)
    demo_key = tmp_path / "demo" / "demo.key"
    assert_no_key_material([tmp_path / "demo", str(report)], Key.load(demo_key), skip=[demo_key])


def test_encrypt_bar_has_a_total_and_counts_skipped_images(tmp_path: Path, key_file: Path, capsys) -> None:
    make_tree(tmp_path / "src")  # 12 images
    args = ["encrypt", str(tmp_path / "src"), str(tmp_path / "enc"), "--key", str(key_file), "--block-size", "4"]
    for _ in range(2):  # the second run skips all 12
        assert cli.main(args) == 0
        assert "| 12/12 [" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["npz", "wds"])
def test_decrypt_restores_shards_as_png_files(tmp_path: Path, key_file: Path, fmt: str) -> None:
    images = make_tree(tmp_path / "src")
    base = ["-q", "--key", str(key_file), "--block-size", "4"]
    assert cli.main(["encrypt", str(tmp_path / "src"), str(tmp_path / "enc"), "--format", fmt, *base]) == 0
    assert cli.main(["decrypt", str(tmp_path / "enc"), str(tmp_path / "dec"), "-q", "--key", str(key_file)]) == 0
    for rel, arr in images.items():
        np.testing.assert_array_equal(read_png(tmp_path / "dec" / rel), arr)


@pytest.mark.parametrize("fmt", ["npz", "wds"])
@pytest.mark.parametrize("name", ["../../escaped", "/ABS/escaped"])
def test_decrypt_refuses_a_shard_whose_image_paths_leave_the_output(
    tmp_path: Path, key_file: Path, capsys, fmt: str, name: str
) -> None:
    """An encrypted dataset written or altered by someone else: its npz ``paths`` or wds member names were the
    output names unchecked, so ``ppvit decrypt`` wrote outside DST and said it had decrypted them (hostile tester)."""
    make_tree(tmp_path / "src", n=1)
    base = ["-q", "--key", str(key_file), "--block-size", "4"]
    assert cli.main(["encrypt", str(tmp_path / "src"), str(tmp_path / "enc"), "--format", fmt, *base]) == 0
    name = name.replace("/ABS", str(tmp_path))
    if fmt == "npz":
        shard = tmp_path / "enc" / "train" / "shard-00000.npz"
        arrays = dict(np.load(shard))
        arrays["paths"] = np.array([f"{name}-{i}.png" for i in range(len(arrays["paths"]))])
        np.savez(shard, **arrays)
    else:
        shard = tmp_path / "enc" / "train" / "shard-000000.tar"
        with tarfile.open(fileobj=io.BytesIO(shard.read_bytes())) as old, tarfile.open(shard, "w") as new:
            for member in old.getmembers():
                data = old.extractfile(member).read()
                member.name = f"{name}/{member.name}"  # its class kept: cat/0.png
                new.addfile(member, io.BytesIO(data))
    code = cli.main(["decrypt", str(tmp_path / "enc"), str(tmp_path / "out" / "dec"), "-q", "--key", str(key_file)])
    err = capsys.readouterr().err
    assert code == 2 and "is an unsafe path" in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.rglob("escaped*"))


def test_wds_shards_each_hold_every_class_not_runs_of_one(tmp_path: Path, key_file: Path) -> None:
    make_tree(tmp_path / "src", n=8)  # per split: 8 cat then 8 dog, in source order
    args = ["-q", "encrypt", str(tmp_path / "src"), str(tmp_path / "enc"), "--key", str(key_file), "--block-size", "4"]
    assert cli.main([*args, "--format", "wds", "--shard-size", "4"]) == 0
    for split in ("train", "test"):
        shards = sorted((tmp_path / "enc" / split).glob("shard-*.tar"))
        assert len(shards) == 4
        for shard in shards:
            with tarfile.open(shard) as tar:
                labels = sorted(tar.extractfile(m).read() for m in tar if m.name.endswith(".cls"))
            assert labels == [b"0", b"0", b"1", b"1"], shard  # 2 cats, 2 dogs: before, shards 0-1 all cats


def _blocks(images: np.ndarray, p: int) -> np.ndarray:
    """(N, H, W, C) -> (N, blocks, p*p*C), each block's values in (row, column, channel) order."""
    n, h, w, c = images.shape
    return images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, -1, p * p * c)


@pytest.mark.parametrize(("scheme", "dtype"), [("mix", np.float16), ("lift", np.int16)])
def test_dense_mixing_writes_npz_of_its_dtype_and_decrypts(tmp_path: Path, scheme: str, dtype: type) -> None:
    """`encrypt --scheme mix|lift --format npz`: shards of float16 / int16 ciphertext, the documented map
    recomputed here from the key's matrix; the manifest states scheme, dtype, block, size and fingerprint;
    `decrypt` gives the images back: exactly for lift, and for mix within the float16 rounding, bounded here.

    Bound for mix: ``y = A (x - 127.5) + 127.5`` is stored as ``y + e`` with ``|e_i| <= 2^-11 |y_i|``
    (float16 keeps 11 significant bits, round to nearest), so ``x' - x = A^T e`` and, A being orthogonal,
    ``|x'_j - x_j| <= ||e||_2 <= 2^-11 ||y||_2`` per block. Decryption rounds to the nearest integer, so it
    is exact wherever the error stays under 0.5 (measured on these images: well under it)."""
    from ppvit.crypto.mixing import lift_layers, lift_matrix, orthogonal_matrix

    key_path = tmp_path / "k.key"
    KEY.save(key_path)
    images = make_tree(tmp_path / "src", n=2, size=8)
    enc, dec = tmp_path / "enc", tmp_path / "dec"
    flags = ["--key", str(key_path), "--scheme", scheme, "--block-size", "4", "--format", "npz"]
    assert cli.main(["-q", "encrypt", str(tmp_path / "src"), str(enc), *flags]) == 0
    m = read_manifest(enc)
    assert (m.scheme, m.dtype, m.block_size, m.size, m.key_fingerprint, m.format, m.complete) == (
        scheme, np.dtype(dtype).name, 4, None, KEY.fingerprint, "npz", True
    )  # fmt: skip
    shards = [read_npz(s) for s in sorted(enc.rglob("shard-*.npz"))]
    stored = {rel: im for s in shards for rel, im in zip(s.paths, s.images, strict=True)}
    assert sorted(stored) == sorted(images)
    assert all(s.images.dtype == dtype for s in shards)
    plain = np.stack([images[rel] for rel in sorted(stored)])
    cipher = np.stack([stored[rel] for rel in sorted(stored)])
    x = _blocks(plain, 4).astype(np.float64)
    if scheme == "lift":
        u = lift_matrix(lift_layers(KEY, 4, 3), 48)
        np.testing.assert_array_equal(_blocks(cipher, 4), np.einsum("ij,nbj->nbi", u, x.astype(np.int64) - 128))
    else:
        a = orthogonal_matrix(KEY, 4, 3)
        y = np.einsum("ij,nbj->nbi", a, x - 127.5) + 127.5  # the real-valued ciphertext
        y16 = _blocks(cipher, 4).astype(np.float64)
        np.testing.assert_allclose(y16, y, rtol=2.0**-11, atol=0)  # float16 rounding of y, nothing else
        err = np.abs(np.einsum("ji,nbj->nbi", a, y16 - 127.5) + 127.5 - x)  # decrypted before rounding
        assert (err.max(-1) <= 2.0**-11 * np.linalg.norm(y, axis=-1) + 1e-9).all()
        assert err.max() < 0.5, err.max()  # so rounding restores every pixel (measured: 0.104)
    assert cli.main(["-q", "decrypt", str(enc), str(dec), "--key", str(key_path)]) == 0
    for rel, arr in images.items():
        np.testing.assert_array_equal(read_png(dec / rel), arr)


def test_a_shard_whose_dtype_is_not_the_manifests_is_refused_naming_it(tmp_path: Path) -> None:
    """The manifest's dtype is checked against every shard read: a shard of another dtype is damage, one line."""
    import json

    key_path = tmp_path / "k.key"
    KEY.save(key_path)
    make_tree(tmp_path / "src", n=1, size=8)
    flags = ["--key", str(key_path), "--scheme", "lift", "--block-size", "4", "--format", "npz"]
    assert cli.main(["-q", "encrypt", str(tmp_path / "src"), str(tmp_path / "enc"), *flags]) == 0
    assert load_source_split(tmp_path / "enc", "train").images.dtype == np.int16
    manifest = tmp_path / "enc" / "ppvit-manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "dtype": "int32"}))
    with pytest.raises(ValueError, match=r"shard-00000.npz: holds int16, its manifest says int32"):
        load_source_split(tmp_path / "enc", "train")
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "dtype": "float64"}))
    with pytest.raises(ValueError, match=r"damaged \(dtype 'float64' is none of uint8, float16, int16, int32\)"):
        load_source_split(tmp_path / "enc", "train")
