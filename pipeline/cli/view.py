"""The viewer command: serve."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import ConfigError
from ._common import Reporter, _fail_usage, app


@app.command()
def serve(
    slide_dir: Annotated[Path, typer.Argument(help="Folder of slides (searched recursively).")],
    heatmaps: Annotated[
        Path | None,
        typer.Option("--heatmaps", help="An output folder of `wsiflow infer` to overlay."),
    ] = None,
    host: Annotated[
        str,
        typer.Option(
            "--host", help="Interface to bind (0.0.0.0: every one; mind who can reach it)."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
) -> None:
    """Browse slides with OpenSeadragon, with tumor heatmaps and detections as overlays.

    A development server (threaded); see the README for running the app under
    a production WSGI server.
    """
    from werkzeug.serving import run_simple

    from ..viewer import create_app

    reporter = Reporter(False)
    problems = []
    if not slide_dir.is_dir():
        problems.append((str(slide_dir), "no such folder", None))
    if heatmaps is not None and not heatmaps.is_dir():
        problems.append(("--heatmaps", f"no such folder: {heatmaps}", None))
    if problems:
        _fail_usage(reporter, ConfigError("command-line options", problems), "serve")
    application = create_app(slide_dir, heatmaps)
    reporter.console.print(f"wsiflow viewer on http://{host}:{port}/  (Ctrl+C stops it)")
    run_simple(host, port, application, threaded=True, use_reloader=False)
