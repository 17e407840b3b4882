"""Commands about patch stores: tile, import, preview."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from pipeline.cli._common import (
    ConfigOption,
    JsonOption,
    RedoOption,
    Reporter,
    SchedulerOption,
    SlideMppOption,
    SlidesArgument,
    _check_workers,
    _fail_data,
    _fail_usage,
    _load,
    app,
    deferred_stop,
    output_lock,
    status_cell,
    stop_exit_code,
    stop_on_sigterm,
    stopped_summary,
)
from pipeline.errors import (
    ConfigError,
    ForeignOutputError,
    OutputLockedError,
    OutputWriteError,
    SchedulerError,
    StoreError,
    WsiflowError,
)


@app.command()
def tile(
    slides: SlidesArgument,
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            help="Zarr patch store to write: a path (STORE.zarr) or an fsspec URL "
            "(s3://bucket/STORE.zarr).",
        ),
    ],
    annotations: Annotated[
        Path | None,
        typer.Option(
            "--annotations", "-a", help="Folder of <slide>.xml (ASAP) or .geojson (QuPath)."
        ),
    ] = None,
    mpp: Annotated[
        float | None, typer.Option("--mpp", help="Patch resolution in µm/px (0.5 ~ 20x).")
    ] = None,
    level: Annotated[
        int | None, typer.Option("--level", help="Read this pyramid level instead of --mpp.")
    ] = None,
    patch_size: Annotated[
        int | None, typer.Option("--patch-size", help="Patch side in pixels.")
    ] = None,
    slide_mpp: SlideMppOption = None,
    stride: Annotated[int | None, typer.Option("--stride", help="Grid step in pixels.")] = None,
    scheduler: SchedulerOption = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", "-w", help="Local Dask worker processes (default: cores)."),
    ] = None,
    overwrite: RedoOption = False,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Find tissue, label patches from annotations, extract them into a Zarr store (Dask)."""
    from pipeline.slides.reader import SLIDE_SUFFIXES, find_slides

    reporter = Reporter(as_json)
    try:
        if level is not None and mpp is not None:
            raise ConfigError(
                "command-line options", [("--mpp/--level", "give one, not both", None)]
            )
        from pipeline.config import CLEAR

        overrides: dict[str, Any] = {
            "tiling.patch_px": patch_size,
            "tiling.stride_px": stride,
            "tiling.slide_mpp": slide_mpp,
            "orchestration.scheduler": scheduler,
            "orchestration.workers": workers,
        }
        if level is not None:
            overrides.update({"tiling.level": level, "tiling.target_mpp": CLEAR})
        elif mpp is not None:
            overrides.update({"tiling.target_mpp": mpp, "tiling.level": CLEAR})
        cfg = _load(config, overrides)
        if cfg.orchestration.scheduler is None:
            _check_workers(reporter, cfg.orchestration.workers)
    except ConfigError as exc:
        _fail_usage(reporter, exc, "tile")
    paths = find_slides(slides)
    if not paths:
        given = ", ".join(map(str, slides))
        expected = f"slide files ({', '.join(sorted(SLIDE_SUFFIXES))}) in {given}"
        _fail_usage(
            reporter,
            ConfigError(
                "command-line arguments", [("SLIDES", f"Expected {expected}. Found none.", None)]
            ),
            "tile",
        )
    if annotations is not None and not annotations.is_dir():
        _fail_usage(
            reporter,
            ConfigError("--annotations", [(str(annotations), "no such folder", None)]),
            "tile",
        )
    try:
        summary = run_tile(
            reporter, paths, out, cfg, annotations_dir=annotations, overwrite=overwrite
        )
    except (
        SchedulerError,
        StoreError,
        ForeignOutputError,
        OutputLockedError,
        OutputWriteError,
    ) as exc:
        _fail_data(reporter, exc, "tile")
    if summary.get("interrupted"):
        reporter.finish(summary, exit_code=summary.pop("exit_code"))
    reporter.finish(summary, exit_code=0 if summary["ok"] else 1)


