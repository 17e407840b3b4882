"""``camelyon_flow``: a CAMELYON16-layout folder end to end (tile, train, infer, evaluate).

The folder layout, real or generated (``wsiflow synth``)::

    ROOT/training/{tumor,normal}/*.tif     training slides
    ROOT/training/lesion_annotations/*.xml
    ROOT/testing/images/*.tif              test slides
    ROOT/testing/lesion_annotations/*.xml
    ROOT/testing/reference.csv             name,Tumor|Normal (evaluation needs it)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows import artifacts
from flows.evaluate import evaluate_flow
from flows.infer import infer_flow
from flows.mine import train_with_mining
from flows.runtime import load
from flows.slide_classifier import slide_classifier_flow
from flows.tile import tile_flow
from pipeline.inference.slide_classifier import describe
from pipeline.store.patch_store import location


@flow(name="camelyon", log_prints=True)
def camelyon_flow(
    root: str,
    out_dir: str,
    extra_slides: list[str] | None = None,
    config: str | None = None,
    settings: dict[str, Any] | None = None,
    store: str | None = None,
) -> dict[str, Any]:
    """Tile the training slides, train, infer the test slides (heatmaps) and evaluate them.

    When any step of the winners' recipe is on (``docs/recipe.md``), the
    first model also infers and is evaluated as the baseline
    (``OUT/inference_baseline``), for the two side by side. With
    ``mining.enabled``, the model is trained again on the hard
    negatives the first one mined (:mod:`flows.mine`). With
    ``slide_classifier.enabled``, a slide classifier fitted on
    out-of-fold heatmaps of the training slides (:mod:`flows.slide_classifier`)
    scores the test slides.

    Each stage is a subflow (its own Dask cluster where it maps over
    slides); every stage skips or serves from cache what an earlier run
    finished. ``extra_slides`` (e.g. real slides without a reference) are
    inferred into ``OUT/inference_real`` and not evaluated. The
    ``camelyon-summary`` artifact has the numbers and where the files are.
    The patch store is ``OUT/patches.zarr`` unless ``store`` names another
    path or an fsspec URL (``s3://bucket/cohort.zarr``).
    """
    logger = get_run_logger()
    cfg = load(config, settings)  # a bad config fails here, before any stage runs
    root_dir, out = Path(root), Path(out_dir)
    training, testing = root_dir / "training", root_dir / "testing"
    for needed in (training, testing / "images"):
        if not needed.is_dir():
            raise FileNotFoundError(f"{needed}: missing; {root_dir} needs the CAMELYON16 layout")
    seconds: dict[str, float] = {}
    summary: dict[str, Any] = {"flow": "camelyon", "root": str(root_dir), "out": str(out)}
    failures: list[dict[str, Any]] = []

    def stage(name: str, run: Any) -> Any:
        started = time.perf_counter()
        result = run()
        seconds[name] = round(time.perf_counter() - started, 2)
        summary[name] = result
        failures.extend({"stage": name, **f} for f in result.get("failures", []))
        return result

    store = location(store) if store else str(out / "patches.zarr")
    tiled = stage(
        "tile",
        lambda: tile_flow(
            [str(training)], store, str(training / "lesion_annotations"), config, settings
        ),
    )
    if not tiled["tumor_patches"]:
        raise ValueError(f"{store}: no tumor patches, so no classifier can be trained")
    model_dir = train_with_mining(store, str(out / "model"), config, settings, stage)
    test_settings = settings
    if cfg.slide_classifier.enabled:
        labelled = _labelled(tiled["per_slide"], training)
        stage(
            "slide_classifier",
            lambda: slide_classifier_flow(
                store, model_dir, labelled, str(out / "slide_classifier"), config, settings
            ),
        )
        test_settings = {**(settings or {}), "inference.slide_score": "classifier"}
    reference = testing / "reference.csv"
    runs = [("", model_dir, test_settings)]
    if _recipe(cfg):  # the first model as is, beside the recipe's result
        runs.append(("_baseline", str(out / "model"), {**(settings or {}), **BASELINE}))
    for suffix, model, run_settings in runs:
        inference = str(out / f"inference{suffix}")
        inferred = stage(
            f"infer{suffix}",
            lambda model=model, inference=inference, run_settings=run_settings: infer_flow(
                model, [str(testing / "images")], inference, config, run_settings
            ),
        )
        if inferred["done"] + inferred["skipped"] and reference.is_file():
            stage(
                f"evaluate{suffix}",
                lambda inference=inference: evaluate_flow(
                    inference,
                    str(reference),
                    str(testing / "lesion_annotations"),
                    str(testing / "images"),
                    config=config,
                    settings=settings,
                ),
            )
    if not reference.is_file():
        logger.warning("%s is missing: the test slides are not evaluated", reference)
    if extra_slides:
        stage(
            "infer_real",
            lambda: infer_flow(
                model_dir, extra_slides, str(out / "inference_real"), config, settings
            ),
        )
    summary.update(seconds=seconds, failures=failures)
    artifacts.summary_markdown("camelyon-summary", f"CAMELYON16 run {out}", summary_rows(summary))
    return summary


#: How the baseline infers: the first model's heatmap maximum, connected regions, no TTA.
BASELINE = {
    "inference.slide_score": "max",
    "inference.detection": "regions",
    "inference.tta": False,
}


def _recipe(cfg: Any) -> bool:
    """Whether any step of the winners' recipe changes the result from the baseline's."""
    return (
        cfg.mining.enabled
        or cfg.slide_classifier.enabled
        or cfg.inference.detection != "regions"
        or cfg.inference.tta
    )


def _labelled(per_slide: list[dict[str, Any]], training: Path) -> list[dict[str, Any]]:
    """The tiled training slides under ``tumor/`` or ``normal/``, labelled by that folder."""
    labelled = []
    for row in per_slide:
        if row["status"] == "failed":
            continue
        try:
            folder = Path(row["path"]).relative_to(training).parts[0].lower()
        except ValueError:
            continue
        if folder in ("tumor", "normal"):
            labelled.append(
                {"slide_id": row["slide_id"], "path": row["path"], "tumor": folder == "tumor"}
            )
    return labelled


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """What a user looks for after a run, and where the files are."""
    rows = []
    tile = summary.get("tile")
    if tile:
        rows.append((
            "patch store",
            f"{tile['slides']} slides, {tile['patches']:,} patches "
            f"({tile['tumor_patches']:,} tumor) in {tile['store']}",
        ))  # fmt: skip
    train = summary.get("retrain") or summary.get("train")
    mined = summary.get("mine")
    if mined:
        rows.append((
            "hard negatives",
            f"{mined['mined']:,} mined of {mined['candidates']:,} candidates by "
            f"{mined['model_dir']}",
        ))  # fmt: skip
    if train:
        rows.append((
            "model",
            f"{train['backbone']}, validation AUC {train['val_auc']:.4f} "
            f"(epoch {train['best_epoch']}) in {train['model_dir']}",
        ))  # fmt: skip
    classifier = summary.get("slide_classifier")
    if classifier:
        rows.append(("slide classifier", describe(classifier)))
    infer = summary.get("infer")
    if infer:
        rows.append(("test slides", f"{infer['slides']} slides, {infer['patches']:,} patches"))
        rows.append(("heatmaps", f"{infer['out']}/heatmaps (*_overlay.png)"))
    evaluation = summary.get("evaluate")
    if evaluation:
        baseline = summary.get("evaluate_baseline")
        for name, key in (("slide AUC", "slide_auc"), ("FROC", "froc")):
            text = artifacts.metric(evaluation[key])
            if baseline:  # the recipe's and the baseline's side by side
                text = f"{text} (baseline: {artifacts.metric(baseline[key])})"
            rows.append((name, text))
        rows.append(("curves", ", ".join(evaluation["files"].values())))
        if baseline:
            rows.append((
                "baseline",
                f"{summary['train']['model_dir']} alone: heatmap maximum, connected regions, "
                f"no TTA; in {summary['infer_baseline']['out']}",
            ))  # fmt: skip
    real = summary.get("infer_real")
    if real:
        scores = ", ".join(f"{k} {v:.3f}" for k, v in real["scores"].items())
        rows.append(("real slides", f"{real['out']} (scores: {scores})"))
    if summary.get("seconds"):
        rows.append((
            "time per stage",
            ", ".join(f"{k} {v:.0f} s" for k, v in summary["seconds"].items()),
        ))  # fmt: skip
    if summary.get("failures"):
        rows.append(("failures", "; ".join(f["reason"] for f in summary["failures"])))
    return rows
