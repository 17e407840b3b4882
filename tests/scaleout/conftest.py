"""Clusters started from their own command lines, as a user starts them on real machines."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import wait_for

BIN = Path(sys.executable).parent


@contextlib.contextmanager
def dask_cli_cluster(
    folder: Path,
    *,
    workers: int = 2,
    scheduler_env: dict[str, str] | None = None,
    worker_env: dict[str, str] | None = None,
) -> Iterator[str]:
    """``dask scheduler`` and ``workers`` ``dask worker`` processes on 127.0.0.1; yields the address.

    Each worker is a nanny and one single-threaded worker process, started
    in ``folder`` with this environment less wsiflow's allocator variables
    (a user's shell), so nothing of wsiflow's own cluster set-up reaches it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "WSIFLOW_"))}
    scheduler_file = folder / "scheduler.json"
    logs = [folder / "scheduler.log", *(folder / f"worker{i}.log" for i in range(workers))]
    processes: list[subprocess.Popen] = []

    def start(args: list[str], log: Path, extra: dict[str, str] | None = None) -> None:
        with open(log, "w") as out:
            processes.append(
                subprocess.Popen(
                    [str(BIN / "dask"), *args], cwd=folder, stdout=out,
                    stderr=subprocess.STDOUT, env={**env, **(extra or {})},
                )
            )  # fmt: skip

    try:
        start(
            ["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(scheduler_file)],
            logs[0], scheduler_env,
        )  # fmt: skip
        wait_for(scheduler_file.is_file, 120, "dask scheduler", logs[:1], interval=0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        for i in range(workers):
            start(
                ["worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                 "--name", f"worker{i}", "--local-directory", str(folder / f"worker{i}")],
                logs[1 + i], worker_env,
            )  # fmt: skip
        from distributed import Client

        with Client(address, set_as_default=False) as client:
            client.wait_for_workers(workers, timeout=120)
        yield address
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
