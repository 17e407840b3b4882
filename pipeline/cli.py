"""The ``wsiflow`` command line: thin wrappers that parse, call, and report.

With ``--json`` the human-readable output goes to stderr and the last (only)
line of stdout is one JSON object summarising what was done.
Exit codes: 0 success, 1 some item failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .errors import ConfigError, SlideError, WsiflowError

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

    def finish(self, summary: dict[str, Any], exit_code: int = 0) -> None:
        if self.as_json:
            sys.stdout.write(json.dumps(summary, default=str) + "\n")
            sys.stdout.flush()
        raise typer.Exit(exit_code)

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
        bool, typer.Option("--verbose", "-v", help="Show TensorFlow's C++ logs and debug output.")
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
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
        os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "3")


def _load(config: Path | None, overrides: dict[str, Any]):
    from .config import load_config, with_overrides

    return with_overrides(load_config(config), overrides)


def _parse_size(text: str | None) -> tuple[int | None, int | None]:
    if text is None:
        return None, None
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise ConfigError(
            "--size",
            [
                (
                    "--size",
                    f"Expected WIDTHxHEIGHT in pixels, e.g. 8192x6144. Got {text!r} instead.",
                    None,
                )
            ],
        )
    return int(match[1]), int(match[2])


def _fail_usage(reporter: Reporter, error: Exception, command: str) -> None:
    for line in str(error).splitlines():
        reporter.errors.print(f"[red]error:[/red] {escape(line)}")
    reporter.finish({"command": command, "ok": False, "error": str(error)}, exit_code=2)


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Cohort root to write (CAMELYON16 layout).")],
    slides: Annotated[
        int | None, typer.Option("--slides", "-n", help="Total slides (>= 4); a third for testing.")
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Same seed, byte-identical slides.")
    ] = None,
    size: Annotated[
        str | None, typer.Option("--size", help="Level-0 WIDTHxHEIGHT in pixels, e.g. 8192x8192.")
    ] = None,
    mpp: Annotated[
        float | None, typer.Option("--mpp", help="Level-0 µm per pixel (0.243).")
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", "-w", help="Slides generated in parallel (processes).")
    ] = max(1, os.cpu_count() or 1),
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Regenerate even if present.")
    ] = False,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Generate a synthetic CAMELYON16-format cohort of pyramidal TIFFs and ASAP XML."""
    reporter = Reporter(as_json)
    try:
        width, height = _parse_size(size)
        cfg = _load(
            config,
            {
                "slides.synthetic.slides": slides,
                "slides.synthetic.seed": seed,
                "slides.synthetic.width_px": width,
                "slides.synthetic.height_px": height,
                "slides.synthetic.mpp": mpp,
            },
        )
    except ConfigError as exc:
        _fail_usage(reporter, exc, "synth")
    summary = run_synth(
        reporter, out_dir, cfg.slides.synthetic, workers=workers, overwrite=overwrite
    )
    reporter.finish(summary)


def run_synth(reporter: Reporter, out_dir: Path, params, *, workers: int, overwrite: bool) -> dict:
    """Generate (or reuse) a cohort with a progress bar; return the JSON summary."""
    from .synth.cohort import plan_cohort, write_cohort

    total = len(plan_cohort(params))
    started = time.perf_counter()
    with reporter.progress() as progress:
        task = progress.add_task("synth", total=total, rate="")

        def done(record) -> None:
            elapsed = time.perf_counter() - started
            progress.update(task, advance=1, rate=f"{record.slide_id} ({elapsed:.0f} s)")

        cohort = write_cohort(
            out_dir, params, workers=min(workers, total), overwrite=overwrite, on_slide_done=done
        )
        if cohort.reused:
            progress.update(task, completed=total, rate="reused (same parameters)")
    seconds = time.perf_counter() - started
    table = Table(title=f"Synthetic cohort in {out_dir}" + (" (reused)" if cohort.reused else ""))
    for column in ("slide", "split", "label", "lesions", "ITC", "excl.", "levels", "MB"):
        table.add_column(
            column, justify="right" if column not in ("slide", "split", "label") else "left"
        )
    for r in cohort.slides:
        table.add_row(
            r.slide_id,
            r.split,
            r.label,
            str(r.lesions),
            str(r.isolated_tumor_cells),
            str(r.exclusions),
            str(r.level_count),
            f"{r.file_bytes / 1e6:.1f}",
        )
    reporter.console.print(table)
    return {
        "command": "synth",
        "ok": True,
        "out_dir": str(out_dir),
        "reused": cohort.reused,
        "slides": len(cohort.slides),
        "tumor_slides": sum(r.label == "Tumor" for r in cohort.slides),
        "lesions": sum(r.lesions for r in cohort.slides),
        "isolated_tumor_cells": sum(r.isolated_tumor_cells for r in cohort.slides),
        "bytes": sum(r.file_bytes for r in cohort.slides),
        "reference": str(out_dir / "testing" / "reference.csv"),
        "seconds": round(seconds, 2),
        "params": params.model_dump(),
    }


