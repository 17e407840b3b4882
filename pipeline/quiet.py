"""TensorFlow's start-up banner, kept off the terminal without turning oneDNN off.

Importing TensorFlow prints, from C++ and before its logging can be
configured (``TF_CPP_MIN_LOG_LEVEL`` does not reach it), "oneDNN custom
operations are on ..." and absl's "All log messages before
absl::InitializeLog() ..." line. The only switch TensorFlow offers,
``TF_ENABLE_ONEDNN_OPTS=0``, also turns off oneDNN's kernels, which train
and predict markedly faster on CPU (BENCHMARKS.md, "oneDNN"). So the first
``import tensorflow`` of a process runs with its standard error captured,
and every captured line but those two is written back.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import tempfile
from collections.abc import Iterator
from types import ModuleType

#: Lines TensorFlow prints at import whatever its log level (substrings).
BANNER = (
    "oneDNN custom operations are on",
    "All log messages before absl::InitializeLog() is called",
)


def quiet_tensorflow_import() -> None:
    """Drop :data:`BANNER` from this process's first ``import tensorflow`` (idempotent)."""
    if "tensorflow" in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())


@contextlib.contextmanager
def stderr_without(patterns: tuple[str, ...]) -> Iterator[None]:
    """Capture file descriptor 2 (C and C++ output included); write back all but ``patterns``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", errors="replace")
            kept = [
                line
                for line in text.splitlines(keepends=True)
                if not any(p in line for p in patterns)
            ]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class _Finder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` as the other finders do, with a loader that hides the banner."""

    def __init__(self) -> None:
        self._finding = False

    def find_spec(
        self, fullname: str, path: object = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "tensorflow" or self._finding:
            return None
        self._finding = True  # the real finders, below this one
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding = False
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader, self)
        return spec


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, finder: _Finder):
        self._loader = loader
        self._finder = finder

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self._finder)  # imported once: nothing more to hide
        with stderr_without(BANNER):
            self._loader.exec_module(module)
