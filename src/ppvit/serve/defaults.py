"""Registry defaults the CLI's parser shows, importable without torch (``ppvit --help`` stays fast)."""

MAX_CLASSES = 10_000  # a head's classes: every answer carries one probability per class
KEEP_VERSIONS = 2  # adapter versions a tenant keeps: the active one and the one requests may still be on