@app.command()
def info(
    paths: Annotated[
        list[Path], typer.Argument(help="Slide files or folders (searched recursively).")
    ],
    as_json: JsonOption = False,
) -> None:
    """Show each slide's format, pyramid levels, pixel size and associated images."""
    from .slide import find_slides

    reporter = Reporter(as_json)
    slides = find_slides(paths)
    rows, failures = inspect_slides(reporter, slides)
    reporter.finish(
        {"command": "info", "ok": not failures, "slides": rows, "failures": failures},
        exit_code=1 if failures or not slides else 0,
    )


def inspect_slides(reporter: Reporter, slides: list[Path]) -> tuple[list[dict], list[dict]]:
    """Open every slide with OpenSlide; print a table; one line per unreadable slide."""
    from .slide import open_slide

    rows, failures = [], []
    for path in slides:
        try:
            with open_slide(path) as slide:
                i = slide.info
                rows.append(
                    {
                        "path": str(path),
                        "vendor": i.vendor,
                        "width": i.level0_wh[0],
                        "height": i.level0_wh[1],
                        "levels": i.level_count,
                        "downsamples": [round(d, 3) for d in i.level_downsamples],
                        "mpp": None if i.mpp_xy is None else round(i.mpp_xy[0], 4),
                        "objective_power": i.objective_power,
                        "associated_images": list(i.associated_images),
                    }
                )
        except SlideError as exc:
            failures.append({"path": str(path), "reason": exc.reason})
            reporter.errors.print(f"[red]failed:[/red] {escape(str(exc))}")
    if not slides:
        reporter.errors.print("[yellow]no slides found[/yellow]")
    if rows:
        table = Table(title="Slides")
        table.add_column("slide", no_wrap=True)
        for column in ("vendor", "level-0 size", "levels", "µm/px", "associated"):
            table.add_column(column)
        for row in rows:
            table.add_row(
                Path(row["path"]).name,
                row["vendor"],
                f"{row['width']} x {row['height']}",
                str(row["levels"]),
                "-" if row["mpp"] is None else f"{row['mpp']:.3f}",
                ", ".join(row["associated_images"]) or "-",
            )
        reporter.console.print(table)
    return rows, failures


