"""User-facing errors: one clear line each; the CLI prints them and exits 2."""

from __future__ import annotations


class DsftError(Exception):
    """Base class of every error a user should see as one line (no traceback unless --debug)."""

    exit_code = 2


class ConfigError(DsftError):
    """A config file is missing, malformed, or has an unknown key / wrong type."""


class DataError(DsftError):
    """Input data cannot be read, decoded, mapped or is empty."""


class ModelError(DsftError):
    """A model or tokenizer cannot be loaded or fails its checks."""


class TrainError(DsftError):
    """Training cannot start or cannot continue."""


class ExportError(DsftError):
    """Export / quantization cannot be done as asked."""


class ServeError(DsftError):
    """The server cannot start as asked."""


class OverwriteError(DsftError):
    """An output exists and --force was not given."""
