"""The ``train`` flow on several machines: one training process per Dask worker.

With ``orchestration.training_workers`` N > 1 the flow picks N workers of
its Dask cluster, asks each for a free port on its own host, and runs one
task per worker. Each task starts ``python -m flows.train_workers`` (a
fresh process: TensorFlow's collective runtime cannot be started twice in
one process, and training owns its machine's cores rather than one Dask
thread), which trains as worker I of a ``MultiWorkerMirroredStrategy``
exactly as ``wsiflow train --cluster ... --worker-index I`` does: worker 0
writes the model directory, a run stopped by a lost worker resumes when
the flow runs again. When one training process fails, the others are
stopped, and the flow fails with the line that process gave.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distributed import Client, Event

from pipeline.config import WsiflowConfig
from pipeline.errors import ConfigError, FileError, TrainingClusterError, WsiflowError

#: Dask's per-worker thread limits: a training process uses all of its machine's cores.
THREAD_LIMITS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

#: How long the other training processes get to stop once one has failed.
STOP_GRACE_S = 60

#: Dask event topic of the chief's epoch lines, forwarded to the flow's log.
TOPIC = "wsiflow-train"


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What one training process needs; crosses to its Dask worker and, as JSON, to it."""

    stores: tuple[str, ...]
    model_dir: str
    config: dict[str, Any]  # the whole resolved configuration
    replace_different: bool
    cluster: str  # HOST:PORT,HOST:PORT,... in worker order
    index: int
    command: str  # names the run in the model directory's lock
    parent_pid: int = 0  # the Dask worker's process, set by the task that starts this one