@app.command("config")
def config_command(
    path: Annotated[
        Path | None, typer.Argument(help="YAML config to check; none: the defaults.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Validate a config file and print it fully resolved (every default filled in)."""
    import yaml

    reporter = Reporter(as_json)
    try:
        cfg = _load(path, {})
    except ConfigError as exc:
        _fail_usage(reporter, exc, "config")
    resolved = cfg.model_dump(mode="json")
    reporter.console.print(yaml.safe_dump(resolved, sort_keys=False).rstrip(), markup=False)
    reporter.finish(
        {"command": "config", "ok": True, "path": str(path) if path else None, "config": resolved}
    )


@app.command()
def tile(
    slides: Annotated[
        list[Path], typer.Argument(help="Slide files or folders (searched recursively).")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Zarr patch store to write (STORE.zarr).")
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
    stride: Annotated[int | None, typer.Option("--stride", help="Grid step in pixels.")] = None,
    scheduler: Annotated[
        str | None, typer.Option("--scheduler", help="Existing Dask scheduler address (tcp://...).")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", "-w", help="Local Dask worker processes (default: cores)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Redo slides already complete.")
    ] = False,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Find tissue, label patches from annotations, extract them into a Zarr store (Dask)."""
    from .slide import find_slides

    reporter = Reporter(as_json)
    try:
        if level is not None and mpp is not None:
            raise ConfigError(
                "command-line options", [("--mpp/--level", "give one, not both", None)]
            )
        from .config import CLEAR

        overrides: dict[str, Any] = {
            "tiling.patch_px": patch_size,
            "tiling.stride_px": stride,
            "orchestration.scheduler": scheduler,
            "orchestration.workers": workers,
        }
        if level is not None:
            overrides.update({"tiling.level": level, "tiling.target_mpp": CLEAR})
        elif mpp is not None:
            overrides.update({"tiling.target_mpp": mpp, "tiling.level": CLEAR})
        cfg = _load(config, overrides)
    except ConfigError as exc:
        _fail_usage(reporter, exc, "tile")
    paths = find_slides(slides)
    if annotations is not None and not annotations.is_dir():
        _fail_usage(
            reporter,
            ConfigError("--annotations", [(str(annotations), "no such folder", None)]),
            "tile",
        )
    summary = run_tile(reporter, paths, out, cfg, annotations_dir=annotations, overwrite=overwrite)
    reporter.finish(summary, exit_code=0 if summary["ok"] else 1)


def run_tile(
    reporter: Reporter, paths: list[Path], out: Path, cfg, *, annotations_dir, overwrite
) -> dict:
    """Tile ``paths`` into ``out`` with a progress bar and a per-slide table; return the summary."""
    from .cluster import dask_client
    from .store import store_bytes
    from .tiling import tile_slides

    started = time.perf_counter()
    orchestration = cfg.orchestration
    results = []
    with reporter.progress() as progress:
        slides_task = progress.add_task("slides", total=len(paths), rate="")
        patches_task = progress.add_task("patches", total=0, rate="")
        t0 = time.perf_counter()
        done = {"patches": 0}

        def planned(n: int) -> None:
            progress.update(patches_task, total=(progress.tasks[patches_task].total or 0) + n)

        def wrote(n: int) -> None:
            done["patches"] += n
            rate = done["patches"] / max(time.perf_counter() - t0, 1e-9)
            progress.update(patches_task, advance=n, rate=f"{rate:,.0f} patches/s")

        def finished(result) -> None:
            if result.status == "failed":
                reporter.errors.print(f"[red]failed:[/red] {escape(result.reason)}")
            progress.update(slides_task, advance=1, rate=f"{result.slide_id} {result.status}")

        with dask_client(
            orchestration.scheduler,
            workers=orchestration.workers,
            threads_per_worker=orchestration.threads_per_worker,
        ) as client:
            results = tile_slides(
                client,
                paths,
                out,
                cfg.tiling,
                annotations_dir=annotations_dir,
                overwrite=overwrite,
                on_planned=planned,
                on_patches=wrote,
                on_slide=finished,
            )
    seconds = time.perf_counter() - started
    table = Table(title=f"Patch store {out}")
    for column in ("slide", "status", "patches", "tumor", "level", "read px", "s"):
        table.add_column(column, no_wrap=column == "slide")
    for r in results:
        colour = {"failed": "red", "skipped": "yellow"}.get(r.status, "green")
        table.add_row(
            r.slide_id,
            f"[{colour}]{r.status}[/{colour}]",
            str(r.patches),
            str(r.tumor_patches),
            "-" if r.level is None else str(r.level),
            "-" if r.read_px is None else str(r.read_px),
            f"{r.seconds:.1f}",
        )
    reporter.console.print(table)
    failures = [
        {"slide": r.slide_id, "path": r.path, "reason": r.reason}
        for r in results
        if r.status == "failed"
    ]
    written = sum(r.patches for r in results if r.status == "done")
    stored = [r for r in results if r.status != "failed"]
    size = store_bytes(out) if out.exists() else 0
    raw = sum(r.patches for r in stored) * cfg.tiling.patch_px**2 * 3
    slide_bytes = sum(Path(r.path).stat().st_size for r in stored if Path(r.path).exists())
    reporter.console.print(
        f"{written:,} patches written in {seconds:.1f} s; store {size / 1e6:,.1f} MB "
        f"({cfg.tiling.codec}, quality {cfg.tiling.codec_quality}): "
        f"raw pixels / {raw / max(size, 1):.1f}, {size / max(slide_bytes, 1):.2f} x the slide files"
    )
    return {
        "command": "tile",
        "ok": not failures and bool(results),
        "store": str(out),
        "slides": len(results),
        "done": sum(r.status == "done" for r in results),
        "skipped": sum(r.status == "skipped" for r in results),
        "failed": len(failures),
        "patches": sum(r.patches for r in results if r.status != "failed"),
        "tumor_patches": sum(r.tumor_patches for r in results if r.status != "failed"),
        "patches_written": written,
        "store_bytes": size,
        "raw_pixel_bytes": raw,
        "slide_file_bytes": slide_bytes,
        "seconds": round(seconds, 2),
        "failures": failures,
        "per_slide": [r.summary_row() for r in results],
    }


@app.command()
def preview(
    store: Annotated[Path, typer.Argument(help="A Zarr patch store written by `wsiflow tile`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Contact sheet PNG to write.")],
    slide: Annotated[
        str | None, typer.Option("--slide", help="Only this slide id (default: all slides).")
    ] = None,
    per_class: Annotated[int, typer.Option("--per-class", help="Patches per class.")] = 16,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    as_json: JsonOption = False,
) -> None:
    """Write a contact sheet of random tumor and normal patches with labels and coordinates."""
    from .preview import contact_sheet

    reporter = Reporter(as_json)
    try:
        shown = contact_sheet(store, out, slide_id=slide, per_class=per_class, seed=seed)
    except (WsiflowError, FileNotFoundError) as exc:
        _fail_usage(reporter, exc, "preview")
    reporter.console.print(
        f"wrote {out}: {shown['tumor']} tumor and {shown['normal']} normal patches"
    )
    reporter.finish({"command": "preview", "ok": True, "out": str(out), **shown})


@app.command()
def demo(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Where the demo writes everything.")
    ] = Path("demo_out"),
    slides: Annotated[
        list[Path] | None,
        typer.Argument(help="Extra real slides or folders to include (default: slides.extra)."),
    ] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run the main job on a generated CAMELYON16-format cohort (plus real slides if present).

    This build runs the stages that exist: cohort generation, slide
    inspection with OpenSlide, tiling of the training slides into a Zarr patch
    store and a contact sheet of it. Training, inference and evaluation are
    reported as not yet available rather than faked.
    """
    from .slide import find_slides

    reporter = Reporter(as_json)
    try:
        cfg = _load(config, {})
    except ConfigError as exc:
        _fail_usage(reporter, exc, "demo")
    started = time.perf_counter()
    cohort_dir = Path(cfg.slides.root) if cfg.slides.root else out / "cohort"
    stages: dict[str, float] = {}
    summary: dict[str, Any] = {"command": "demo", "out": str(out), "cohort": str(cohort_dir)}
    if cfg.slides.root is None:
        t0 = time.perf_counter()
        synth_summary = run_synth(
            reporter,
            cohort_dir,
            cfg.slides.synthetic,
            workers=cfg.orchestration.workers or max(1, os.cpu_count() or 1),
            overwrite=False,
        )
        stages["synth"] = time.perf_counter() - t0
        summary["synth"] = {
            k: synth_summary[k] for k in ("slides", "tumor_slides", "lesions", "reused")
        }
    extra_paths = list(slides) if slides else list(cfg.slides.extra)
    present = [p for p in extra_paths if p.exists()]
    for missing in sorted(set(extra_paths) - set(present)):
        reporter.errors.print(
            f"[yellow]skipped:[/yellow] {escape(str(missing))} is not present "
            "(real slides are optional)"
        )
    t0 = time.perf_counter()
    rows, failures = inspect_slides(reporter, find_slides([cohort_dir, *present]))
    stages["inspect"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    training = cohort_dir / "training"
    store = out / "patches.zarr"
    tile_summary = run_tile(
        reporter,
        find_slides([training]),
        store,
        cfg,
        annotations_dir=training / "lesion_annotations",
        overwrite=False,
    )
    stages["tile"] = time.perf_counter() - t0
    failures += tile_summary["failures"]
    summary["tile"] = {
        k: tile_summary[k]
        for k in ("store", "patches", "tumor_patches", "store_bytes", "done", "skipped")
    }
    if tile_summary["patches"]:
        from .preview import contact_sheet

        t0 = time.perf_counter()
        sheet = out / "preview.png"
        contact_sheet(store, sheet, per_class=16)
        stages["preview"] = time.perf_counter() - t0
        summary["preview"] = str(sheet)
        reporter.console.print(f"Contact sheet of stored patches: {sheet}")

    missing_stages = ["train", "infer", "evaluate", "serve"]
    reporter.console.print(
        "[bold]Not yet in this build:[/bold] "
        + ", ".join(missing_stages)
        + " (nothing is shown for them rather than placeholder results)."
    )
    summary.update(
        ok=not failures,
        slides=len(rows),
        real_slides=[r["path"] for r in rows if not Path(r["path"]).is_relative_to(cohort_dir)],
        failures=failures,
        stages_run=list(stages),
        stages_not_available=missing_stages,
        seconds={k: round(v, 2) for k, v in stages.items()},
        total_seconds=round(time.perf_counter() - started, 2),
    )
    reporter.finish(summary, exit_code=1 if failures else 0)


def main() -> None:
    """Console-script entry point: typed errors become one line and exit code 1."""
    try:
        app()
    except WsiflowError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