def run_tile(
    reporter: Reporter, paths: list[Path], out: Path | str, cfg, *, annotations_dir, overwrite
) -> dict:
    """Tile ``paths`` into ``out`` with a progress bar and a per-slide table; return the summary."""
    from pipeline.cluster import dask_client, silence_logging
    from pipeline.store.patch_store import open_root
    from pipeline.tiling.driver import summarize, tile_slides

    started = time.perf_counter()
    orchestration = cfg.orchestration
    finished = []
    try:
        with (
            stop_on_sigterm(),
            dask_client(
                orchestration.scheduler,
                workers=orchestration.workers,
                threads_per_worker=orchestration.threads_per_worker,
            ) as client,
        ):
            # The cluster, then the store, then the bars: a scheduler that cannot be
            # reached leaves no store behind; a bad store path or URL or missing
            # credentials are one line before any bar.
            open_root(out)
            with output_lock(reporter, out), reporter.slide_progress(len(paths)) as bars:

                def on_slide(result) -> None:
                    finished.append(result)
                    bars.finished(result)

                results = tile_slides(
                    client,
                    paths,
                    out,
                    cfg.tiling,
                    annotations_dir=annotations_dir,
                    overwrite=overwrite,
                    on_planned=bars.planned,
                    on_patches=bars.advanced,
                    on_slide=on_slide,
                )
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
        # This process ends here; Dask's threads may still log the connections cut short.
        silence_logging()
        return stopped_summary(
            reporter, "tile", stop_exit_code(exc), len(paths), finished, store=str(out)
        )
    seconds = time.perf_counter() - started
    table = Table(title=f"Patch store {out}")
    for column in ("slide", "status", "patches", "tumor", "level", "read px", "s"):
        table.add_column(column, no_wrap=column == "slide")
    for r in results:
        table.add_row(
            r.slide_id,
            status_cell(r.status),
            str(r.patches),
            str(r.tumor_patches),
            "-" if r.level is None else str(r.level),
            "-" if r.read_px is None else str(r.read_px),
            f"{r.seconds:.1f}",
        )
    reporter.console.print(table)
    for r in results:
        for warning in r.warnings:
            reporter.warn(warning)
    summary = summarize(results, str(out), cfg.tiling.patch_px)
    size, raw, slide_bytes = (
        summary[k] for k in ("store_bytes", "raw_pixel_bytes", "slide_file_bytes")
    )
    line = f"{summary['patches_written']:,} patches written in {seconds:.1f} s"
    if raw and slide_bytes:  # no ratios of an empty store
        line += (
            f"; store {size / 1e6:,.1f} MB ({cfg.tiling.codec}, quality "
            f"{cfg.tiling.codec_quality}): raw pixels / {raw / max(size, 1):.1f}, "
            f"{size / slide_bytes:.2f} x the slide files"
        )
    reporter.console.print(line)
    return {
        "command": "tile",
        "ok": not summary["failures"] and bool(results),
        **summary,
        "seconds": round(seconds, 2),
    }


