"""The main job: ``wsiflow demo``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from pipeline.cli._common import (
    ConfigOption,
    JsonOption,
    Reporter,
    _fail_data,
    _fail_usage,
    _load,
    app,
)
from pipeline.cli.slides import inspect_slides, run_synth
from pipeline.errors import ConfigError, WsiflowError


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

    Generates the cohort, inspects every slide with OpenSlide, then runs the
    end-to-end Prefect flow (camelyon: tile the training slides, train the
    patch classifier, infer the testing slides into heatmaps, evaluate them;
    the real slides are inferred apart), writes a contact sheet of the
    patches and an HTML report, and ends with a results table and the
    `wsiflow serve` command that shows the heatmaps. A second run reuses
    every finished stage.
    """
    from pipeline.slides.reader import find_slides

    reporter = Reporter(as_json)
    try:
        cfg = _load(config, {})
    except ConfigError as exc:
        _fail_usage(reporter, exc, "demo")
    from pipeline.outputs import claim_folder

    try:
        claim_folder(out, "demo")
    except WsiflowError as exc:
        _fail_data(reporter, exc, "demo")
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
    flow_summary, flow_failures = _camelyon_flow(reporter, config, cohort_dir, present, out)
    stages["flow"] = time.perf_counter() - t0
    failures += flow_failures
    stages.update(flow_summary.get("seconds", {}))
    for stage in (
        "tile", "train", "mine", "retrain", "slide_classifier", "infer", "evaluate",
        "infer_baseline", "evaluate_baseline", "infer_real",
    ):  # fmt: skip
        if stage in flow_summary:
            summary[stage] = flow_summary[stage]
    if summary.get("tile", {}).get("patches"):
        from pipeline.store.preview import contact_sheet

        t0 = time.perf_counter()
        sheet = out / "preview.png"
        contact_sheet(summary["tile"]["store"], sheet, per_class=16)
        stages["preview"] = time.perf_counter() - t0
        summary["preview"] = str(sheet)
        reporter.console.print(f"Contact sheet of stored patches: {sheet}")

    if "infer" in summary:
        testing = cohort_dir / "testing"  # CAMELYON16's layout: ground truth beside predictions
        summary["serve_command"] = (
            f"wsiflow serve {testing / 'images'} --heatmaps {summary['infer']['out']} "
            f"--annotations {testing / 'lesion_annotations'}"
        )
    summary["report"] = str(out / "report.html")
    shown = {k: v for k, v in stages.items() if k != "flow"}
    _write_report(out, summary, shown)
    _results_table(reporter, summary, shown)
    summary.update(
        ok=not failures,
        slides=len(rows),
        real_slides=[r["path"] for r in rows if not Path(r["path"]).is_relative_to(cohort_dir)],
        failures=failures,
        stages_run=[k for k in stages if k != "flow"],
        stages_not_available=[],
        seconds={k: round(v, 2) for k, v in stages.items()},
        total_seconds=round(time.perf_counter() - started, 2),
    )
    reporter.finish(summary, exit_code=1 if failures else 0)


def _camelyon_flow(
    reporter: Reporter,
    config: Path | None,
    cohort_dir: Path,
    real_slides: list[Path],
    out: Path,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the end-to-end Prefect flow on the cohort; its summary and the failures."""
    from flows.runtime import run_flow

    reporter.console.print(
        "Running the camelyon Prefect flow (tile -> train -> infer -> evaluate); "
        "finished stages are reused"
    )
    parameters = {
        "root": str(cohort_dir.resolve()),
        "out_dir": str(out.resolve()),
        "extra_slides": [str(p.resolve()) for p in real_slides] or None,
        "config": None if config is None else str(config.resolve()),
    }
    state = run_flow("camelyon", parameters, return_state=True)
    if not state.is_completed():
        reporter.errors.print(f"[red]flow failed:[/red] {escape(str(state.message))}")
        return {}, [{"stage": "flow", "reason": str(state.message)}]
    flow_summary = state.result()
    for failure in flow_summary["failures"]:
        reporter.errors.print(f"[red]failed:[/red] {escape(failure['reason'])}")
    return flow_summary, flow_summary["failures"]


def _result_rows(summary: dict[str, Any], stages: dict[str, float]) -> list[tuple[str, str]]:
    """The numbers a user looks for, where the files are, and how to look at them."""
    from flows.camelyon import summary_rows

    rows = summary_rows({**summary, "seconds": stages, "failures": []})
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


def _final_model(summary: dict[str, Any]) -> Path | None:
    """The model that inferred the test slides: the retrained one when hard negatives were mined."""
    train = summary.get("retrain") or summary.get("train")
    return Path(train["model_dir"]) if train else None


def _write_report(out: Path, summary: dict[str, Any], stages: dict[str, float]) -> Path:
    """``OUT/report.html``: the results table, curves, heatmap overlays, per-slide table."""
    from pipeline.evaluation.report import write_report

    inference = [Path(summary[k]["out"]) for k in ("infer", "infer_real") if k in summary]
    return write_report(
        out / "report.html",
        title="wsiflow demo",
        summary_rows=_result_rows(summary, stages),
        model_dir=_final_model(summary),
        inference_dirs=inference,
        evaluation_dir=Path(summary["infer"]["out"]) if "evaluate" in summary else None,
    )
