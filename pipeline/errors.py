"""Typed errors for every failure a user can cause or fix.

Each message names the file (or key) and the reason, shaped as
"Expected X. Got Y instead." where that reads naturally, and, where there is
one, the fix. The CLI prints one line per failure from ``str(error)``.
"""

from __future__ import annotations

import errno
from pathlib import Path


class WsiflowError(Exception):
    """Base class of all errors wsiflow raises on purpose."""


class ConfigError(WsiflowError, ValueError):
    """A configuration file or value is invalid.

    ``problems`` holds one ``(key, message, line)`` triple per invalid key
    (``line`` is 1-based, or ``None``), so all of them are reported at once.
    """

    def __init__(self, source: Path | str | None, problems: list[tuple[str, str, int | None]]):
        self.source = "configuration" if source is None else str(source)
        self.problems = list(problems)
        lines = [
            f"{self.source}{'' if line is None else f':{line}'}: {key}: {message}"
            for key, message, line in self.problems
        ]
        super().__init__("\n".join(lines))

    def __reduce__(self):  # keep the fields when crossing process boundaries (Dask)
        return (type(self), (self.source, self.problems))


class FileError(WsiflowError):
    """Something is wrong with one file; ``path`` names it and ``reason`` says what."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        # As given: a store URL such as s3://bucket/x.zarr would lose a slash in a Path.
        self.location = path if isinstance(path, str) and "://" in path else str(self.path)
        self.reason = reason
        super().__init__(f"{self.location}: {reason}")

    def __reduce__(self):  # keep the fields when crossing process boundaries (Dask)
        return (type(self), (self.location, self.reason))


class SlideError(FileError):
    """Something is wrong with one slide."""


class SlideNotFoundError(SlideError, FileNotFoundError):
    """The slide file does not exist."""


class SlideReadError(SlideError, OSError):
    """The slide exists but cannot be opened or decoded (corrupt, truncated, unsupported)."""


class MissingMppError(SlideError):
    """The slide records no physical pixel size, so a resolution in µm/px cannot be chosen."""


class NoTissueError(SlideError):
    """Tissue detection found nothing to process on the slide."""


class SchedulerError(FileError):
    """The Dask scheduler at an address (``location``) cannot be reached."""


class TrainingClusterError(FileError):
    """A worker of a multi-worker training run stopped or cannot be reached (path: the model)."""


class WorkerLostError(WsiflowError):
    """Dask workers died (killed, out of memory) while running a task, as often as allowed."""


class AnnotationError(FileError, ValueError):
    """An annotation file is missing, malformed or inconsistent with its slide."""


class StoreError(FileError, ValueError):
    """A patch store is missing, incomplete or not a wsiflow store."""


class ModelError(FileError, ValueError):
    """A model directory is missing, incomplete, or does not fit the data it is used with."""


class DatasetError(FileError, ValueError):
    """A dataset file or folder is missing or malformed (MNIST IDX/npz, ...)."""


class CohortError(FileError, ValueError):
    """A folder is not the generated cohort a command expects (no or a foreign ``synth.json``)."""


class ResultsError(FileError, ValueError):
    """Inference outputs or evaluation inputs (detections, scores, reference CSV) are malformed."""


def failure_reason(path: Path | str, exc: BaseException) -> str:
    """One line naming the file and the reason; typed errors already name their file."""
    if isinstance(exc, FileError):
        return str(exc)
    if isinstance(exc, WsiflowError):  # says what happened, not which file: this one
        return f"{path}: {exc}"
    return f"{path}: {type(exc).__name__}: {exc}"


class ForeignOutputError(FileError, ValueError):
    """An output folder wsiflow did not make: it is never written into (exit 2)."""


class OutputLockedError(FileError):
    """Another run is writing into the same output folder right now."""


class OutputWriteError(FileError, OSError):
    """An output cannot be written: a full disk, no permission, a read-only file system."""


#: errno values that mean an output cannot be written (the disk or the place, not the data).
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})


def write_error(exc: OSError) -> OutputWriteError | None:
    """``exc`` as an :class:`OutputWriteError` when it says an output cannot be written."""
    if isinstance(exc, WsiflowError) or exc.errno not in WRITE_ERRNOS:
        return None
    return OutputWriteError(exc.filename or "output", os_reason(exc))


def os_reason(exc: OSError) -> str:
    """One line for an operating-system error while writing, with the fix where there is one."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{reason}; free space or write elsewhere, then run the same command again"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"cannot write here{where}: {reason}; choose a folder you can write to"
    return reason
