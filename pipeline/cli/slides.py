"""Commands about slides and cohorts: synth, info, config."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from pipeline.cli._common import (
    ConfigOption,
    JsonOption,
    Reporter,
    _check_workers,
    _fail_data,
    _fail_usage,
    _load,
    _parse_size,
    app,
    output_lock,
)
from pipeline.errors import ConfigError, SlideError, WsiflowError


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
        float | None, typer.Option("--mpp", help="Level-0 µm per pixel (0.243; easy only).")
    ] = None,
    difficulty: Annotated[
        str | None,
        typer.Option(
            "--difficulty",
            help="easy (separable) or camelyon (two centres, lobular tumor, mimics, artefacts).",
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option("--workers", "-w", min=1, help="Slides generated in parallel (processes)."),
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
                "slides.synthetic.difficulty": difficulty,
            },
        )
        _check_workers(reporter, workers)
    except ConfigError as exc:
        _fail_usage(reporter, exc, "synth")
    try:
        summary = run_synth(
            reporter, out_dir, cfg.slides.synthetic, workers=workers, overwrite=overwrite
        )
    except WsiflowError as exc:
        _fail_data(reporter, exc, "synth")
    reporter.finish(summary)


def run_synth(reporter: Reporter, out_dir: Path, params, *, workers: int, overwrite: bool) -> dict:
    """Generate (or reuse) a cohort with a progress bar; return the JSON summary."""
    from pipeline.outputs import claim_folder
    from pipeline.synth.cohort import plan_cohort, write_cohort

    total = len(plan_cohort(params))
    started = time.perf_counter()
    claim_folder(out_dir, "cohort")
    with output_lock(reporter, out_dir), reporter.progress() as progress:
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
    columns = ("slide", "split", "label", "centre", "lesions", "ITC", "excl.", "levels", "MB")
    for column in columns:
        table.add_column(column, justify="right" if column not in columns[:4] else "left")
    for r in cohort.slides:
        table.add_row(
            r.slide_id,
            r.split,
            r.label,
            r.centre or "-",
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
    from pipeline.slides.reader import find_slides

    reporter = Reporter(as_json)
    slides = find_slides(paths)
    rows, failures = inspect_slides(reporter, slides)
    reporter.finish(
        {"command": "info", "ok": not failures, "slides": rows, "failures": failures},
        exit_code=1 if failures or not slides else 0,
    )


def inspect_slides(reporter: Reporter, slides: list[Path]) -> tuple[list[dict], list[dict]]:
    """Open every slide with OpenSlide; print a table; one line per unreadable slide."""
    from pipeline.slides.reader import open_slide

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
                _mpp_cell(row),
                ", ".join(row["associated_images"]) or "-",
            )
        reporter.console.print(table)
    return rows, failures


def _mpp_cell(row: dict) -> str:
    """The µm/px, or what tiling will assume from the objective power (marked), or -."""
    if row["mpp"] is not None:
        return f"{row['mpp']:.3f}"
    if row["objective_power"]:
        from pipeline.tiling.grid import OBJECTIVE_MPP_UM

        power = row["objective_power"]
        return f"none (~{OBJECTIVE_MPP_UM / power:g} from {power:g}x)"
    return "none"


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
