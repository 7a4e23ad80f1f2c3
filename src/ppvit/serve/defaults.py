"""Registry defaults the CLI's parser shows, importable without torch (``ppvit --help`` stays fast)."""

import re

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a tenant's or a dataset's name (the client checks it too)
NAME_RULE = "use 1-64 letters, digits, '_', '.', '-' (starting alnum)"

MAX_CLASSES = 10_000  # a head's classes (an answer names its top-k only; GET /v1/adapter lists them all)
MAX_CLASS_NAME = 128  # characters of one class name (every answer carries its label)
MAX_CLASS_BYTES = 512 << 10  # UTF-8 bytes of an adapter's or a manifest's class names together (GET /v1/adapter)
KEEP_VERSIONS = 2  # adapter versions a tenant keeps: the active one and the one requests may still be on
