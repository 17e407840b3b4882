"""Commands about trained models on slides: infer, evaluate, export."""

from __future__ import annotations

import os
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
    output_lock,
    status_cell,
    stop_exit_code,
    stop_on_sigterm,
    stopped_summary,
)
from pipeline.errors import ConfigError, WsiflowError

TtaOption = Annotated[
    bool | None,
    typer.Option(
        "--tta/--no-tta",
        help="Test-time augmentation: the mean over each patch's 8 flips and rotations "
        "(8x the model's time).",
    ),
]


@app.command()
def infer(
    model: Annotated[Path, typer.Argument(help="A model directory written by `wsiflow train`.")],
    slides: SlidesArgument,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (heatmaps, detections, scores).")
    ],
    stride: Annotated[
        int | None,
        typer.Option("--stride", help="Grid step in patch pixels (< patch size: overlap)."),
    ] = None,
    slide_mpp: SlideMppOption = None,
    threshold: Annotated[
        float | None, typer.Option("--threshold", help="Heatmap probability for detections.")
    ] = None,
    detection: Annotated[
        str | None,
        typer.Option(
            "--detection",
            help="regions (one per connected region) or maxima (local maxima at least "
            "--min-distance-um apart).",
        ),
    ] = None,
    min_distance_um: Annotated[
        float | None,
        typer.Option("--min-distance-um", help="maxima: closest two detections, in µm."),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Patches per prediction batch.")
    ] = None,
    slide_score: Annotated[
        str | None,
        typer.Option(
            "--slide-score",
            help="max (the heatmap's highest cell) or classifier (`wsiflow slide-classifier`).",
        ),
    ] = None,
    tta: TtaOption = None,
    scheduler: SchedulerOption = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", "-w", help="Local worker processes (default 1; one per GPU)."),
    ] = None,
    export: Annotated[
        list[str] | None,
        typer.Option(
            "--export",
            help="Then export the complete slides into OUT/export: geojson, asap or tiff; "
            "repeat (regions at the detection threshold; `wsiflow export` for more).",
        ),
    ] = None,
    overwrite: RedoOption = False,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Predict tumor heatmaps, lesion detections and slide scores for whole slides.

    Slides complete in --out for the same slide, model and settings are
    skipped; a slide that fails is reported and the others go on.
    """
    from pipeline.export.driver import check_options
    from pipeline.export.regions import DEFAULT_TOLERANCE_UM
    from pipeline.slides.reader import find_slides

    reporter = Reporter(as_json)
    try:
        cfg = _load(
            config,
            {
                "inference.stride_px": stride,
                "inference.slide_mpp": slide_mpp,
                "inference.detection_threshold": threshold,
                "inference.detection": detection,
                "inference.detection_min_distance_um": min_distance_um,
                "inference.batch_size": batch_size,
                "inference.tta": tta,
                "inference.slide_score": slide_score,
                "inference.workers": workers,
                "orchestration.scheduler": scheduler,
            },
        )
        if cfg.orchestration.scheduler is None:
            _check_workers(reporter, cfg.inference.workers)
        export_formats = list(dict.fromkeys(export or []))
        if export_formats:
            check_options(export_formats, [cfg.inference.detection_threshold], DEFAULT_TOLERANCE_UM)
    except ConfigError as exc:
        _fail_usage(reporter, exc, "infer")
    paths = find_slides(slides)
    if not paths:
        _fail_usage(
            reporter, ValueError(f"no slides found in {', '.join(map(str, slides))}"), "infer"
        )
    try:
        summary = run_infer(reporter, model, paths, out, cfg, overwrite=overwrite)
    except WsiflowError as exc:  # the model directory: named
        _fail_data(reporter, exc, "infer")
    if summary.get("interrupted"):
        reporter.finish(summary, exit_code=summary.pop("exit_code"))
    if export_formats:
        try:
            exported = run_export(
                reporter,
                out,
                out / "export",
                export_formats,
                [cfg.inference.detection_threshold],
                DEFAULT_TOLERANCE_UM,
                None,
            )
        except WsiflowError as exc:
            _fail_data(reporter, exc, "infer")
        summary["export"] = {k: exported[k] for k in ("out", "failed")}
        summary["ok"] = summary["ok"] and exported["ok"]
    reporter.finish(summary, exit_code=0 if summary["ok"] else 1)


def run_infer(
    reporter: Reporter, model: Path, paths: list[Path], out: Path, cfg, *, overwrite: bool
) -> dict[str, Any]:
    """Infer ``paths`` with a progress bar and a per-slide table; return the summary.

    Raises :class:`WsiflowError` for an unusable model before any slide is read.
    """
    from pipeline.cluster import dask_client, silence_logging
    from pipeline.inference.driver import infer_slides, summarize
    from pipeline.inference.predict import model_spec

    # A missing or unfinished model (or slide classifier) fails here, before a cluster starts.
    model_spec(model, slide_score=cfg.inference.slide_score)
    started = time.perf_counter()
    inference = cfg.inference
    n_workers = inference.workers or 1
    tf_threads = max(1, (os.cpu_count() or 1) // n_workers)
    finished: list = []
    try:
        with (
            stop_on_sigterm(),
            output_lock(reporter, out, "inference"),
            reporter.slide_progress(len(paths)) as bars,
            dask_client(
                cfg.orchestration.scheduler, workers=n_workers, threads_per_worker=1
            ) as client,
        ):

            def on_slide(result) -> None:
                finished.append(result)
                bars.finished(result)

            results = infer_slides(
                client,
                model,
                paths,
                out,
                inference,
                overwrite=overwrite,
                tf_threads=tf_threads,
                on_planned=bars.planned,
                on_patches=bars.advanced,
                on_slide=on_slide,
            )
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
        silence_logging()
        return stopped_summary(
            reporter, "infer", stop_exit_code(exc), len(paths), finished, out=str(out)
        )
    seconds = time.perf_counter() - started
    table = Table(title=f"Inference {out}")
    for column in ("slide", "status", "patches", "score", "detections", "s"):
        table.add_column(column, no_wrap=column == "slide")
    for r in results:
        table.add_row(
            r.slide_id,
            status_cell(r.status),
            str(r.patches),
            "-" if r.score is None else f"{r.score:.3f}",
            str(r.detections),
            f"{r.seconds:.1f}",
        )
    reporter.console.print(table)
    for r in results:
        for warning in r.warnings:
            reporter.warn(warning)
    summary = summarize(results, out, model)
    reporter.console.print(
        f"{summary['patches_predicted']:,} patches predicted in {seconds:.1f} s; "
        f"heatmaps in {out / 'heatmaps'}, detections in {out / 'detections'}, "
        f"slide scores in {out / 'scores.csv'}"
    )
    return {
        "command": "infer",
        "ok": not summary["failures"] and bool(results),
        **summary,
        "seconds": round(seconds, 2),
    }


@app.command()
def evaluate(
    results: Annotated[
        Path,
        typer.Argument(
            help="An output folder of `wsiflow infer`, or a folder of <slide>.csv detections "
            "(Confidence,X,Y) as the organisers' script reads."
        ),
    ],
    reference: Annotated[
        Path,
        typer.Option(
            "--reference", "-r", help="CAMELYON16 reference.csv (name,Tumor|Normal[,...])."
        ),
    ],
    annotations: Annotated[
        Path | None,
        typer.Option(
            "--annotations", "-a", help="Folder of <slide>.xml/.geojson lesion annotations."
        ),
    ] = None,
    slides_dir: Annotated[
        Path | None,
        typer.Option("--slides", "-s", help="Folder with the slides (for size and µm/px)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Where to write the report (default: RESULTS)."),
    ] = None,
    masks: Annotated[
        Path | None,
        typer.Option(
            "--masks", help="Folder of CAMELYON16 <slide>_Mask.tif (instead of annotations)."
        ),
    ] = None,
    rules: Annotated[
        str | None,
        typer.Option(
            "--rules",
            help="official (default: the organisers' script, bit for bit) or corrected.",
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude", help="Leave a slide out (any case); repeat. E.g. Test_049, Test_114."
        ),
    ] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Slide-level ROC AUC and lesion-level FROC, as the CAMELYON16 evaluation script."""
    from pipeline.evaluation.evaluate import needs_slides

    reporter = Reporter(as_json)
    try:
        cfg = _load(config, {"evaluation.rules": rules})
        folders = [("--annotations", annotations), ("--slides", slides_dir), ("--masks", masks)]
        for name, path in folders:
            if path is not None and not path.is_dir():
                raise ConfigError(name, [(str(path), "no such folder", None)])
        if masks is None and annotations is None:
            raise ConfigError(
                "--annotations", [("", "give --annotations or --masks for the tumor", None)]
            )
        why = needs_slides(cfg.evaluation, masks)
        if why and slides_dir is None:
            raise ConfigError("--slides", [("", f"needed: {why}", None)])
        if not reference.is_file():
            raise ConfigError("--reference", [(str(reference), "no such file", None)])
    except ConfigError as exc:
        _fail_usage(reporter, exc, "evaluate")
    try:
        summary = run_evaluate(
            reporter,
            results,
            reference,
            annotations,
            slides_dir,
            cfg,
            out=out,
            masks=masks,
            exclude=tuple(exclude or ()),
        )
    except (WsiflowError, ValueError) as exc:
        _fail_data(reporter, exc, "evaluate")
    reporter.finish(summary)


