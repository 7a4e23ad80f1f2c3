"""Image files and archives on hostile or damaged input: unsafe paths, truncation, unreadable and hidden files."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import KEY, assert_no_key_material, within_a_minute
from PIL import Image

from ppvit import _io, cli
from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key
from ppvit.data.encrypt import encrypt_collection
from ppvit.data.images import ciphertext_origin, read_ciphertext_array, read_image
from ppvit.data.sources import base, files
from ppvit.data.sources.files import FilesSource


def png_bytes(seed: int, size: int = 16) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, members: dict[str, bytes] | list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items() if isinstance(members, dict) else members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("bad_name", ["../escaped.png", "/tmp/ppvit-escaped.png", "cls/../../escaped.png"])
def test_archive_member_outside_dst_is_refused(tmp_path: Path, bad_name: str) -> None:
    """A member named ../x or /x must never be written outside DST (tar path traversal)."""
    write_tar(tmp_path / "evil.tar", {"cls/a.png": png_bytes(0), bad_name: png_bytes(1)})
    outside = {tmp_path / "escaped.png", tmp_path / "out" / "escaped.png", Path("/tmp/ppvit-escaped.png")}
    Path("/tmp/ppvit-escaped.png").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="unsafe path"):
        encrypt_collection(tmp_path / "evil.tar", tmp_path / "out" / "enc", BlockCipher(KEY), progress=False)
    assert not [p for p in outside if p.exists()]


@pytest.mark.parametrize("twice", ["cls/a.png", "./cls/a.png", "cls//a.png"])
def test_a_member_twice_in_an_archive_is_refused_naming_it(tmp_path: Path, capsys, twice: str) -> None:
    """The second cls/a.png (another image) was dropped: "encrypted 2 images (1 already there)", exit 0 (hostile
    tester); ``./x`` is ``x``."""
    write_tar(tmp_path / "d.tar", [("cls/a.png", png_bytes(0)), ("cls/b.png", png_bytes(1)), (twice, png_bytes(2))])
    Key.generate().save(tmp_path / "k.key")
    code = cli.main(["-q", "encrypt", str(tmp_path / "d.tar"), str(tmp_path / "enc"), "--key", str(tmp_path / "k.key")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"archive {tmp_path / 'd.tar'}: {twice.removeprefix('./')} appears twice" in err, err
    assert not list((tmp_path / "enc").rglob("*.png")) if (tmp_path / "enc").exists() else True


@pytest.mark.parametrize("cut", ["gzip, halved", "tar, in a header"])
def test_truncated_archive_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], cut: str) -> None:
    """A plain tar cut inside a member's header (a copy interrupted) was taken as whole: exit 0, a complete
    manifest, the images after the cut missing without a word (hostile tester): Python's tarfile ends there."""
    write_tar(tmp_path / "d.tar", {f"cls/{i}.png": png_bytes(i, 64) for i in range(8)})
    whole = (tmp_path / "d.tar").read_bytes()
    if cut == "gzip, halved":
        packed, name = gzip.compress(whole), "d.tar.gz"
        (tmp_path / name).write_bytes(packed[: len(packed) // 2])
    else:
        with tarfile.open(tmp_path / "d.tar") as tar:
            fifth = tar.getmembers()[4].offset
        name = "cut.tar"
        (tmp_path / name).write_bytes(whole[: fifth + 200])
    Key.generate().save(tmp_path / "k.key")
    code = cli.main(["-q", "encrypt", str(tmp_path / name), str(tmp_path / "enc"), "--key", str(tmp_path / "k.key")])
    printed = capsys.readouterr()
    assert code == 2 and name in printed.err and "damaged" in printed.err and "Traceback" not in printed.err
    assert not (tmp_path / "enc" / "ppvit-manifest.json").exists()
    assert_no_key_material([printed.out, printed.err], Key.load(tmp_path / "k.key"))


def test_unreadable_file_is_listed_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that cannot be read (permissions, I/O error) is a per-image failure; the others are written."""
    (tmp_path / "src" / "cls").mkdir(parents=True)
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / "src" / "cls" / name).write_bytes(png_bytes(ord(name[0])))
    real = open

    def refusing(path: Path, *args: object) -> object:
        if Path(path).name == "b.png":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args)

    monkeypatch.setattr(_io, "open", refusing, raising=False)  # root ignores chmod 000, so simulate it
    summary = encrypt_collection(tmp_path / "src", tmp_path / "enc", BlockCipher(KEY), progress=False)
    assert summary.written == 2 and [rel for rel, _ in summary.failed] == ["cls/b.png"]
    assert "Permission denied" in summary.failed[0][1]
    assert sorted(p.name for p in (tmp_path / "enc" / "cls").iterdir()) == ["a.png", "c.png"]
    assert_no_key_material([tmp_path / "enc", *summary.failed[0]], KEY)


def test_a_pipe_or_a_huge_file_named_like_an_image_is_a_failed_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link x.png to a FIFO was waited on forever (to /dev/zero: read until memory ran out), a file of
    gigabytes read whole (hostile tester): each is one failed image, named with why, the others written; predict's
    look for a marker and its .npy reader wait on no pipe either (second reader)."""
    monkeypatch.setattr(base, "MAX_IMAGE_BYTES", 2_000)
    (tmp_path / "src" / "cls").mkdir(parents=True)
    (tmp_path / "src" / "cls" / "a.png").write_bytes(png_bytes(1))
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    (tmp_path / "src" / "cls" / "b.png").symlink_to(pipe)  # a listed name (a bare FIFO is not)
    (tmp_path / "src" / "cls" / "c.png").write_bytes(png_bytes(3) + bytes(3_000))
    (tmp_path / "b.npy").symlink_to(pipe)
    summary = within_a_minute(pipe, lambda: encrypt_collection(tmp_path / "src", tmp_path / "enc", BlockCipher(KEY)))
    failed = dict(summary.failed)
    assert summary.written == 1 and sorted(failed) == ["cls/b.png", "cls/c.png"]
    assert "not a regular file" in failed["cls/b.png"] and "over the 2,000 an image may be" in failed["cls/c.png"]
    with pytest.raises(ValueError, match=r"image .*b\.png: cannot be read \(not a regular file"):
        within_a_minute(pipe, lambda: read_image(tmp_path / "src" / "cls" / "b.png", 16))
    assert within_a_minute(pipe, lambda: ciphertext_origin(tmp_path / "src" / "cls" / "b.png")) is None
    with pytest.raises(ValueError, match=r"image .*b\.npy: not a readable .npy array .*not a regular file"):
        within_a_minute(pipe, lambda: read_ciphertext_array(tmp_path / "b.npy", 16, ("uint8",)))


def test_an_archive_member_over_the_image_limit_is_a_failed_image_never_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member of 300 MB of zeros (310 KB gzipped) was read whole into memory (hostile tester): its header says its
    size, so it is a failed image before any of it is read, as a file of that size is."""
    monkeypatch.setattr(files, "MAX_IMAGE_BYTES", 2_000)
    write_tar(tmp_path / "d.tar", {"cls/a.png": png_bytes(1), "cls/big.png": png_bytes(2) + bytes(3_000)})
    read: list[str] = []
    extract = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda tar, m: read.append(m.name) or extract(tar, m))
    summary = encrypt_collection(tmp_path / "d.tar", tmp_path / "enc", BlockCipher(KEY), progress=False)
    failed = dict(summary.failed)
    assert summary.written == 1 and list(failed) == ["cls/big.png"], failed
    assert "bytes, over the 2,000 an image may be" in failed["cls/big.png"] and "cls/big.png" not in read


def _saved(values: list[int] | list[float], dtype: str, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.array([values], dtype=dtype)).save(buf, format=fmt)
    return buf.getvalue()


GREY16 = [0, 128, 129, 257, 32768, 65535]  # value / 257, rounded: 0, 0, 1, 1, 128, 255


@pytest.mark.parametrize(
    ("data", "grey", "error"),
    [
        (_saved(GREY16, "uint16", "PNG"), [0, 0, 1, 1, 128, 255], None),  # was clipped: all but 0 white
        (_saved(GREY16, "uint16", "TIFF"), [0, 0, 1, 1, 128, 255], None),
        (_saved([0.0, 0.5, 1.0], "float32", "TIFF"), None, "mode F (32-bit floating point pixels) has no one scale"),
        (_saved([0, 1 << 20], "int32", "TIFF"), None, "mode I (32-bit integer pixels) has no one scale"),
    ],
    ids=["16-bit png", "16-bit tiff", "float tiff", "int32 tiff"],
)
def test_wide_images_are_scaled_to_8_bits_or_failed_naming_their_mode(data: bytes, grey, error) -> None:
    """PIL's convert("RGB") clips: a 16-bit PNG came out almost all white, a float TIFF all black, exit 0 (hostile
    tester). 16-bit grey has one scale to 8 bits; floats and 32-bit integers have none that is right for all."""
    item = base.decode("c/x.png", data)
    if error is None:
        assert item.error is None and np.asarray(item.image).tolist() == [[[g] * 3 for g in grey]]
    else:
        assert item.image is None and error in item.error


def test_hidden_files_are_not_images(tmp_path: Path) -> None:
    """macOS puts ._name.jpg resource forks into archives; they are not images and not failures."""
    write_tar(
        tmp_path / "mac.tar",
        {"cls/a.png": png_bytes(0), "cls/._a.png": b"\x00\x05\x16\x07 resource fork", ".hidden/b.png": png_bytes(1)},
    )
    assert [rel for rel, _ in FilesSource(tmp_path / "mac.tar").items()] == ["cls/a.png"]
    (tmp_path / "src" / "cls").mkdir(parents=True)
    (tmp_path / "src" / "cls" / "a.png").write_bytes(png_bytes(0))
    (tmp_path / "src" / "cls" / "._a.png").write_bytes(b"\x00\x05\x16\x07")
    assert [rel for rel, _ in FilesSource(tmp_path / "src").items()] == ["cls/a.png"]
