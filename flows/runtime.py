"""How the flows run: the Prefect API, the Dask task runner, retries, cache keys, results.

Pure plumbing shared by every flow; the stage logic lives in ``pipeline``
and ``models``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, wait
from prefect.tasks import exponential_backoff
from prefect_dask import DaskTaskRunner

from pipeline import __version__
from pipeline.config import OrchestrationConfig, WsiflowConfig, load_config, with_overrides
from pipeline.errors import WsiflowError
from pipeline.identity import file_identity, fingerprint
from pipeline.outputs import held

#: How long to wait for the temporary local Prefect server to answer.
EPHEMERAL_START_S = 180

#: How long a cached task result stays valid: the key already says whether inputs changed.
CACHE_EXPIRATION = timedelta(days=365)


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """Run flows against ``PREFECT_API_URL``, or else a temporary local Prefect server.

    Prefect's ephemeral mode starts a server lazily inside the flow's
    process, under a URL that the Dask worker processes never learn: each
    of them would start a server of its own. Starting it here and putting
    its URL into the settings (which the Dask task runner hands to every
    task) makes the flow and its tasks report to one API. Yields the URL.
    """
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    url = get_current_settings().api.url
    if url:
        yield str(url)
        return
    from prefect.server.api.server import SubprocessASGIServer

    # A throwaway local server has nothing to report; offline it would log an error per run.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    server = SubprocessASGIServer()
    # A new database is migrated first: ~30 s on 2 busy cores, over Prefect's 20 s default.
    server.start(timeout=EPHEMERAL_START_S)
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield server.api_url


@contextlib.contextmanager
def locked(folder: Path | str, kind: str | None = None) -> Iterator[None]:
    """Hold the output folder's lock for the running flow, as the CLI commands hold theirs.

    A second run writing there (a command or another flow) is refused naming
    this flow run; the lock of a run that died is taken over, with a warning.
    With ``kind``, the folder is first claimed as a wsiflow output of that kind.
    """
    from prefect import get_run_logger
    from prefect.runtime import flow_run

    command = f"prefect flow run {flow_run.flow_name}/{flow_run.name}"
    with held(folder, command, get_run_logger().warning, kind):
        yield


def load(config: str | None, settings: dict[str, Any] | None) -> WsiflowConfig:
    """A flow's configuration: the YAML file ``config`` (or defaults) with dotted overrides."""
    cfg = load_config(config)
    return with_overrides(cfg, settings) if settings else cfg


def task_runner(
    orchestration: OrchestrationConfig, *, workers: int | None = None
) -> DaskTaskRunner:
    """prefect-dask's runner on the configured scheduler, or on a new LocalCluster.

    ``workers`` overrides the configured number of local worker processes
    (inference uses fewer: TensorFlow spreads one slide over the cores).
    """
    if orchestration.scheduler:
        return DaskTaskRunner(address=orchestration.scheduler)
    return DaskTaskRunner(
        cluster_class="pipeline.cluster.local_cluster",
        cluster_kwargs={
            "workers": workers or orchestration.workers,
            "threads_per_worker": orchestration.threads_per_worker,
            # prefect-dask closes the cluster under workers still sending heartbeats: Dask
            # logs each as an error with a traceback. Task errors reach Prefect's log anyway.
            "silence_logs": logging.CRITICAL,
        },
    )


def transient(task: Task, task_run: Any, state: Any) -> bool:
    """Retry condition: not for wsiflow's typed errors (the input is bad; retrying repeats it).

    Everything else (an OSError on a network file system, a worker lost to
    the out-of-memory killer) may pass on a second try.
    """
    try:
        state.result(raise_on_failure=True)
    except WsiflowError:
        return False
    except BaseException:
        return True
    return False


def task_options(
    orchestration: OrchestrationConfig, *, io: bool, refresh: bool = False, cache: bool = True
) -> dict[str, Any]:
    """``Task.with_options`` arguments: retries with back-off for I/O tasks, caching if on.

    ``cache=False`` for tasks that decide for themselves whether their output
    is complete (tiling and inference check the store's or outputs' fingerprint).
    """
    options: dict[str, Any] = {}
    if io and orchestration.retries:
        options.update(
            retries=orchestration.retries,
            retry_delay_seconds=exponential_backoff(backoff_factor=orchestration.retry_delay_s)
            if orchestration.retry_delay_s
            else 0,
            retry_condition_fn=transient,
        )
    if cache and orchestration.cache:
        options["refresh_cache"] = refresh
    else:
        options.update(cache_policy=NO_CACHE, cache_key_fn=None)
    return options


def cache_key(kind: str, *parts: Any) -> str:
    """A task's cache key: what it does, its inputs' identity and settings, wsiflow's version."""
    return f"wsiflow-{kind}-{fingerprint({'parts': list(parts), 'version': __version__})}"


def identity(path: Path | str) -> dict[str, Any] | str:
    """A file's identity (path, size, mtime) for cache keys; the bare path if it is absent."""
    path = Path(path)
    try:
        return file_identity(path)
    except OSError:
        return str(path.resolve())


def folder_identity(folder: Path | str | None, pattern: str = "*") -> list[Any]:
    """The identity of every file matching ``pattern`` in ``folder`` (sorted), for cache keys."""
    if folder is None or not Path(folder).is_dir():
        return []
    return [identity(p) for p in sorted(Path(folder).glob(pattern)) if p.is_file()]


def settle(futures: Sequence[PrefectFuture]) -> list[tuple[Any, BaseException | None, str]]:
    """Wait for every future; per future its result or None, its exception or None, its state.

    A failed task does not raise here: the flow lists it and goes on.
    """
    wait(list(futures))
    outcomes = []
    for future in futures:
        state = future.state
        if state.is_completed():
            outcomes.append((future.result(), None, state.name))
        else:
            error = state.result(raise_on_failure=False)
            if not isinstance(error, BaseException):
                error = RuntimeError(f"task ended {state.name}: {state.message}")
            outcomes.append((None, error, state.name))
    return outcomes


def cpu_count() -> int:
    return max(1, os.cpu_count() or 1)


def run_flow(name: str, parameters: dict[str, Any], *, return_state: bool = False) -> Any:
    """Run flow ``name`` with ``parameters`` against the Prefect API (see :func:`prefect_api`).

    The flow's return value, or its final state with ``return_state``.
    """
    from flows import get_flow

    with prefect_api():
        return get_flow(name)(**parameters, return_state=return_state)
