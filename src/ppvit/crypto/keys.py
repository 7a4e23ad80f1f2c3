"""Secret keys, key files, fingerprints and the version-stable derivation of permutations.

Everything keyed in ppvit (pixel permutations, block orders, per-block choices) comes from
one 256-bit secret through this derivation, never from numpy's or torch's random streams,
whose algorithms may change between releases. The derivation, version 1, is:

* a *label* names what is derived and from which parameters, e.g.
  ``b"ppvit/v1/shuffle/p=16/c=3"``;
* the byte stream for a label is ``HMAC-SHA256(secret, label || 0x00 || counter)`` for
  ``counter = 0, 1, 2, ...`` (8-byte big-endian), concatenated;
* an integer below ``n`` takes 4 bytes as a big-endian ``u32`` and rejects values at or
  above the largest multiple of ``n`` below 2**32 (no modulo bias);
* a permutation of ``n`` is a Fisher-Yates shuffle of ``0..n-1`` that, for
  ``i = n-1 .. 1``, swaps position ``i`` with position ``randbelow(i + 1)``.

Golden vectors in the tests lock this in: a dataset encrypted today decrypts with every
later version of ppvit.

A key may pin the geometry it encrypts with (:class:`Geometry`: scheme, block size, input
side), written in its key file. The pin changes no derived permutation, only the fingerprint,
which then binds the geometry too: a client holding the key refuses a server that states other
settings (a block size of 1 would leave each pixel's colour in place). Keys without a pin
keep the fingerprint they always had. A pin is also every verb's default, and its refusal of
anything else: :func:`settle` is that one rule (an encrypted dataset's manifest is held to it too).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from ppvit._io import _naming, read_json

KEY_FORMAT = "ppvit-key"
KEY_VERSION = 1
SECRET_BYTES = 32
MAX_INPUT_SIZE = 4096
MAX_KEY_FILE_BYTES = 1 << 16  # a key file is about 250 bytes: 64 KiB is room for any editing, a megabyte is no key
"""The largest input side ppvit resizes to and encrypts at: ViTs take 224-518; one of 100,000 is a typo that would
allocate tens of GB (120 GB for one image's resize) before saying anything."""


T = TypeVar("T")


class KeyFileError(ValueError):
    """A key file that is missing, damaged, of another version or not private."""


class PinError(ValueError):
    """A setting asked for that differs from the one a key file pins (or an encrypted dataset records)."""


def settle(name: str, asked: T | None, fixed: T | None, owner: str, default: T | None = None) -> T | None:
    """The value of setting ``name``: ``fixed`` (a key's pin, a manifest's record) when nothing is asked,
    what is asked when nothing is fixed, else ``default``; asked and fixed differing is a one-line refusal,
    ``owner`` naming what fixes it ("key file k.key pins", "encrypted dataset D records").

    Callers compare canonical values (a scheme as ``str(Scheme.parse(...))`` writes it)."""
    if asked is not None and fixed is not None and asked != fixed:
        raise PinError(f"{owner} {name} {fixed}, not {asked}")
    return next((v for v in (asked, fixed) if v is not None), default)


@dataclass(frozen=True)
class Geometry:
    """The settings a key encrypts with: the scheme (as ``str(Scheme)`` writes it), block size, input side."""

    scheme: str
    block_size: int
    input_size: int

    def __post_init__(self) -> None:
        ints = (self.block_size, self.input_size)
        if not isinstance(self.scheme, str) or not all(type(n) is int and n > 0 for n in ints):
            raise ValueError(f"a pinned geometry is a scheme and two positive integers, not {self}")
        if self.input_size % self.block_size:
            raise ValueError(f"input size {self.input_size} is not a multiple of block size {self.block_size}")
        if self.input_size > MAX_INPUT_SIZE:
            raise ValueError(f"input size {self.input_size}: at most {MAX_INPUT_SIZE}")

    def label(self) -> bytes:
        return f"scheme={self.scheme};block={self.block_size};size={self.input_size}".encode()


@dataclass(frozen=True)
class Key:
    """A 256-bit secret and the geometry it is pinned to, if any; ``repr`` and logs show only the fingerprint."""

    secret: bytes = field(repr=False)
    pin: Geometry | None = None
    source: str | None = field(default=None, repr=False, compare=False)  # the key file it was read from

    def settle(self, name: str, asked: T | None, default: T | None = None) -> T | None:
        """:func:`settle` against this key's pin; ``name`` is a :class:`Geometry` field (``block_size``)."""
        fixed = None if self.pin is None else getattr(self.pin, name)
        owner = f"key file {self.source} pins" if self.source else "the key pins"
        return settle(name.replace("_", " "), asked, fixed, owner, default)

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) != SECRET_BYTES:
            raise ValueError(f"a key secret is {SECRET_BYTES} bytes")

    def __repr__(self) -> str:
        return f"Key(fingerprint={self.fingerprint!r})"

    @classmethod
    def generate(cls, pin: Geometry | None = None) -> Key:
        """A fresh key from the operating system's CSPRNG (``secrets``)."""
        return cls(secrets.token_bytes(SECRET_BYTES), pin)

    @property
    def fingerprint(self) -> str:
        """16 hex digits identifying the key (and its pinned geometry); a keyed hash, so it reveals nothing of it."""
        label = b"ppvit/v1/fingerprint" + (b"" if self.pin is None else b"/" + self.pin.label())
        return hmac.new(self.secret, label, hashlib.sha256).hexdigest()[:16]

    # -- derivation ---------------------------------------------------------------------

    def stream(self, label: str) -> KeyStream:
        """The deterministic random stream for ``label`` (see the module docstring)."""
        return KeyStream(self.secret, label)

    def permutation(self, label: str, n: int) -> np.ndarray:
        """A uniformly random permutation of ``range(n)`` as int64, fixed by key and label."""
        return self.stream(label).permutation(n)

    def choices(self, label: str, n: int, k: int) -> np.ndarray:
        """``n`` independent uniform integers in ``range(k)`` as int64."""
        s = self.stream(label)
        return np.array([s.randbelow(k) for _ in range(n)], dtype=np.int64)

    # -- files ---------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write a key file with mode 0600; refuse to overwrite an existing file."""
        path = Path(path)
        doc = {
            "format": KEY_FORMAT,
            "version": KEY_VERSION,
            "fingerprint": self.fingerprint,
            "secret": self.secret.hex(),
        }
        if self.pin is not None:
            doc["pin"] = {
                "scheme": self.pin.scheme,
                "block_size": self.pin.block_size,
                "input_size": self.pin.input_size,
            }
        data = (json.dumps(doc, indent=2) + "\n").encode()
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.link(tmp, path)  # atomic and fails if path exists: never overwrites
            finally:
                tmp.unlink(missing_ok=True)
        except FileExistsError:
            raise KeyFileError(f"key file {path}: already exists, refusing to overwrite it") from None
        except OSError as exc:  # the key's own name, not the temporary one (a missing folder, a read-only disk)
            raise _naming(exc, path) from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> Key:
        """Read a key file, checking format, version, integrity and permissions."""
        path = Path(path)

        def bad(problem: str) -> KeyFileError:
            return KeyFileError(f"key file {path}: {problem}")

        try:
            st = path.stat()
            doc = read_json(path, MAX_KEY_FILE_BYTES, "a key file")
        except FileNotFoundError:
            raise bad("not found") from None
        except OSError as exc:
            raise bad(f"cannot be read ({exc.strerror})") from None
        except ValueError:
            raise bad("not a ppvit key file (truncated or not JSON)") from None
        if not isinstance(doc, dict) or doc.get("format") != KEY_FORMAT:
            raise bad("not a ppvit key file")
        # The mode only after the content: asking to chmod a file that is no key at all misleads.
        if os.name == "posix" and st.st_mode & 0o077:
            mode = stat.S_IMODE(st.st_mode)
            raise bad(f"readable by other users (mode {mode:04o}); run: chmod 600 {path}")
        if doc.get("version") != KEY_VERSION:
            raise bad(f"key format version {doc.get('version')!r} is not supported (this ppvit reads {KEY_VERSION})")
        secret_hex = doc.get("secret")
        try:
            secret = bytes.fromhex(secret_hex) if isinstance(secret_hex, str) else b""
        except ValueError:
            secret = b""
        if len(secret) != SECRET_BYTES:
            raise bad(f"damaged: the secret is not {SECRET_BYTES} bytes of hex")
        pin = doc.get("pin")
        try:
            key = cls(secret, None if pin is None else Geometry(**pin), str(path))
        except (TypeError, ValueError):
            raise bad("damaged: the pinned geometry is not a scheme, a block size and an input size") from None
        if doc.get("fingerprint") != key.fingerprint:
            raise bad("damaged: the stored fingerprint does not match the secret")
        return key


