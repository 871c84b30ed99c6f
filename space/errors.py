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