def run_evaluate(
    reporter: Reporter,
    results: Path,
    reference: Path,
    annotations: Path | None,
    slides_dir: Path | None,
    cfg,
    *,
    out: Path | None = None,
    masks: Path | None = None,
    exclude: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Evaluate and print the metrics; return the summary (raises on bad inputs)."""
    from pipeline.config import annotation_groups
    from pipeline.evaluation.evaluate import evaluate as run

    evaluation = run(
        results,
        reference,
        annotations,
        slides_dir,
        cfg.evaluation,
        out_dir=out,
        masks_dir=masks,
        exclude=exclude,
        groups=annotation_groups(cfg.tiling),
    )
    report = evaluation.report
    table = Table(title=f"CAMELYON16 evaluation of {results}")
    for column in ("slide", "tumor", "score", "lesions", "found", "ITCs", "FPs"):
        table.add_column(column, no_wrap=column == "slide")
    for row in report["per_slide"]:
        table.add_row(
            row["slide"],
            "yes" if row["tumor"] else "no",
            "-" if row["score"] is None else f"{row['score']:.3f}",
            str(row["lesions"]),
            str(row["lesions_found"]),
            str(row["itcs"]),
            str(row["false_positives"]),
        )
    reporter.console.print(table)
    if report["slide_auc"] is not None:
        reporter.console.print(
            f"slide AUC {report['slide_auc']:.4f} ({report['tumor_slides']} tumor, "
            f"{report['normal_slides']} normal slides)"
        )
    if report["froc"] is not None:
        points = ", ".join(
            f"{s:.2f}@{r:g}"
            for r, s in zip(report["froc_fp_rates"], report["froc_sensitivities"], strict=True)
        )
        reporter.console.print(
            f"FROC {report['froc']:.4f} (sensitivity@FPs/slide: {points}; "
            f"{report['lesions']} lesions, {report['isolated_tumor_cells']} ITCs; "
            f"{report['rules']} rules)"
        )
    if report["excluded"]:
        reporter.console.print("left out: " + escape(", ".join(report["excluded"])))
    if report["excluded_not_in_reference"]:
        reporter.warn(
            "not in the reference, so not left out: "
            + ", ".join(report["excluded_not_in_reference"])
        )
    for warning in report["warnings"]:
        reporter.warn(warning)
    for metric, reason in report["undefined"].items():
        reporter.errors.print(f"[yellow]{metric} undefined:[/yellow] {escape(reason)}")
    if report["not_evaluated"]:
        reporter.errors.print(
            "[yellow]not evaluated (no results):[/yellow] "
            + escape(", ".join(report["not_evaluated"]))
        )
    reporter.console.print("wrote " + ", ".join(str(path) for path in evaluation.files.values()))
    return {
        "command": "evaluate",
        "ok": True,
        **{k: v for k, v in report.items() if k not in ("roc_curve", "froc_curve")},
    }


@app.command()
def export(
    results: Annotated[Path, typer.Argument(help="An output folder of `wsiflow infer`.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output folder (default: RESULTS/export)."),
    ] = None,
    formats: Annotated[
        list[str] | None,
        typer.Option(
            "--format", "-f", help="geojson (QuPath), asap (XML) or tiff (heatmap); repeat."
        ),
    ] = None,
    thresholds: Annotated[
        list[float] | None,
        typer.Option("--threshold", "-t", help="Probability outlining tumor regions; repeat."),
    ] = None,
    tolerance: Annotated[
        float | None,
        typer.Option(
            "--tolerance-um", help="How far simplifying may move an outline (default 5 µm)."
        ),
    ] = None,
    slides: Annotated[
        list[str] | None, typer.Option("--slide", help="Export only this slide id; repeat.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Tumor regions, detections and heatmaps as files QuPath and ASAP open.

    Default: every format, regions at probability 0.5, for every complete slide.
    """
    from pipeline.export.driver import FORMATS, check_options
    from pipeline.export.regions import DEFAULT_TOLERANCE_UM

    reporter = Reporter(as_json)
    tolerance = DEFAULT_TOLERANCE_UM if tolerance is None else tolerance
    chosen = list(dict.fromkeys(formats or FORMATS))
    levels = list(dict.fromkeys(thresholds or [0.5]))
    try:
        check_options(chosen, levels, tolerance)  # before the output folder is made
        if not results.is_dir():
            raise ConfigError("RESULTS", [(str(results), "no such folder", None)])
    except ConfigError as exc:
        _fail_usage(reporter, exc, "export")
    out = out if out is not None else results / "export"
    try:
        summary = run_export(reporter, results, out, chosen, levels, tolerance, slides)
    except WsiflowError as exc:
        _fail_data(reporter, exc, "export")
    reporter.finish(summary, exit_code=0 if summary["ok"] else 1)


def run_export(
    reporter: Reporter,
    results: Path,
    out: Path,
    formats: list[str],
    thresholds: list[float],
    tolerance: float,
    slides: list[str] | None,
) -> dict[str, Any]:
    """Export with a per-slide table; return the summary (``wsiflow export``, ``infer --export``).

    Raises :class:`WsiflowError` when ``results`` is not an inference folder.
    """
    from pipeline.export import export_results

    table = Table(title=f"export of {results}")
    for column in ("slide", "status", "regions", "detections"):
        table.add_column(column, no_wrap=column == "slide")

    def on_slide(result) -> None:
        if result.status == "failed":
            reporter.errors.print(f"[red]failed:[/red] {escape(result.reason)}")
        regions = ", ".join(f"{n} at {t}" for t, n in result.regions.items())
        table.add_row(result.slide_id, result.status, regions or "-", str(result.detections))

    with output_lock(reporter, out, "export"):
        exported = export_results(
            results,
            out,
            formats=formats,
            thresholds=thresholds,
            tolerance_um=tolerance,
            slides=slides,
            on_slide=on_slide,
        )
    reporter.console.print(table)
    failed = [r.slide_id for r in exported if r.status == "failed"]
    reporter.console.print(f"wrote {sum(len(r.files) for r in exported)} files to {out}")
    return {
        "command": "export",
        "ok": not failed,
        "out": str(out),
        "slides": {
            r.slide_id: {
                "status": r.status,
                "files": list(r.files),
                "regions": r.regions,
                "detections": r.detections,
                "reason": r.reason,
            }
            for r in exported
        },
        "failed": failed,
    }


@app.command()
def predict(
    model: Annotated[Path, typer.Argument(help="A model directory written by `wsiflow train`.")],
    images: Annotated[
        list[Path],
        typer.Argument(help="Patch images (PNG, JPEG, TIFF...) and folders of them."),
    ],
    resize: Annotated[
        bool,
        typer.Option("--resize", help="Resample images that are not the model's patch size."),
    ] = False,
    threshold: Annotated[
        float, typer.Option("--threshold", min=0.0, max=1.0, help="Probability called tumor.")
    ] = 0.5,
    tta: TtaOption = None,
    as_json: JsonOption = False,
) -> None:
    """Tumor probability of single patch images, as fastai's learn.predict.

    Each image must be the model's patch size (or --resize); a bad image is
    one line naming it and the reason, and the others are predicted.
    """
    from pipeline.images import find_images
    from pipeline.inference.single import predict_images

    reporter = Reporter(as_json)
    missing = [(str(p), "no such file or folder", None) for p in images if not p.exists()]
    if missing:
        _fail_usage(reporter, ConfigError("IMAGE_OR_DIR", missing), "predict")
    paths = find_images(images)
    if not paths:
        _fail_usage(reporter, ValueError(f"no images in {', '.join(map(str, images))}"), "predict")
    try:
        results = predict_images(model, paths, resize=resize, tta=bool(tta))
    except WsiflowError as exc:  # the model directory
        _fail_data(reporter, exc, "predict")
    table = Table(title=f"{model}: tumor probability")
    for column in ("image", "probability", "class"):
        table.add_column(column, no_wrap=column == "image")
    for r in results:
        if r.ok:
            label = "tumor" if r.probability >= threshold else "normal"
            table.add_row(escape(r.path), f"{r.probability:.4f}", label)
        else:
            table.add_row(escape(r.path), "-", "[red]failed[/red]")
            reporter.errors.print(f"[red]failed:[/red] {escape(r.path)}: {escape(r.reason)}")
        for warning in r.warnings:
            reporter.warn(f"{r.path}: {warning}")
    reporter.console.print(table)
    failed = [r.path for r in results if not r.ok]
    reporter.finish(
        {
            "command": "predict",
            "ok": not failed,
            "threshold": threshold,
            "images": [
                {
                    "path": r.path,
                    "probability": r.probability,
                    "tumor": None if r.probability is None else r.probability >= threshold,
                    "reason": r.reason,
                    "warnings": r.warnings,
                }
                for r in results
            ],
            "failed": failed,
        },
        exit_code=1 if failed else 0,
    )
