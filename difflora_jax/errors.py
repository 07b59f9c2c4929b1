"""Error types: every bad input ends in one of these, with a message that names the problem."""

from __future__ import annotations


class DiffLoRAError(Exception):
    """Base class for errors this package raises on bad input."""


class ConfigError(DiffLoRAError, ValueError):
    """A configuration field is missing, unknown or out of range."""


class CheckpointError(DiffLoRAError, ValueError):
    """A checkpoint is missing, corrupt, of an unsupported architecture, or does not fit the model."""


class AssetNotFoundError(DiffLoRAError, FileNotFoundError):
    """A named model or file is not on this machine; the message says how to fetch it."""


class DataError(DiffLoRAError, ValueError):
    """A training example, data file or dataset is malformed; the message says where and what."""
