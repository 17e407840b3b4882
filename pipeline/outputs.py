"""Which folders wsiflow may write into, and which run is writing there now.

wsiflow writes only into an output folder that is absent, empty, or one it
made: a patch store is one when its root ``zarr.json`` carries the
``wsiflow_store`` attribute; every other output folder (inference results, a
model directory, a synthetic cohort, an evaluation, the demo's folder) holds
a small marker file, :data:`MARKER`, naming its kind. Anything else is a
:class:`ForeignOutputError` before a byte is written, so a user's folder is
never adopted and its files never overwritten or deleted.

A run that writes into a local output folder holds :data:`LOCK` in it: an
advisory ``flock`` (released by the kernel when the process dies, also on
``kill -9``) on a file that names the holder's pid, host, command and start.
A second run is refused with :class:`OutputLockedError` naming that process;
a lock file left by a run that died is taken over, and :class:`OutputLock`
says so. Stores given by URL (``s3://``) are not locked: object stores have
no such lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from pipeline.errors import (
    ForeignOutputError,
    OutputLockedError,
    OutputWriteError,
    WsiflowError,
    os_reason,
)

#: The marker file of a wsiflow output folder: ``{"wsiflow_output": KIND, ...}``.
MARKER = ".wsiflow"
#: The lock file of an output folder a run is writing into.
LOCK = ".wsiflow.lock"
#: Entries that do not make a folder "not empty" (operating systems' own droppings).
_IGNORED = frozenset({LOCK, ".DS_Store", "Thumbs.db", "desktop.ini"})

#: What each kind of output folder held before markers existed (folders written by
#: earlier wsiflow versions are still recognised, and marked on their next run).
LEGACY = {
    "inference": ("inference.json",),
    "model": ("wsiflow_model.json", "checkpoints/state.json"),
    "cohort": ("synth.json",),
    "evaluation": ("evaluation.json",),
    "demo": ("cohort/synth.json", "report.html"),
}


def is_url(store: Path | str) -> bool:
    """Whether ``store`` names an output location by URL (``s3://...``), not a local path.

    Keep URLs as ``str``: ``Path("s3://b/x")`` collapses the slashes.
    """
    return isinstance(store, str) and "://" in store and not store.startswith("file://")


def location(store: Path | str) -> str:
    """``store`` as Zarr and fsspec take it: a URL as given, ``file://`` URLs as paths."""
    text = str(store)
    if text.startswith("file://"):
        return text[len("file://") :]
    return text.rstrip("/") if is_url(text) else text


def claim_folder(folder: Path | str, kind: str, *, accept: tuple[str, ...] = ()) -> Path:
    """Make ``folder`` a wsiflow output folder of ``kind``, or refuse it.

    Creates the folder (and its parents) when absent and marks it. An
    existing folder must be empty, already marked with the same kind (or
    one in ``accept``: an evaluation goes into its inference folder), or
    hold what an earlier wsiflow wrote there (:data:`LEGACY`). Raises
    :class:`ForeignOutputError` otherwise, and :class:`OutputWriteError`
    when the folder cannot be made or written.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ForeignOutputError(folder, f"exists and is not a folder (the {kind} goes in one)")
    if folder.is_dir():
        found = marker_kind(folder)
        if found == kind or found in accept:
            return folder
        if found is not None:
            raise ForeignOutputError(
                folder,
                f"is a wsiflow {found} folder, not a {kind} folder; choose another output folder",
            )
        entries = foreign_entries(folder)
        legacy = any(
            (folder / name).exists() for k in (kind, *accept) for name in LEGACY.get(k, ())
        )
        if entries and not legacy:
            raise ForeignOutputError(folder, not_ours(entries))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputWriteError(folder, os_reason(exc)) from exc
    write_atomic(folder / MARKER, json.dumps({"wsiflow_output": kind}) + "\n")  # its own error
    return folder


def marker_kind(folder: Path) -> str | None:
    """The kind recorded in ``folder``'s marker, or None when it has none (or an unreadable one)."""
    try:
        payload = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    kind = payload.get("wsiflow_output") if isinstance(payload, dict) else None
    return kind if isinstance(kind, str) else None


def foreign_entries(folder: Path) -> list[str]:
    """The names in ``folder`` that make it not empty, sorted."""
    return sorted(name for name in os.listdir(folder) if name not in _IGNORED)


def not_ours(entries: list[str]) -> str:
    """The reason a non-empty folder wsiflow did not make is refused."""
    shown = ", ".join(repr(name) for name in entries[:3])
    more = f" and {len(entries) - 3} more" if len(entries) > 3 else ""
    return (
        f"is not empty (holds {shown}{more}) and was not written by wsiflow; wsiflow writes "
        "only into an empty folder or one it made: choose another output folder"
    )


@contextlib.contextmanager
def atomic(path: Path | str, temporary: str | None = None) -> Iterator[Path]:
    """Write ``path`` through a temporary file beside it, renamed into place at the end.

    Yields the temporary path (``.<name>.partial``, or ``temporary``: Keras
    wants a ``.keras`` suffix). Whatever goes wrong, the temporary file is
    removed, so nothing half-written is left to look complete; an
    operating-system error (a full disk, no permission) becomes one
    :class:`OutputWriteError` naming ``path``.
    """
    path = Path(path)
    partial = path.with_name(temporary or f".{path.name}.partial")
    try:
        yield partial
        os.replace(partial, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            if partial.is_dir():
                shutil.rmtree(partial)
            else:
                partial.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, WsiflowError):
            raise OutputWriteError(path, os_reason(exc)) from exc
        raise


def write_atomic(path: Path | str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic`)."""
    with atomic(path) as partial:
        partial.write_text(text, encoding="utf-8")


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a lock: process id, host, command and start time (epoch s)."""

    pid: int
    host: str
    command: str
    started: float

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"`{self.command}` (pid {self.pid} on {self.host}, started {when})"


class OutputLock:
    """The advisory lock of one output folder; use as a context manager.

    On entry the folder is locked or :class:`OutputLockedError` is raised
    naming the process that holds it. :attr:`took_over` describes the run
    whose lock file was left behind (it died without releasing it), if any:
    the caller says so.
    """

    def __init__(self, folder: Path | str, command: str):
        self.folder = Path(folder)
        self.command = command
        self.took_over: Holder | None = None
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        path = self.folder / LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputWriteError(self.folder, os_reason(exc)) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = "another run" if holder is None else holder.describe()
            raise OutputLockedError(
                self.folder, f"in use by {who}; wait for it to finish, or write elsewhere"
            ) from None
        if not _still_linked(fd, path):  # its holder removed it as we opened it: start over
            os.close(fd)
            return self.__enter__()
        self.took_over = _read_holder(fd)
        me = Holder(os.getpid(), socket.gethostname(), self.command, time.time())
        payload = json.dumps(me.__dict__).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, payload, 0)
        self._fd = fd
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            # Unlink while holding it: a run waiting on the old file retries on a new one.
            (self.folder / LOCK).unlink(missing_ok=True)
        except OSError:
            os.ftruncate(self._fd, 0)  # cannot remove it: an empty lock file reads as free
        finally:
            os.close(self._fd)
            self._fd = None


def _still_linked(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _read_holder(fd: int) -> Holder | None:
    try:
        payload = json.loads(os.pread(fd, 4096, 0) or b"null")
        return Holder(**payload) if isinstance(payload, dict) else None
    except (OSError, ValueError, TypeError):
        return None


@contextlib.contextmanager
def held(
    folder: Path | str, command: str, warn: Callable[[str], None], kind: str | None = None
) -> Iterator[None]:
    """Hold the lock of the output folder ``folder`` while ``command`` writes into it.

    With ``kind``, the folder is first claimed as a wsiflow output of that
    kind (:func:`claim_folder`: made and marked, or refused); without, it must
    exist (a store ``open_root`` made). ``warn`` gets the line saying that the
    lock of a run that died was taken over. Raises :class:`OutputLockedError`
    naming the run that holds it. Locations given by URL (``s3://...``) are
    not locked.
    """
    if kind is not None:
        claim_folder(folder, kind)
    if is_url(folder):
        yield
        return
    with OutputLock(Path(location(folder)), command) as lock:
        if lock.took_over is not None:
            warn(
                f"{folder}: took over the lock left by {lock.took_over.describe()}, "
                "which is no longer running"
            )
        yield
