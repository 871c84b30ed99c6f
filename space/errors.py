"""The project's error hierarchy. The CLI turns a RepnasError into one line on stderr and exit code 2."""

from __future__ import annotations


class RepnasError(Exception):
    """A user error: bad input, named with its file, field, value and fix. Not a bug."""


class ConfigError(RepnasError, ValueError):
    """A YAML file or dict that cannot be used as given."""


class ModelConfigError(ConfigError):
    """A model YAML (YOLOv5 format) that cannot be built."""


class SpaceConfigError(ConfigError):
    """A search-space YAML, or params/Arch outside the space."""


def shorten(text: object, limit: int) -> str:
    """`text` on one line (whitespace collapsed), at most `limit` characters: a longer one is cut at a word boundary
    and ends with "…", so no message or stored reason ends in a broken word ("torch.Siz")."""
    line = " ".join(str(text).split())
    if len(line) <= limit:
        return line
    cut = line[:limit - 1]
    space = cut.rfind(" ")
    if space >= limit // 2:  # else one very long word (a path): cut inside it, the "…" says so
        cut = cut[:space]
    return cut.rstrip(" ,;:(") + "…"
