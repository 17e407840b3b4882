"""glibc's allocator settings in wsiflow's processes: its Dask workers and the CLI itself."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from pipeline.allocator import SETTINGS, SWITCH, worker_environ
from pipeline.cluster import dask_client

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")

#: Where a 100 MB malloc lands: the heap (freed memory reused) or a fresh mmap.
_WHERE = """
import ctypes, sys
{setup}
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
heap = next(line for line in open("/proc/self/maps") if "[heap]" in line)
start = int(heap.split("-")[0], 16)
pointer = libc.malloc(100 * 2**20)
# The heap grows upwards from its start; mmap'ed blocks lie far above it.
print("heap" if start <= pointer < start + 2**32 else "mmap")
"""


def _where(setup: str = "", env: dict | None = None) -> str:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    result = subprocess.run(
        [sys.executable, "-c", _WHERE.format(setup=setup)],
        capture_output=True, text=True, env={**environ, **(env or {})}, check=True,
    )  # fmt: skip
    return result.stdout.strip()


def test_the_cli_process_keeps_large_buffers_on_the_heap():
    assert _where() == "mmap"  # glibc's default for 100 MB
    tuned = "from pipeline.allocator import tune_this_process; assert tune_this_process()"
    assert _where(tuned) == "heap"
    # The user's choice wins; WSIFLOW_ALLOCATOR=default leaves glibc's defaults.
    assert _where(tuned.replace("assert ", ""), {SWITCH: "default"}) == "mmap"
    assert _where(tuned.replace("assert ", ""), {"MALLOC_MMAP_THRESHOLD_": "65536"}) == "mmap"


def test_local_workers_start_with_the_settings_unless_the_user_set_them(monkeypatch):
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MALLOC_TOP_PAD_", "131072")  # the user's own
    assert worker_environ() == {
        "MALLOC_MMAP_THRESHOLD_": str(2**30),
        "MALLOC_TRIM_THRESHOLD_": str(2**30),
    }
    with dask_client(workers=1) as client:
        (seen,) = client.run(lambda: {k: os.environ.get(k) for k in SETTINGS}).values()
    assert seen == {
        "MALLOC_MMAP_THRESHOLD_": str(2**30),
        "MALLOC_TRIM_THRESHOLD_": str(2**30),
        "MALLOC_TOP_PAD_": "131072",
    }
    monkeypatch.setenv(SWITCH, "default")
    assert worker_environ() == {}
