"""Dask clients and tasks (pipeline.cluster), on real LocalClusters."""

from __future__ import annotations

import logging
import signal

import pytest

from pipeline.cluster import TaskFailed, dask_client, submit_reporting, task_error
from pipeline.errors import SlideReadError


def _read(path: str) -> str:
    if path.endswith(".bad"):
        raise SlideReadError(path, "cannot decode level 0")
    if path.endswith(".bug"):
        raise ZeroDivisionError("a bug, not bad input")
    return path


def test_bad_input_comes_back_as_a_value_and_bugs_still_raise():
    with dask_client(workers=1) as client:
        futures = [submit_reporting(client, _read, name) for name in ("a.tif", "b.bad", "c.bug")]
        good, bad, bug = futures
        bug.exception()  # waits for it
        assert [f.key.split("-")[0] for f in futures] == ["_read"] * 3
        assert task_error(good, good.result()) is None and good.result() == "a.tif"
        assert bad.status == "finished" and isinstance(bad.result(), TaskFailed)
        error = task_error(bad, bad.result())
        assert isinstance(error, SlideReadError) and str(error) == "b.bad: cannot decode level 0"
        assert bug.status == "error"
        raised = task_error(bug, (ZeroDivisionError, bug.exception(), bug.traceback()))
        assert isinstance(raised, ZeroDivisionError)
        logs = client.get_worker_logs()
        failed = [m for records in logs.values() for _, m in records if "Compute Failed" in m]
        assert len(failed) == 1 and "ZeroDivisionError" in failed[0]


def test_workers_ignore_ctrl_c_and_an_interrupted_cluster_lets_logging_come_back():
    with pytest.raises(KeyboardInterrupt), dask_client(workers=2) as client:
        # Ctrl-C reaches the workers too; the driver alone handles it.
        ignored = client.run(lambda: signal.getsignal(signal.SIGINT) == signal.SIG_IGN)
        assert list(ignored.values()) == [True, True]
        raise KeyboardInterrupt
    assert logging.root.manager.disable == logging.NOTSET
    assert logging.getLogger("distributed").isEnabledFor(logging.ERROR)