def train_on_dask(
    client: Client,
    stores: list[str],
    model_dir: str,
    cfg: WsiflowConfig,
    *,
    replace_different: bool,
    command: str,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Train with ``cfg.orchestration.training_workers`` processes on ``client``'s workers.

    Returns the chief's summary (as ``TrainResult.summary``). Raises
    :class:`ConfigError` when the cluster has fewer workers, and
    :class:`TrainingClusterError` with the failing process's line.
    """
    wanted = cfg.orchestration.training_workers
    addresses = sorted(client.scheduler_info()["workers"])
    if len(addresses) < wanted:
        raise ConfigError(
            cfg.orchestration.scheduler or "the local Dask cluster",
            [
                (
                    "orchestration.training_workers",
                    f"Expected at most {len(addresses)}: one training process per Dask "
                    f"worker, and the cluster has {len(addresses)}. Got {wanted} instead.",
                    None,
                )
            ],
        )
    chosen = addresses[:wanted]
    endpoints = client.run(_free_endpoint, workers=chosen)
    cluster = ",".join(endpoints[address] for address in chosen)
    log(f"training on {wanted} Dask workers as a cluster of {cluster}")
    run_id = uuid.uuid4().hex
    stop = Event(f"wsiflow-train-stop-{run_id}", client=client)
    topic = f"{TOPIC}-{run_id}"
    client.subscribe_topic(topic, lambda event: log(str(event[1])))
    futures = [
        client.submit(
            run_training_process,
            WorkerSpec(
                stores=tuple(stores),
                model_dir=model_dir,
                config=cfg.model_dump(mode="json"),
                replace_different=replace_different,
                cluster=cluster,
                index=index,
                command=command,
            ),
            stop.name,
            topic,
            key=f"train-worker-{index}-{run_id}",
            workers=[address],
            allow_other_workers=False,
            pure=False,
        )
        for index, address in enumerate(chosen)
    ]
    outcomes: dict[int, dict[str, Any]] = {}
    try:
        _collect(client, futures, chosen, outcomes, until_failure=True)
        if len(outcomes) < len(futures):
            # One failed: the others fail on their own (a survivor names the lost worker) or
            # wait for its all-reduce, so they are stopped after a grace period.
            _collect(client, futures, chosen, outcomes, timeout_s=STOP_GRACE_S)
            stop.set()
            _collect(client, futures, chosen, outcomes, timeout_s=STOP_GRACE_S)
    finally:
        stop.set()
        client.unsubscribe_topic(topic)
        client.cancel([f for f in futures if not f.done()])
    # The line a process gave (the chief's first) says more than an exit code.
    failed = sorted(_failed(outcomes), key=lambda o: (o["path"] is None, o["index"]))
    if failed:
        raise TrainingClusterError(failed[0]["path"] or model_dir, failed[0]["error"])
    return outcomes[0]["summary"]


def _failed(outcomes: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in outcomes.values() if o["error"] is not None]


def _collect(
    client: Client,
    futures: list[Any],
    chosen: list[str],
    outcomes: dict[int, dict[str, Any]],
    *,
    until_failure: bool = False,
    timeout_s: float | None = None,
) -> None:
    """Add outcomes, once a second, until every task has one (or one failed, or time is up).

    A finished task gives its own; a task whose Dask worker left the cluster
    a lost one at once: pinned to a worker that died (and came back under
    another address), it would wait forever, its training process died with it.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while len(outcomes) < len(futures):
        if until_failure and _failed(outcomes):
            return
        if deadline is not None and time.monotonic() >= deadline:
            return
        present = set(client.scheduler_info()["workers"])
        for index, future in enumerate(futures):
            if index in outcomes:
                continue
            if future.done():
                outcomes[index] = _outcome(index, future)
            elif chosen[index] not in present:
                outcomes[index] = _lost(
                    index,
                    f"training worker {index}'s Dask worker ({chosen[index]}) left the cluster "
                    "(killed, or out of memory); run the flow again to resume",
                )
        if len(outcomes) < len(futures):
            time.sleep(1)


def _outcome(index: int, future: Any) -> dict[str, Any]:
    """What training process ``index`` came to; a failed Dask task as an error too."""
    try:
        return future.result()
    except Exception as exc:  # its Dask worker died, or the task itself failed
        return _lost(
            index,
            f"training worker {index}'s Dask task failed ({type(exc).__name__}: {exc}); "
            "run the flow again to resume",
        )


def _lost(index: int, error: str) -> dict[str, Any]:
    """The outcome of a training process that gave no line of its own."""
    return {"index": index, "summary": None, "path": None, "error": error}


def _free_endpoint(dask_worker: Any) -> str:
    """``host:port`` free for TensorFlow on this Dask worker's host (run on the worker)."""
    import socket

    from distributed.comm import get_address_host
    from distributed.comm.addressing import unparse_host_port

    host = get_address_host(dask_worker.address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    return unparse_host_port(host, port)


def run_training_process(spec: WorkerSpec, stop_name: str, topic: str) -> dict[str, Any]:
    """Run training process ``spec.index`` to its end, or until the stop event (a Dask task).

    Returns ``{"index", "summary", "path", "error"}``: the summary the
    process printed, or the file and reason it gave for stopping (``path``
    None: it gave none, ``error`` says how it ended).
    """
    from distributed import get_worker

    stop = Event(stop_name)
    env = {k: v for k, v in os.environ.items() if k not in THREAD_LIMITS}
    with (
        tempfile.TemporaryFile("w+") as out,
        tempfile.TemporaryFile("w+") as err,
    ):
        process = subprocess.Popen(
            # The index on the command line names the process in `ps`; the spec says the rest.
            [sys.executable, "-m", "flows.train_workers", "--worker-index", str(spec.index)],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=err,
            env=env,
            text=True,
        )
        stdin: Any = process.stdin  # a pipe: stdin=PIPE
        stdin.write(
            json.dumps(dataclasses.asdict(dataclasses.replace(spec, parent_pid=os.getpid())))
        )
        stdin.close()  # the spec, then end of input
        reports, position, stopped = [], 0, False
        while True:
            finished = process.poll() is not None
            out.seek(position)
            lines = out.read()
            complete = lines if finished else lines[: lines.rfind("\n") + 1]
            position += len(complete)
            for line in complete.splitlines():
                if not line.startswith('{"'):  # a library's own print, not a report
                    continue
                report = json.loads(line)
                reports.append(report)
                if "log" in report and spec.index == 0:
                    get_worker().log_event(topic, report["log"])
            if finished:
                break
            if not stopped and stop.wait(timeout=1):
                stopped = True
                process.terminate()
        summary = next((r["summary"] for r in reports if "summary" in r), None)
        failure = next((r for r in reports if "error" in r), {"path": None, "error": None})
        path, error = failure["path"], failure["error"]
        if summary is None and error is None:
            err.seek(0)
            last = [line for line in err.read().splitlines() if line.strip()][-1:] or [""]
            error = (
                f"training worker {spec.index} was stopped after another worker failed"
                if stopped
                else f"training worker {spec.index} exited with code {process.returncode} "
                f"({last[0].strip()[:200]})"
            )
    return {"index": spec.index, "summary": summary, "path": path, "error": error}


def _die_with_parent(parent_pid: int) -> None:
    """This process gets SIGKILL when its Dask worker dies (Linux), not left orphaned.

    Set here rather than in ``preexec_fn``, which can deadlock a threaded
    parent; a worker already gone by now is checked by its pid.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)


def epoch_line(record: Any) -> str:
    """The log line of a finished epoch (a ``models.train.EpochRecord``)."""
    logs = record.logs
    return (
        f"epoch {record.epoch}/{record.total_epochs} {record.phase}: loss {logs['loss']:.4f} "
        f"auc {logs['auc']:.4f} val_loss {logs['val_loss']:.4f} val_auc {logs['val_auc']:.4f} "
        f"({logs['seconds']:.0f} s)" + (" best" if record.improved else "")
    )


def _report(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def main() -> int:
    """One training process: the :class:`WorkerSpec` as JSON on stdin, reports on stdout."""
    from models.distribute import training_cluster
    from models.train import train_classifier
    from pipeline.outputs import held

    spec = WorkerSpec(**json.load(sys.stdin))
    _die_with_parent(spec.parent_pid)
    model_dir = Path(spec.model_dir)

    try:
        cfg = WsiflowConfig.model_validate(spec.config)
        result = train_classifier(
            list(spec.stores),
            model_dir,
            cfg.training,
            config=spec.config,
            replace_different=spec.replace_different,
            on_epoch=lambda record: _report(log=epoch_line(record)),
            hold=lambda: held(model_dir, spec.command, lambda line: _report(log=line), "model"),
            cluster=dataclasses.replace(
                training_cluster(spec.cluster, spec.index), resume_hint="run the flow again"
            ),
        )
    except FileError as exc:  # names its file: a store, the model directory
        _report(path=exc.location, error=exc.reason)
        return 1
    except (WsiflowError, ValueError) as exc:
        _report(path=str(model_dir), error=str(exc))
        return 1
    _report(summary=result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
