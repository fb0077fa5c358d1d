"""The project's own error types.

Every error a user can cause with bad input (a file, a config, a weights file, a dataset) is a subclass of
`CascadeRCNNError`; the CLI prints its message on one line, without a traceback, and exits non-zero.
"""

from __future__ import annotations


class CascadeRCNNError(Exception):
    """Base class of every error caused by user input."""


class ConfigError(CascadeRCNNError, ValueError):
    """A config file or override is wrong: the message names the key."""


class CheckpointError(CascadeRCNNError):
    """A weights file cannot be read or does not fit the model: the message names the file and the tensor/record."""


class ImageReadError(CascadeRCNNError):
    """An image file cannot be decoded (missing, empty, truncated, not an image, too large)."""


class DatasetError(CascadeRCNNError):
    """A dataset has problems; `problems` lists every one with its file and id."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = list(problems or [])
        if self.problems:
            shown = "\n".join(f"  - {p}" for p in self.problems[:50])
            more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
            message = f"{message}\n{shown}{more}"
        super().__init__(message)


class DownloadError(CascadeRCNNError):
    """A download failed or its checksum did not match."""
