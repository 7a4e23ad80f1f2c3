"""``ppvit encrypt`` output in PNG files (the default format): the source tree, one PNG per image, and the manifest.

Also ``ppvit decrypt`` output, whose manifest names the scheme ``plain``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from ppvit.data.manifest import MANIFEST_NAME, read_manifest
from ppvit.data.sources.base import Columns, SplitNames, manifest_format
from ppvit.data.sources.files import FilesSource


class EncryptedPng(FilesSource):
    """A folder of PNGs in ImageFolder layout with a manifest; read as image files."""

    kind: ClassVar[str] = "encrypted-png"

    def __init__(
        self, path: str | os.PathLike, columns: Columns | None = None, splits: SplitNames | None = None
    ) -> None:
        super().__init__(path, columns, splits)
        self.manifest = read_manifest(path)

    @classmethod
    def claims(cls, path: str) -> bool:
        return manifest_format(path) == "png"

    def files(self) -> list[Path]:
        return [Path(self.path) / MANIFEST_NAME]  # rewritten at the end of every run that changes the folder
