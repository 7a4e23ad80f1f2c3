"""``ppvit encrypt`` output in PNG files (the default format): the source tree, one PNG per image, and the manifest.

Also ``ppvit decrypt`` output, whose manifest names the scheme ``plain``.
"""

from __future__ import annotations

from typing import ClassVar

from ppvit.data.sources.base import EncryptedFolder
from ppvit.data.sources.files import FilesSource


class EncryptedPng(EncryptedFolder, FilesSource):
    """A folder of PNGs in ImageFolder layout with a manifest; read as image files."""

    format: ClassVar[str] = "png"
    kind: ClassVar[str] = "encrypted-png"
