"""glibc's memory allocator, set for the large short-lived buffers of tiling and inference.

Every inference batch and every chunk of patches allocates and frees buffers
of megabytes. By default glibc serves those with ``mmap`` (above its
dynamic mmap threshold) and hands freed heap back to the kernel beyond
128 KiB of slack, so each batch maps, faults in and unmaps its memory
again: on a CAMELYON16-size slide a third of inference's CPU time went to
the kernel's page faults (BENCHMARKS.md, "glibc's allocator"). Keeping
freed memory for the next batch avoids that.

wsiflow's own processes run with :data:`SETTINGS`: its local Dask workers
get them in their environment (glibc reads them when a process starts),
and the CLI's own process through ``mallopt``. A variable the user's
environment already sets wins; ``WSIFLOW_ALLOCATOR=default`` leaves glibc's
defaults everywhere. Workers of a cluster given with ``--scheduler`` keep
their own environment: start them with these variables (docs/scaling.md).
Elsewhere than glibc (musl, macOS) nothing is changed.
"""

from __future__ import annotations

import ctypes
import os
import platform

#: glibc's environment variables and the value wsiflow gives each (bytes).
SETTINGS = {
    # Buffers below 1 GiB come from the heap, where freed memory is reused,
    # rather than from mmap, which the kernel zero-fills on every first touch.
    "MALLOC_MMAP_THRESHOLD_": 2**30,
    # Keep up to 1 GiB of freed heap for the next batch instead of trimming it.
    "MALLOC_TRIM_THRESHOLD_": 2**30,
    # Grow the heap 256 MiB at a time: fewer brk calls while a slide starts.
    "MALLOC_TOP_PAD_": 2**28,
}
#: ``mallopt`` parameters (glibc's malloc.h) of the same settings.
_MALLOPT = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_TOP_PAD_": -2, "MALLOC_MMAP_THRESHOLD_": -3}
#: Set to ``default`` to leave glibc's own settings in every process wsiflow starts.
SWITCH = "WSIFLOW_ALLOCATOR"


def enabled() -> bool:
    """Whether wsiflow sets the allocator: on glibc, unless ``WSIFLOW_ALLOCATOR=default``."""
    return os.environ.get(SWITCH, "") != "default" and platform.libc_ver()[0] == "glibc"


def worker_environ() -> dict[str, str]:
    """The variables to give the worker processes wsiflow starts (those the user has not set)."""
    if not enabled():
        return {}
    return {k: str(v) for k, v in SETTINGS.items() if k not in os.environ}


def tune_this_process() -> dict[str, int]:
    """Apply :data:`SETTINGS` to the running process with ``mallopt``; return what was set.

    Variables the user set are left alone: glibc read them when the process started.
    """
    if not enabled():
        return {}
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return {}
    applied = {}
    for name, value in SETTINGS.items():
        if name not in os.environ and libc.mallopt(_MALLOPT[name], value) == 1:
            applied[name] = value
    return applied
