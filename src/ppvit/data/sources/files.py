"""Image files: a folder tree in ImageFolder layout, a tar/tar.gz archive of one, or a single image.

An archive is read member by member, never extracted. A damaged archive or a member that would
land outside an output folder (``../x``, ``/x``) stops the run; an unreadable file (permissions,
a dangling or looping symbolic link) is one failed image, named like any other.
"""

from __future__ import annotations

import errno
import os
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from ppvit._io import too_large
from ppvit.data.sources.base import (
    IMAGE_SUFFIXES,
    MAX_IMAGE_BYTES,
    Item,
    Select,
    Source,
    is_image_path,
    read_image_file,
)
from ppvit.data.sources.wds import members


class FilesSource(Source):
    """Images as files: ``[split/]class/name.jpg`` below a folder or in an archive; the path itself for one image."""

    kind: ClassVar[str] = "files"

    @classmethod
    def claims(cls, path: str) -> bool:
        p = Path(path)
        return p.is_dir() or p.suffix.lower() in IMAGE_SUFFIXES or (p.is_file() and tarfile.is_tarfile(p))

    def files(self) -> list[Path]:
        """A folder's every image file, not the folder alone: an image added to (or replaced in) a class folder
        leaves the top folder's time as it was, and the decoded-image cache served the images from before."""
        src = Path(self.path)
        return [src, *_image_files(src)] if src.is_dir() else [src]

    def _items(self, select: Select = None) -> Iterator[Item]:
        src = Path(self.path)
        if src.is_dir():
            for path in _image_files(src):
                rel = path.relative_to(src).as_posix()
                if select is None or select(rel):
                    yield rel, _read(path)
        elif src.suffix.lower() in IMAGE_SUFFIXES and not tarfile.is_tarfile(src):
            yield src.name, _read(src)
        else:
            yield from _archive_items(src, select)

    def _paths(self, select: Select = None) -> Iterator[str]:
        src = Path(self.path)
        if src.is_dir():
            rels: Iterator[str] = (path.relative_to(src).as_posix() for path in _image_files(src))
        elif src.suffix.lower() in IMAGE_SUFFIXES and not tarfile.is_tarfile(src):
            rels = iter([src.name])
        else:
            rels = _archive_paths(src)
        yield from (rel for rel in rels if select is None or select(rel))


def _image_files(root: Path) -> list[Path]:
    """Image files below ``root``, sorted; a symbolic link that is not to a folder counts (a broken one is reported)."""
    return sorted(
        p
        for p in root.rglob("*")
        if is_image_path(p.relative_to(root).as_posix()) and (p.is_file() or (p.is_symlink() and not p.is_dir()))
    )


def _archive_items(src: Path, select: Select) -> Iterator[Item]:
    try:
        with tarfile.open(src, "r:*") as tar:
            reader = _TarMembers(tar)
            for member, rel in _image_members(tar, src):
                if select is None or select(rel):
                    yield rel, reader.read(member)  # its path checked by Source.items
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise ValueError(f"archive {src}: damaged ({exc.__class__.__name__}: {exc})") from None


def _image_members(tar: tarfile.TarFile, src: Path) -> Iterator[tuple[tarfile.TarInfo, str]]:
    """Each member that is an image (a file, or a link that may be one) and its path, in order; a cut archive (its
    header cut) is damaged, not shorter. A path twice (``tar -r`` appends a changed file again; ``./x`` and ``x``)
    stops the read naming it: one of the two images was dropped without a word."""
    seen: set[str] = set()
    for member in members(tar, src):
        rel = member.name.removeprefix("./")
        if not ((member.isfile() or member.issym() or member.islnk()) and is_image_path(rel)):
            continue
        if (same := posixpath.normpath(rel)) in seen:
            raise ValueError(f"archive {src}: {rel} appears twice (two members of one name); keep one")
        seen.add(same)
        yield member, rel


def _archive_paths(src: Path) -> Iterator[str]:
    """The image members' paths from the tar headers alone (an uncompressed archive's data are skipped, not read)."""
    try:
        with tarfile.open(src, "r:*") as tar:
            yield from (rel for _, rel in _image_members(tar, src))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise ValueError(f"archive {src}: damaged ({exc.__class__.__name__}: {exc})") from None


def _read(path: Path) -> bytes | OSError:
    """An unreadable file is one failed image, not the end of the run."""
    try:
        return read_image_file(path)
    except OSError as exc:
        if path.is_symlink() and exc.errno is not None:  # dangling or looping: say so
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            return OSError(exc.errno, f"symbolic link to {target}: {exc.strerror}")
        return exc


class _TarMembers:
    """Reads a tar member, following symbolic and hard links inside the archive only.

    An archive is never extracted, so no link is ever resolved on the file system. A symbolic
    link is resolved against its member's folder, a hard link against the archive's root (and
    only to a member before it, as tar writes them). A link that leaves the archive (``/x``,
    ``../x``), names no member, loops, or ends at something other than a file is an unreadable
    image (an ``OSError`` value), named like a dangling link in a folder; so is a member over ``MAX_IMAGE_BYTES``,
    as a file would be, before any of it is read.
    """

    MAX_HOPS = 40  # as Linux's limit on nested symbolic links

    def __init__(self, tar: tarfile.TarFile) -> None:
        self.tar = tar
        self.index: dict[str, tarfile.TarInfo] | None = None  # built at the first link: it reads every header

    def _find(self, name: str) -> tarfile.TarInfo | None:
        if self.index is None:
            self.index = {posixpath.normpath(m.name): m for m in self.tar.getmembers()}  # the last of a name wins
        return self.index.get(name)

    def read(self, member: tarfile.TarInfo) -> bytes | OSError:
        link = f"{'symbolic' if member.issym() else 'hard'} link to {member.linkname}"
        target = member
        for _ in range(self.MAX_HOPS):
            if not (target.issym() or target.islnk()):
                break
            why = link if target is member else f"{link}, via {target.name} -> {target.linkname}"
            base = posixpath.dirname(target.name) if target.issym() else ""
            name = posixpath.normpath(posixpath.join(base, target.linkname))
            if posixpath.isabs(target.linkname) or name == ".." or name.startswith("../"):
                return OSError(errno.EXDEV, f"{why}: outside the archive, not followed")
            found = self._find(name)
            if found is None or (target.islnk() and found.offset >= target.offset):
                return OSError(errno.ENOENT, f"{why}: not in the archive")
            target = found
        else:
            return OSError(errno.ELOOP, f"{link}: {os.strerror(errno.ELOOP)}")
        if not target.isfile():
            return OSError(errno.EISDIR, f"{link}: not a file in the archive")
        if target.size > MAX_IMAGE_BYTES:  # its header says so: 300 MB of zeros were read whole from a 310 KB tar.gz
            return too_large(target.size, MAX_IMAGE_BYTES, "an image")
        return self.tar.extractfile(target).read()
