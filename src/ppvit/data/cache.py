"""The cache folder, and the decoded-image cache in it.

A privacy tool caches plain images here (a decoded training split, pixels as they are), so the
cache is private: folders 0700, files 0600. ``PPVIT_CACHE=off`` turns the decoded-image cache
off (every load decodes again); downloads and pretrained upstream models still go to the default
folder. Torch-free.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

CACHE_ENV = "PPVIT_CACHE"
CACHE_OFF = "off"


def cache_dir() -> Path:
    """Where ppvit caches (downloads, pretrained upstream models, decoded images): $PPVIT_CACHE or ~/.cache/ppvit.

    Created private (0700) when it does not exist; an existing folder (it may be one the user
    named, such as a shared /tmp) keeps its mode.
    """
    chosen = os.environ.get(CACHE_ENV)
    d = Path(chosen) if chosen and chosen != CACHE_OFF else Path.home() / ".cache" / "ppvit"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d


def decoded_cache() -> Path | None:
    """The folder of decoded images (``cache_dir()/decoded``, made 0700 whatever it was), or None when off."""
    if os.environ.get(CACHE_ENV) == CACHE_OFF:
        return None
    d = cache_dir() / "decoded"
    d.mkdir(mode=0o700, exist_ok=True)
    if stat.S_IMODE(d.stat().st_mode) != 0o700:
        d.chmod(0o700)
    return d