class KeyStream:
    """HMAC-SHA256 in counter mode; see the module docstring for the exact definition."""

    def __init__(self, secret: bytes, label: str) -> None:
        self._secret = secret
        self._label = label.encode("utf-8") + b"\x00"
        self._blocks = self._generate()
        self._buf = b""

    def _generate(self) -> Iterator[bytes]:
        counter = 0
        while True:
            yield hmac.new(self._secret, self._label + counter.to_bytes(8, "big"), hashlib.sha256).digest()
            counter += 1

    def read(self, n: int) -> bytes:
        """The next ``n`` bytes of the stream (blocks joined once: a keyed matrix reads megabytes)."""
        parts, have = [self._buf], len(self._buf)
        while have < n:
            parts.append(next(self._blocks))
            have += 32
        buf = b"".join(parts)
        out, self._buf = buf[:n], buf[n:]
        return out

    def randbelow(self, n: int) -> int:
        """A uniform integer in ``range(n)`` by rejection sampling of big-endian u32s."""
        if not 0 < n <= 2**32:
            raise ValueError(f"randbelow needs 0 < n <= 2**32, got {n}")
        limit = 2**32 - (2**32 % n)
        while True:
            u = int.from_bytes(self.read(4), "big")
            if u < limit:
                return u % n

    def permutation(self, n: int) -> np.ndarray:
        """Fisher-Yates: for i = n-1 .. 1 swap items i and randbelow(i + 1)."""
        items = list(range(n))
        for i in range(n - 1, 0, -1):
            j = self.randbelow(i + 1)
            items[i], items[j] = items[j], items[i]
        return np.array(items, dtype=np.int64)
