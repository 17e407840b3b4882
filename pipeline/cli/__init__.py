"""The ``wsiflow`` command line: thin wrappers that parse, call, and report.

With ``--json`` the human-readable output goes to stderr and the last (only)
line of stdout is one JSON object summarising what was done.
Exit codes: 0 success, 1 some item failed, 2 bad usage or configuration,
130 ``tile`` stopped by Ctrl-C.
"""

from __future__ import annotations

import sys

from pipeline.allocator import tune_this_process
from pipeline.cli import demo, infer, learn, orchestrate, slides, tiles, view  # noqa: F401  (each module registers its commands)
from pipeline.cli._common import app
from pipeline.errors import WsiflowError, write_error


def main() -> None:
    """Console-script entry point: typed errors become one line and exit code 1.

    So does an output that cannot be written (a full disk, no permission)
    wherever it surfaces.
    """
    tune_this_process()  # large short-lived buffers: see pipeline.allocator
    try:
        app()
    except WsiflowError as exc:
        _exit_with(exc)
    except OSError as exc:
        error = write_error(exc)
        if error is None:
            raise
        _exit_with(error)


def _exit_with(exc: WsiflowError) -> None:
    for line in str(exc).splitlines():
        print(f"error: {line}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()