@app.command("import")
def import_command(
    source: Annotated[
        Path,
        typer.Argument(
            help="A PCam folder (*_{train,valid,test}_{x,y}.h5) or a folder of class folders "
            "(CLASS/*.png, or train|valid|test/CLASS/*.png)."
        ),
    ],
    out: Annotated[
        str,
        typer.Option("--out", "-o", help="Zarr patch store to write (a path or an fsspec URL)."),
    ],
    dataset: Annotated[
        str | None,
        typer.Option("--format", help="pcam or folders (default: pcam if PCam files are there)."),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option("--name", help="Groups NAME_<split> (default: pcam, or the folder name)."),
    ] = None,
    tumor_class: Annotated[
        str | None,
        typer.Option("--tumor-class", help="The class folder of tumor patches (default: tumor)."),
    ] = None,
    validation_fraction: Annotated[
        float,
        typer.Option(
            "--validation-fraction",
            min=0.0,
            max=0.9,
            help="Share of each class for validation, without split folders.",
        ),
    ] = 0.2,
    seed: Annotated[int, typer.Option("--seed", help="Order and split seed.")] = 0,
    mpp: Annotated[
        float | None,
        typer.Option("--mpp", help="µm/px of the patches (PCam: 0.972; inference needs it)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Redo splits already complete.")
    ] = False,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Import a patch dataset (PatchCamelyon, class folders) into a patch store for `train`.

    Each split becomes one group, kept as given: `train` trains on the
    training split, validates on the validation split and scores the test
    split once at the end.
    """
    from pipeline.importing.dataset import find_parts
    from pipeline.importing.write import ImportSettings

    reporter = Reporter(as_json)
    try:
        if dataset not in (None, "pcam", "folders"):
            raise ConfigError("--format", [(str(dataset), "Expected pcam or folders.", None)])
        if mpp is not None and mpp <= 0:
            raise ConfigError("--mpp", [(str(mpp), "Expected a positive µm/px.", None)])
        tiling = _load(config, {}).tiling
        parts = find_parts(
            source,
            dataset=dataset,
            name=name,
            tumor_class=tumor_class,
            validation_fraction=validation_fraction,
            seed=seed,
        )
    except WsiflowError as exc:
        _fail_usage(reporter, exc, "import")
    settings = ImportSettings(tiling.codec, tiling.codec_quality, tiling.chunk_patches, mpp)
    try:
        summary = run_import(reporter, parts, out, settings, overwrite=overwrite)
    except (StoreError, ForeignOutputError, OutputLockedError, OutputWriteError) as exc:
        _fail_data(reporter, exc, "import")
    reporter.finish(summary, exit_code=0 if summary["ok"] else 1)


def run_import(reporter: Reporter, parts: list, out: str, settings, *, overwrite: bool) -> dict:
    """Import ``parts`` into ``out`` with a progress bar and a table; return the summary."""
    from pipeline.store.patch_store import open_root

    started = time.perf_counter()
    open_root(out)
    finished = []
    try:
        with deferred_stop() as check, output_lock(reporter, out), reporter.progress() as bars:
            results = _import_with_progress(
                reporter, bars, parts, out, settings, overwrite, finished, check
            )
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
        summary = stopped_summary(
            reporter, "import", stop_exit_code(exc), len(parts), finished, "splits", store=out
        )
        reporter.finish(summary, exit_code=summary.pop("exit_code"))

    table = Table(title=f"Patch store {out}")
    for column in ("group", "split", "status", "patches", "tumor", "left out", "s"):
        table.add_column(column, no_wrap=column == "group")
    for r in results:
        table.add_row(
            r.group_id, r.split, status_cell(r.status), str(r.patches),
            str(r.tumor_patches), str(len(r.warnings)), f"{r.seconds:.1f}",
        )  # fmt: skip
    reporter.console.print(table)
    failed = [r for r in results if r.status == "failed"]
    return {
        "command": "import",
        "ok": not failed,
        "store": str(out),
        "patch_px": next((p.patch_px for p in parts if p.patch_px), None),
        "patches": sum(r.patches for r in results),
        "tumor_patches": sum(r.tumor_patches for r in results),
        "left_out": sum(len(r.warnings) for r in results),
        "failures": [r.reason for r in failed],
        "per_split": [r.summary_row() for r in results],
        "seconds": round(time.perf_counter() - started, 2),
    }


def _import_with_progress(
    reporter, progress, parts, out, settings, overwrite, finished, check
) -> list:
    """:func:`import_parts` with a bar of patches; warnings and failures one line each.

    ``check()`` after every block raises a Ctrl-C noted meanwhile (:func:`deferred_stop`).
    """
    from pipeline.importing.write import import_parts

    task = progress.add_task("patches", total=0, rate="")

    def planned(n: int) -> None:
        progress.update(task, total=(progress.tasks[task].total or 0) + n)

    def advanced(n: int) -> None:
        progress.update(task, advance=n)
        check()

    def on_part(result) -> None:
        finished.append(result)
        for warning in result.warnings:
            reporter.warn(warning)
        if result.status == "failed":
            reporter.errors.print(f"[red]failed:[/red] {escape(result.reason)}")

    return import_parts(
        parts, out, settings, overwrite=overwrite,
        on_planned=planned, on_patches=advanced, on_part=on_part,
    )  # fmt: skip


@app.command()
def preview(
    store: Annotated[
        str,
        typer.Argument(
            help="A patch store written by `wsiflow tile` (a path or a URL), or a cohort "
            "written by `wsiflow synth --difficulty camelyon`."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Contact sheet PNG to write.")],
    slide: Annotated[
        str | None, typer.Option("--slide", help="Only this slide id (default: all slides).")
    ] = None,
    per_class: Annotated[
        int,
        # max: pipeline.store.preview.MAX_PER_CLASS, not imported here to keep the CLI's start fast
        typer.Option("--per-class", min=1, max=1024, help="Patches per class (at most)."),
    ] = 16,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    as_json: JsonOption = False,
) -> None:
    """Write a contact sheet of random tumor and normal patches with labels and coordinates.

    Given a generated cohort instead of a store: each tumor pattern, mimic and
    artefact it holds, from each centre.
    """
    from pipeline.store.preview import contact_sheet

    reporter = Reporter(as_json)
    if (Path(store) / "synth.json").is_file():
        from pipeline.synth.preview import cohort_contact_sheet

        try:
            shown = cohort_contact_sheet(store, out, per_cell=min(per_class, 4))
        except WsiflowError as exc:
            _fail_usage(reporter, exc, "preview")
        missing = f"; none of: {', '.join(shown['missing'])}" if shown["missing"] else ""
        reporter.console.print(f"wrote {out}: {sum(shown['elements'].values())} patches{missing}")
        reporter.finish({"command": "preview", "ok": True, "out": str(out), **shown})
        return
    try:
        shown = contact_sheet(store, out, slide_id=slide, per_class=per_class, seed=seed)
    except (WsiflowError, FileNotFoundError) as exc:
        _fail_usage(reporter, exc, "preview")
    reporter.console.print(
        f"wrote {out}: {shown['tumor']} tumor and {shown['normal']} normal patches"
    )
    reporter.finish({"command": "preview", "ok": True, "out": str(out), **shown})
