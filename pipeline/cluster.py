"""Dask clients: a LocalCluster sized to the machine, or an existing scheduler unchanged."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import dask
from distributed import Client, LocalCluster


@contextlib.contextmanager
def dask_client(
    scheduler: str | None = None, *, workers: int | None = None, threads_per_worker: int = 1
) -> Iterator[Client]:
    """Yield a client of ``scheduler`` (left running) or of a new :func:`local_cluster`."""
    if scheduler is not None:
        client = Client(scheduler, set_as_default=False)
        try:
            yield client
        finally:
            client.close()
        return
    with (
        local_cluster(workers=workers, threads_per_worker=threads_per_worker) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        yield client


def local_cluster(
    *, workers: int | None = None, threads_per_worker: int = 1, silence_logs: int = logging.ERROR
) -> LocalCluster:
    """A LocalCluster of ``workers`` processes (default: one per core), without a dashboard.

    ``silence_logs``: the level below which Dask's own log lines are dropped.

    Dask's nanny exports ``MALLOC_TRIM_THRESHOLD_=65536`` to workers, which made
    OpenSlide reads 15-40% slower on our machines (PERF_NOTES), so it is not set.
    """
    n_workers = workers or max(1, os.cpu_count() or 1)
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        return LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            processes=True,
            dashboard_address=None,
            silence_logs=silence_logs,
        )
