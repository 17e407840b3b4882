"""The Typer app, shared options, and the reporter every command prints through."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline import __version__
from pipeline.errors import ConfigError
from pipeline.quiet import quiet_tensorflow_import

app = typer.Typer(
    name="wsiflow",
    help="Whole-slide pathology: slides to patches, models, tumor heatmaps and CAMELYON16 metrics.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config (see configs/); flags override its values."),
]
JsonOption = Annotated[
    bool,
    typer.Option("--json", help="End stdout with one JSON summary line (human output to stderr)."),
]
SlidesArgument = Annotated[
    list[Path], typer.Argument(help="Slide files or folders (searched recursively).")
]
SchedulerOption = Annotated[
    str | None, typer.Option("--scheduler", help="Existing Dask scheduler address (tcp://...).")
]
SlideMppOption = Annotated[
    float | None,
    typer.Option(
        "--slide-mpp",
        help="Level-0 µm/px for slides that record none (TCGA, DICOM without spacing).",
    ),
]
RedoOption = Annotated[bool, typer.Option("--overwrite", help="Redo slides already complete.")]


@dataclass(frozen=True)
class SlideProgress:
    """Callbacks of a slides + patches progress display, for the stage drivers."""

    planned: Callable[[int], None]  # n more patches to do
    advanced: Callable[[int], None]  # n patches done
    finished: Callable[[Any], None]  # a slide's result (slide_id, status, reason)


class Reporter:
    """Human output to stdout, or to stderr when the JSON summary owns stdout."""

    def __init__(self, as_json: bool):
        self.as_json = as_json
        stream = sys.stderr if as_json else sys.stdout
        # Logs and CI capture get 120 columns instead of rich's 80 for non-terminals.
        width = None if stream.isatty() else 120
        self.console = Console(stderr=as_json, highlight=False, soft_wrap=True, width=width)
        # Errors and warnings always go to stderr, one line each.
        self.errors = Console(stderr=True, highlight=False, soft_wrap=True)

    def warn(self, text: str) -> None:
        """One warning line on stderr (``text`` is plain: markup in it is escaped)."""
        self.errors.print(f"[yellow]warning:[/yellow] {escape(text)}")

    def finish(self, summary: dict[str, Any], exit_code: int = 0) -> None:
        if self.as_json:
            sys.stdout.write(json.dumps(summary, default=str) + "\n")
            sys.stdout.flush()
        raise typer.Exit(exit_code)

    @contextlib.contextmanager
    def slide_progress(self, n_slides: int) -> Iterator[SlideProgress]:
        """Bars of slides and patches (with patches/s since the start); failures one line each."""
        started = time.perf_counter()
        with self.progress() as progress:
            slides_task = progress.add_task("slides", total=n_slides, rate="")
            patches_task = progress.add_task("patches", total=0, rate="")

            def planned(n: int) -> None:
                total = progress.tasks[patches_task].total or 0
                progress.update(patches_task, total=total + n)

            def advanced(n: int) -> None:
                progress.update(patches_task, advance=n)
                done = progress.tasks[patches_task].completed
                rate = done / max(time.perf_counter() - started, 1e-9)
                progress.update(patches_task, rate=f"{rate:,.0f} patches/s")

            def finished(result: Any) -> None:
                if result.status == "failed":
                    self.errors.print(f"[red]failed:[/red] {escape(result.reason)}")
                progress.update(slides_task, advance=1, rate=f"{result.slide_id} {result.status}")

            yield SlideProgress(planned, advanced, finished)

    def progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )


def _version(value: bool) -> None:
    if value:
        typer.echo(f"wsiflow {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="Show TensorFlow's C++ logs, Dask's logs and debug output."
        ),
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Whole-slide pathology pipeline (tile, train, infer, evaluate, view)."""
    if not verbose:
        # Must happen before TensorFlow is first imported by any command.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "3")
        quiet_tensorflow_import()  # the banner no log level reaches; oneDNN stays on
        # Dask logs every worker start and close at INFO, and errors for connections a
        # closing cluster cuts; under Prefect they reach the terminal through its root
        # handler. wsiflow reports failures itself. Read when Dask is first imported (here
        # and in the worker processes, which inherit the environment).
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "critical")


def _load(config: Path | None, overrides: dict[str, Any]):
    from pipeline.config import load_config, with_overrides

    return with_overrides(load_config(config), overrides)


