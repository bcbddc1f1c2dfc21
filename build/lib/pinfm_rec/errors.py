"""The errors a user can cause and fix: the CLI prints each as one line and exits with code 2.

Raise the most specific class with a message that names the file, row, key, id or argument that is
wrong and what would be right. Anything else is a bug: the CLI prints its traceback.
"""
from __future__ import annotations


class PinfmError(Exception):
    """Base of every expected, user-fixable error (exit code 2, one line, traceback with --debug)."""

    kind = "error"


class SpecError(PinfmError, ValueError):
    """A spec file, key, value or override is invalid; the message names the file and dotted key."""

    kind = "spec error"


class DataError(PinfmError, ValueError):
    """Input data is missing or malformed; the message names the file and row (or id)."""

    kind = "data error"


class CheckpointError(PinfmError, RuntimeError):
    """A checkpoint or run directory cannot be used; the message names the path."""

    kind = "checkpoint error"


class RunDirLockedError(CheckpointError):
    """Another live run holds the run directory; the message names its host and pid."""

    kind = "run locked"


class EncoderError(PinfmError, ValueError):
    """A pretrained encoder does not fit (vocabulary, missing features/keys); names the argument."""

    kind = "encoder error"


class DeviceError(PinfmError, RuntimeError):
    """The requested device/backend is not available (no CUDA, no nccl, ...)."""

    kind = "device error"


class DependencyError(PinfmError, RuntimeError):
    """An installed package's version breaks the pinned stack; names the package and the version to install."""

    kind = "dependency error"


class Preempted(PinfmError):
    """SIGINT/SIGTERM arrived: the current step finished and a checkpoint was written.

    ``exit_code`` is 128 + the signal number (130 SIGINT, 143 SIGTERM), what schedulers and
    torchelastic read as "killed by a signal": a restart resumes from that checkpoint.
    """

    kind = "preempted"

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
