"""The viewer command: serve."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli._common import Reporter, _fail_usage, app
from pipeline.errors import ConfigError


@app.command()
def serve(
    slides: Annotated[
        list[Path],
        typer.Argument(help="Slide files, and folders of slides (searched recursively)."),
    ],
    heatmaps: Annotated[
        Path | None,
        typer.Option("--heatmaps", help="An output folder of `wsiflow infer` to overlay."),
    ] = None,
    annotations: Annotated[
        Path | None,
        typer.Option(
            "--annotations",
            help="Folder of the slides' lesion annotations (ASAP XML or GeoJSON): ground truth "
            "outlines, tumor and exclusion.",
        ),
    ] = None,
    color_map: Annotated[
        str,
        typer.Option(
            "--color-map",
            help="Heatmap colours: tumor (clear, amber to red) or redgreen (green to red); "
            "as `inference.color_map` drew the PNG overlays.",
        ),
    ] = "tumor",
    host: Annotated[
        str,
        typer.Option(
            "--host", help="Interface to bind (0.0.0.0: every one; mind who can reach it)."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    threads: Annotated[
        int, typer.Option("--threads", min=1, max=64, help="Requests served at once.")
    ] = 8,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log every request on stderr.")
    ] = False,
) -> None:
    """Browse slides with OpenSeadragon, with tumor heatmaps and detections as overlays.

    With --annotations the ground truth is drawn as outlines; where the
    --heatmaps folder holds an evaluation.json (wsiflow evaluate), detections
    are coloured true or false positive and missed lesions are marked.

    Served by waitress: --threads requests at once, idle connections held
    without a thread each and closed after 2 minutes, requests not logged
    unless --verbose.
    """
    import waitress

    from pipeline.inference.heatmap import COLOR_MAPS
    from pipeline.viewer import create_app, log_requests

    reporter = Reporter(False)
    problems = []
    for path in slides:
        if not path.exists():
            problems.append((str(path), "no such file or folder", None))
    if heatmaps is not None and not heatmaps.is_dir():
        problems.append(("--heatmaps", f"no such folder: {heatmaps}", None))
    if annotations is not None and not annotations.is_dir():
        problems.append(("--annotations", f"no such folder: {annotations}", None))
    if color_map not in COLOR_MAPS:
        problems.append(("--color-map", f"one of {', '.join(COLOR_MAPS)}; got {color_map!r}", None))
    if problems:
        _fail_usage(reporter, ConfigError("command-line options", problems), "serve")
    application = create_app(slides, heatmaps, annotations_dir=annotations, color_map=color_map)
    if verbose:
        application.wsgi_app = log_requests(application.wsgi_app)
    else:  # "Task queue depth is N" under load: the requests are served all the same
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    reporter.console.print(f"wsiflow viewer on http://{host}:{port}/  (Ctrl+C stops it)")
    try:
        waitress.serve(
            application,
            host=host,
            port=port,
            threads=threads,
            connection_limit=256,  # more wait in the listen backlog
            channel_timeout=120,  # an idle or stalled connection is closed after this (s)
            cleanup_interval=30,
            ident="wsiflow",
        )
    except OSError as exc:  # the port is taken, the address is not this machine's
        _fail_usage(
            reporter, ConfigError("--host/--port", [(f"{host}:{port}", str(exc), None)]), "serve"
        )
    except KeyboardInterrupt:
        reporter.console.print("viewer stopped")