def _parse_size(text: str | None) -> tuple[int | None, int | None]:
    if text is None:
        return None, None
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise ConfigError(
            "command-line options",
            [
                (
                    "--size",
                    f"Expected WIDTHxHEIGHT in pixels, e.g. 8192x6144. Got {text!r} instead.",
                    None,
                )
            ],
        )
    return int(match[1]), int(match[2])


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: one line, then exit code 143."""


#: The shell's exit codes for a command stopped by Ctrl-C (128 + SIGINT) and SIGTERM (128 + 15).
INTERRUPTED_EXIT = 130
TERMINATED_EXIT = 143


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while the block runs (main thread only)."""
    import signal

    def terminate(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def deferred_stop() -> Iterator[Callable[[], None]]:
    """Ctrl-C and SIGTERM noted while the block runs, raised by the ``check()`` it yields.

    For work that a signal must not cut inside a library call: Zarr writes on
    its own event loop, and a write cut short leaves tasks that print
    tracebacks as the process exits. ``check()`` between blocks of work raises
    ``KeyboardInterrupt`` (or :class:`Terminated`) there instead.
    """
    import signal

    received: list[int] = []

    def note(signum, frame):
        received.append(signum)

    def check() -> None:
        if received:
            raise Terminated() if received[0] == signal.SIGTERM else KeyboardInterrupt()

    try:
        previous = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        yield lambda: None
        return
    try:
        yield check
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stop_exit_code(exc: KeyboardInterrupt) -> int:
    return TERMINATED_EXIT if isinstance(exc, Terminated) else INTERRUPTED_EXIT


def stopped_summary(
    reporter: Reporter,
    command: str,
    exit_code: int,
    total: int,
    finished: list,
    unit: str = "slides",
    **where: str,
) -> dict[str, Any]:
    """Ctrl-C or SIGTERM: one line on what is kept and how to go on; the slides finished.

    ``where``: the output the command wrote (``store=...`` or ``out=...``);
    ``unit``: what the command counts (slides, or an import's splits).
    """
    counts = {s: sum(r.status == s for r in finished) for s in ("done", "skipped", "failed")}
    what = "terminated" if exit_code == TERMINATED_EXIT else "interrupted"
    (location,) = where.values()
    reporter.errors.print(
        f"[red]{what}:[/red] {len(finished)} of {total} {unit} finished "
        f"({counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed). "
        f"{escape(location)} marks only whole {unit} complete: the same command resumes, "
        "skipping them."
    )
    return {
        "command": command,
        "ok": False,
        "interrupted": True,
        "exit_code": exit_code,
        **where,
        "slides": total,
        "finished": len(finished),
        **counts,
        "per_slide": [r.summary_row() for r in finished],
    }


@contextlib.contextmanager
def output_lock(reporter: Reporter, folder: Path | str, kind: str | None = None) -> Iterator[None]:
    """:func:`~pipeline.outputs.held` for this command: claim (with ``kind``) and lock ``folder``.

    The line saying that a dead run's lock was taken over goes to ``reporter``.
    """
    from pipeline.outputs import held

    command = " ".join(["wsiflow", *sys.argv[1:]])[:300]
    with held(folder, command, reporter.warn, kind):
        yield


def _check_workers(reporter: Reporter, workers: int | None, option: str = "--workers") -> None:
    """A warning line for more local workers than cores; ConfigError beyond memory."""
    if workers is None:
        return
    from pipeline.cluster import check_local_workers

    warning = check_local_workers(workers, option)
    if warning is not None:
        reporter.warn(warning)


def status_cell(status: str) -> str:
    """A result table's status, coloured: failed red, skipped yellow, anything else green."""
    colour = {"failed": "red", "skipped": "yellow"}.get(status, "green")
    return f"[{colour}]{status}[/{colour}]"


def _fail_usage(reporter: Reporter, error: Exception, command: str) -> None:
    for line in str(error).splitlines():
        reporter.errors.print(f"[red]error:[/red] {escape(line)}")
    reporter.finish({"command": command, "ok": False, "error": str(error)}, exit_code=2)


def _fail_data(reporter: Reporter, error: Exception, command: str) -> None:
    """Bad input data (exit 1): the error names the file and the reason.

    An output folder wsiflow may not write into is a usage error (exit 2).
    """
    from pipeline.errors import ForeignOutputError

    if isinstance(error, ForeignOutputError):
        _fail_usage(reporter, error, command)
    for line in str(error).splitlines():
        reporter.errors.print(f"[red]error:[/red] {escape(line)}")
    reporter.finish({"command": command, "ok": False, "error": str(error)}, exit_code=1)
