"""The main job: ``wsiflow demo``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from ..errors import ConfigError, WsiflowError
from ._common import ConfigOption, JsonOption, Reporter, _fail_usage, _load, app
from .slides import inspect_slides, run_synth
from .tiles import run_tile


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

    Stages: cohort generation, slide inspection with OpenSlide, tiling of
    the training slides into a Zarr patch store and a contact sheet of it,
    training the patch classifier, inference on the testing slides (and on
    the real slides, apart) and CAMELYON16 evaluation; a results table at the
    end, with the `wsiflow serve` command that shows the heatmaps.
    """
    from ..slide import find_slides

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
        from ..preview import contact_sheet

        t0 = time.perf_counter()
        sheet = out / "preview.png"
        contact_sheet(store, sheet, per_class=16)
        stages["preview"] = time.perf_counter() - t0
        summary["preview"] = str(sheet)
        reporter.console.print(f"Contact sheet of stored patches: {sheet}")

    if tile_summary["tumor_patches"]:
        from .learn import run_train

        t0 = time.perf_counter()
        try:
            train_summary = run_train(
                reporter, [store], out / "model", cfg, overwrite=False, replace_different=True
            )
        except (WsiflowError, ValueError) as exc:
            reporter.errors.print(f"[red]train failed:[/red] {escape(str(exc))}")
            failures.append({"stage": "train", "reason": str(exc)})
        else:
            stages["train"] = time.perf_counter() - t0
            summary["train"] = {
                k: train_summary[k]
                for k in ("model_dir", "backbone", "val_auc", "best_epoch", "epochs_run", "reused")
            }

    model_dir = out / "model"
    if "train" in stages:
        failures += _infer_and_evaluate(
            reporter, cfg, model_dir, cohort_dir, present, out, stages, summary
        )

    if "infer" in summary:
        summary["serve_command"] = (
            f"wsiflow serve {cohort_dir} --heatmaps {summary['infer']['out']}"
        )
    summary["report"] = str(out / "report.html")
    _write_report(out, summary, stages)
    _results_table(reporter, summary, stages)
    missing_stages: list[str] = []
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


def _infer_and_evaluate(
    reporter: Reporter,
    cfg,
    model_dir: Path,
    cohort_dir: Path,
    real_slides: list[Path],
    out: Path,
    stages: dict[str, float],
    summary: dict[str, Any],
) -> list[dict[str, Any]]:
    """Infer the testing slides and evaluate them; infer the real slides apart. Failures."""
    from ..slide import find_slides
    from .infer import run_evaluate, run_infer

    failures: list[dict[str, Any]] = []
    testing = cohort_dir / "testing"
    t0 = time.perf_counter()
    try:
        infer_summary = run_infer(
            reporter, model_dir, find_slides([testing / "images"]), out / "inference", cfg,
            overwrite=False,
        )  # fmt: skip
    except WsiflowError as exc:
        reporter.errors.print(f"[red]infer failed:[/red] {escape(str(exc))}")
        return [{"stage": "infer", "reason": str(exc)}]
    stages["infer"] = time.perf_counter() - t0
    failures += infer_summary["failures"]
    summary["infer"] = {
        k: infer_summary[k] for k in ("out", "slides", "done", "skipped", "patches", "scores")
    }
    if real_slides:
        t0 = time.perf_counter()
        real_summary = run_infer(
            reporter, model_dir, find_slides(real_slides), out / "inference_real", cfg,
            overwrite=False,
        )  # fmt: skip
        stages["infer_real"] = time.perf_counter() - t0
        failures += real_summary["failures"]
        summary["infer_real"] = {k: real_summary[k] for k in ("out", "slides", "patches", "scores")}
    if infer_summary["done"] + infer_summary["skipped"] == 0:
        return failures
    t0 = time.perf_counter()
    try:
        evaluation = run_evaluate(
            reporter,
            out / "inference",
            testing / "reference.csv",
            testing / "lesion_annotations",
            testing / "images",
            cfg,
        )
    except (WsiflowError, ValueError) as exc:
        reporter.errors.print(f"[red]evaluate failed:[/red] {escape(str(exc))}")
        return [*failures, {"stage": "evaluate", "reason": str(exc)}]
    stages["evaluate"] = time.perf_counter() - t0
    summary["evaluate"] = {
        k: evaluation[k]
        for k in ("slide_auc", "froc", "froc_sensitivities", "lesions", "undefined", "files")
    }
    return failures


def _result_rows(summary: dict[str, Any], stages: dict[str, float]) -> list[tuple[str, str]]:
    """The numbers a user looks for, and where the files are."""
    rows = []
    tile = summary.get("tile", {})
    if tile:
        rows.append(
            ("patch store", f"{tile['patches']:,} patches ({tile['tumor_patches']:,} tumor)")
        )
    train = summary.get("train")
    if train:
        rows.append((
            "model", f"{train['backbone']}, validation AUC {train['val_auc']:.4f} "
            f"(epoch {train['best_epoch']}) in {train['model_dir']}",
        ))  # fmt: skip
    infer = summary.get("infer")
    if infer:
        rows.append(("test slides", f"{infer['slides']} slides, {infer['patches']:,} patches"))
        rows.append(("heatmaps", f"{infer['out']}/heatmaps (*_overlay.png)"))
    evaluation = summary.get("evaluate")
    if evaluation:
        auc, froc = evaluation["slide_auc"], evaluation["froc"]
        rows.append(("slide AUC", "undefined" if auc is None else f"{auc:.4f}"))
        rows.append(("FROC", "undefined" if froc is None else f"{froc:.4f}"))
        rows.append(("curves", ", ".join(evaluation["files"].values())))
    real = summary.get("infer_real")
    if real:
        scores = ", ".join(f"{k} {v:.3f}" for k, v in real["scores"].items())
        rows.append(("real slides", f"{real['out']} (scores: {scores})"))
    rows.append(("time per stage", ", ".join(f"{k} {v:.0f} s" for k, v in stages.items())))
    if "report" in summary:
        rows.append(("report", summary["report"]))
    if "serve_command" in summary:
        rows.append(("view", summary["serve_command"] + "  (then open http://127.0.0.1:8000/)"))
    return rows


def _results_table(reporter: Reporter, summary: dict[str, Any], stages: dict[str, float]) -> None:
    from rich.table import Table

    table = Table(title="wsiflow demo results", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for what, value in _result_rows(summary, stages):
        table.add_row(what, value)
    reporter.console.print(table)


def _write_report(out: Path, summary: dict[str, Any], stages: dict[str, float]) -> Path:
    """``OUT/report.html``: the results table, curves, heatmap overlays, per-slide table."""
    from ..report import write_report

    inference = [Path(summary[k]["out"]) for k in ("infer", "infer_real") if k in summary]
    return write_report(
        out / "report.html",
        title="wsiflow demo",
        summary_rows=_result_rows(summary, stages),
        model_dir=Path(summary["train"]["model_dir"]) if "train" in summary else None,
        inference_dirs=inference,
        evaluation_dir=Path(summary["infer"]["out"]) if "evaluate" in summary else None,
    )
