"""Dask clients and tasks.

Clients: a LocalCluster sized to the machine, or an existing scheduler left
unchanged. Tasks: submitted so that bad input (a typed wsiflow error) comes
back to the driver as a value, not as an exception Dask logs on the worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import dask
from distributed import Client, Future, LocalCluster
from distributed.scheduler import KilledWorker

from pipeline.allocator import worker_environ
from pipeline.errors import (
    ConfigError,
    SchedulerError,
    WorkerLostError,
    WsiflowError,
    write_error,
)
from pipeline.quiet import quiet_tensorflow_import


@contextlib.contextmanager
def dask_client(
    scheduler: str | None = None, *, workers: int | None = None, threads_per_worker: int = 1
) -> Iterator[Client]:
    """Yield a client of ``scheduler`` (left running) or of a new :func:`local_cluster`.

    Left by an exception (Ctrl-C, a full disk), a new cluster is closed without
    Dask's logs of the tasks and connections it cuts short.
    """
    if scheduler is not None:
        try:
            client = Client(scheduler, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise SchedulerError(
                scheduler,
                f"cannot reach a Dask scheduler here ({exc}); check the address, "
                "or leave --scheduler out for a local cluster",
            ) from exc
        try:
            yield client
        finally:
            client.close()
        return
    disabled = logging.root.manager.disable
    try:
        with (
            local_cluster(workers=workers, threads_per_worker=threads_per_worker) as cluster,
            Client(cluster, set_as_default=False) as client,
        ):
            try:
                yield client
            except BaseException:
                # Closed mid-task (Ctrl-C, or a run stopped by an error it reports in one
                # line, as a full disk), the scheduler and client (here) fail to gather
                # results and the workers miss heartbeats: errors with tracebacks, none of
                # them news. The workers are not reused; this process logs again once the
                # cluster is closed.
                with contextlib.suppress(Exception):
                    client.run(silence_logging)
                silence_logging()
                raise
    finally:
        logging.disable(disabled)


#: Memory allowed per local worker process: Python, Dask, an open slide, a chunk in flight
#: (and TensorFlow with a small model for inference). Workers beyond what the machine's
#: available memory holds at this rate are refused rather than left to swap or be killed.
WORKER_MEMORY_BYTES = 400 * 2**20


def check_local_workers(workers: int, option: str = "--workers") -> str | None:
    """Refuse ``workers`` local processes beyond available memory; a warning beyond the cores.

    Raises :class:`ConfigError` naming ``option``; returns the warning line (or None).
    """
    import psutil

    available = psutil.virtual_memory().available
    most = max(1, available // WORKER_MEMORY_BYTES)
    if workers > most:
        raise ConfigError(
            "command-line options",
            [
                (
                    option,
                    f"Expected at most {most} local workers: each takes up to "
                    f"~{WORKER_MEMORY_BYTES / 2**20:.0f} MB and {available / 2**30:.1f} GB "
                    f"of memory is available. Got {workers} instead.",
                    None,
                )
            ],
        )
    cores = os.cpu_count() or 1
    if workers > cores:
        return (
            f"{option} {workers} is more than this machine's {cores} cores: the workers share "
            "them, so the run is slower, not faster, and takes more memory"
        )
    return None


def silence_logging() -> None:
    """Drop every log record from now on, in this process (``logging.disable``)."""
    logging.disable(logging.CRITICAL)


def local_cluster(
    *, workers: int | None = None, threads_per_worker: int = 1, silence_logs: int = logging.ERROR
) -> LocalCluster:
    """A LocalCluster of ``workers`` processes (default: one per core); HTTP on a free port.

    ``silence_logs``: the level below which Dask's own log lines are dropped.

    Dask's nanny exports ``MALLOC_TRIM_THRESHOLD_=65536`` to workers, which makes
    OpenSlide reads slower (BENCHMARKS.md, tiling); the workers get wsiflow's
    allocator settings instead (:mod:`pipeline.allocator`).
    The workers ignore Ctrl-C (see :func:`dask_setup`).
    """
    n_workers = workers or max(1, os.cpu_count() or 1)
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    environ.update(worker_environ())
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        return LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            processes=True,
            # Any free port: a second run beside a first would warn that 8787 is taken.
            dashboard_address="127.0.0.1:0",
            silence_logs=silence_logs,
            preload=[__name__],  # each worker runs dask_setup below
        )


def dask_setup(worker: Any) -> None:
    """Dask preload hook, in each worker process of :func:`local_cluster`: ignore Ctrl-C.

    Ctrl-C in a terminal reaches every process of the foreground group, the
    workers included, and each printed a KeyboardInterrupt traceback through
    Dask's event loop. The driver handles the interrupt; closing its cluster
    stops the workers. Started by a command with TensorFlow's logs off, the
    worker also keeps TensorFlow's import banner off the terminal
    (:mod:`pipeline.quiet`).
    """
    with contextlib.suppress(ValueError):  # not the process's main thread: leave it
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "3":  # started by a command without -v
        quiet_tensorflow_import()


@dataclass(frozen=True)
class TaskFailed:
    """A task's failure on bad input (a :class:`WsiflowError`), returned rather than raised."""

    error: WsiflowError


def submit_reporting(client: Client, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
    """``client.submit(fn, *args, **kwargs)``, never pure; bad input returns a :class:`TaskFailed`.

    Dask logs every exception a task raises on its worker, task and traceback
    included ("Compute Failed"): right for a bug, noise for a corrupt slide or
    a malformed annotation, which the driver reports in one line naming the
    file and the reason. Other exceptions are still raised (and logged). The
    task keeps ``fn``'s name, as Dask would give it.
    """
    key = f"{fn.__name__}-{uuid.uuid4().hex}"
    return client.submit(_returning_failures, fn, *args, key=key, **kwargs)


def task_error(future: Future, outcome: Any) -> BaseException | None:
    """What a finished task failed with (raised, or returned as a :class:`TaskFailed`); None if not.

    ``outcome`` is what ``as_completed(..., with_results=True, raise_errors=False)``
    gave with ``future``: the result, or for a raised exception Dask's
    ``(type, exception, traceback)``.
    """
    if future.status == "error":
        return _worker_lost(outcome[1])
    return outcome.error if isinstance(outcome, TaskFailed) else None


def _worker_lost(exc: BaseException) -> BaseException:
    """Dask's KilledWorker as a one-line :class:`WorkerLostError`; other errors as they are.

    The scheduler gives up on a task after its worker died running it more
    times than ``distributed.scheduler.allowed-failures``: a slide that kills
    workers (out of memory) or workers killed from outside. The slide fails,
    the others go on, and a rerun resumes it.
    """
    if not isinstance(exc, KilledWorker):
        return exc
    task = str(exc.task).split("-")[0]
    times = "once" if exc.allowed_failures == 0 else f"{exc.allowed_failures + 1} times"
    return WorkerLostError(
        f"the Dask worker running its task {task} died, {times} (killed, or out of memory: "
        "see the workers' logs); run again to resume it"
    )


def _returning_failures(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except WsiflowError as exc:
        return TaskFailed(exc)
    except OSError as exc:  # a full disk or an unwritable store: not a bug, one line
        error = write_error(exc)
        if error is None:
            raise
        return TaskFailed(error)
