"""Whole-slide inference speed: end to end against predict-only, in the same run.

    .venv/bin/python benchmarks/inference.py [--repeats 3] [--size 12288]

Generates one tumor slide (``--size`` px square at 0.243 µm/px, CAMELYON16's
level-0 resolution) and, for each model (small_cnn and MobileNetV2 at 96 px
and 0.5 µm/px, as the demo trains them; weights are random, which costs the
same), measures in one process:

- predict-only: the model's traced function on patches already in memory
  (uint8 batches of the inference batch size): the limit;
- read-only: the reader alone (patches read at level 0 and resampled to the
  model's µm/px, as tiling does), one thread;
- end to end: plan (tissue, grid), patches streamed through the bounded
  queue into prediction, stitching, detections and every output file, as a
  Dask worker runs them for ``wsiflow infer`` (no Dask scheduling around it;
  ``--dask`` adds a run through ``infer_slides`` on a LocalCluster for
  reference).

Prints e2e / predict-only (the target is >= 0.90), stream / predict-only
(the same without the per-slide plan and output writing), the bound the
machine sets when reader and model share its cores (model on all ``C``
cores at P patches/s, reader at R patches/s on one: at best
``1 / (1 + P / (C R))`` of P; on a GPU the model leaves the cores to the
reader), and the seconds per cm² of tissue at 20x. Medians over ``--repeats``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

MODELS = [("small_cnn", 96), ("mobilenetv2", 96)]
PATCH_MPP = 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=12288, help="slide side in pixels")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dask", action="store_true", help="also time infer_slides on Dask")
    parser.add_argument("--work", type=Path, default=None, help="keep the slide here")
    parser.add_argument("--models", default=",".join(f"{b}:{px}" for b, px in MODELS))
    args = parser.parse_args()

    from models.predict import configure_threads

    configure_threads(None)
    work = args.work or Path(tempfile.mkdtemp(prefix="wsiflow-bench-infer-"))
    try:
        slide = _slide(work, args.size)
        print(
            f"{'model':<16} {'patches':>8} {'predict':>8} {'read':>8} {'e2e':>8}"
            f" {'e2e/predict':>12} {'stream/predict':>15} {'bound':>6} {'plan s':>7} {'write s':>7}"
            f" {'s/cm²':>7}" + (f" {'dask':>8}" if args.dask else "")
            + "   (patches/s)"
        )  # fmt: skip
        for item in args.models.split(","):
            backbone, px = item.split(":")[0], int(item.split(":")[1])
            model_dir = _model_dir(work, backbone, px)
            rows = [_measure(slide, model_dir, args) for _ in range(args.repeats)]
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            patch_cm = px * PATCH_MPP * 1e-4
            line = (
                f"{backbone + ' ' + str(px):<16} {med['patches']:>8,.0f} {med['predict']:>8,.0f} "
                f"{med['read']:>8,.0f} {med['e2e']:>8,.0f} {med['e2e'] / med['predict']:>12.2f} "
                f"{med['stream'] / med['predict']:>15.2f} {med['bound']:>6.2f} "
                f"{med['plan_s']:>7.2f} {med['write_s']:>7.2f} "
                f"{1 / (med['e2e'] * patch_cm**2):>7,.0f}"
            )
            if args.dask:
                line += f" {_dask_rate(slide, model_dir, work, args):>8,.0f}"
            print(line, flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _slide(work: Path, size: int) -> Path:
    from pipeline.config import SyntheticConfig
    from pipeline.synth.cohort import SlideSpec, write_slide

    params = SyntheticConfig(slides=4, seed=0, width_px=size, height_px=size)
    spec = SlideSpec("tumor_bench", "training", "Tumor", seed=11)
    path = spec.image_path(work)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        write_slide(work, spec, params)
        print(f"slide {path.name}: {size} x {size} px in {time.perf_counter() - started:.0f} s")
    return path


def _model_dir(work: Path, backbone: str, px: int) -> Path:
    """An untrained classifier saved as a finished model directory (same cost as a trained one)."""
    from models.classifier import BACKBONES, build_classifier
    from models.saved import METADATA_FILE, MODEL_FILE, write_json_atomic

    out = work / f"model_{backbone}_{px}"
    out.mkdir(exist_ok=True)
    model, _ = build_classifier(backbone, px)
    model.save(out / MODEL_FILE)
    metadata = {
        "complete": True,
        "backbone": backbone,
        "patch_px": px,
        "patch_mpp": PATCH_MPP,
        "preprocessing": BACKBONES[backbone].preprocessing,
        "config": {"tiling": {"tissue_mpp": 8.0, "min_tissue_fraction": 0.5}},
        "fingerprint": f"bench-{backbone}-{px}",
    }
    write_json_atomic(out / METADATA_FILE, metadata)
    return out


def _measure(slide: Path, model_dir: Path, args) -> dict[str, float]:
    import numpy as np

    from models.predict import cached_predictor
    from pipeline.config import InferenceConfig
    from pipeline.inference.driver import _Stitching, _write_slide
    from pipeline.inference.heatmap import HeatmapAccumulator
    from pipeline.inference.predict import Block, model_spec, plan_inference, predict_streamed
    from pipeline.slides.patches import read_patch
    from pipeline.slides.reader import open_slide

    predictor = cached_predictor(model_dir, batch_size=args.batch)
    spec = model_spec(model_dir)
    config = InferenceConfig(batch_size=args.batch)
    plan = plan_inference(str(slide), spec, None)
    res = plan.resolution
    n = len(plan.level_xy)

    # Read-only: the reader thread's work alone, over every patch of the slide.
    sample = plan.level_xy
    with open_slide(slide) as reader:
        started = time.perf_counter()
        patches = np.stack(
            [
                read_patch(reader, res.level, int(x), int(y), res.read_px, res.patch_px)
                for x, y in sample
            ]
        )
        read = len(sample) / (time.perf_counter() - started)

    # Predict-only: the same patches from memory (warm), as many as end to end predicts.
    predictor(patches[: args.batch])
    started = time.perf_counter()
    predictor(patches)
    predict = len(patches) / (time.perf_counter() - started)

    # End to end: plan, stream, stitch, detect, write.
    out = slide.parent.parent / "out"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    plan = plan_inference(str(slide), spec, None)
    planned = time.perf_counter()
    accumulator = HeatmapAccumulator(plan.grid)
    block = Block(
        plan.path, str(model_dir), res.level, plan.level_xy, res.read_px, res.patch_px,
        args.batch, config.queue_batches,
    )  # fmt: skip
    probabilities = predict_streamed(predictor, block)
    streamed = time.perf_counter()
    accumulator.add(plan.grid_ij, probabilities)
    _write_slide(out, _Stitching(plan, accumulator), spec, config, streamed - started)
    done = time.perf_counter()
    e2e = n / (done - started)
    cores = os.cpu_count() or 1
    return {
        "bound": 1 / (1 + predict / (cores * read)),
        "patches": n,
        "predict": predict,
        "read": read,
        "e2e": e2e,
        "stream": n / (streamed - planned),
        "plan_s": planned - started,
        "write_s": done - streamed,
    }


def _dask_rate(slide: Path, model_dir: Path, work: Path, args) -> float:
    """``infer_slides`` through a one-worker LocalCluster (model loaded before timing)."""
    from pipeline.cluster import dask_client
    from pipeline.config import InferenceConfig
    from pipeline.inference.driver import infer_slides

    config = InferenceConfig(batch_size=args.batch)
    with dask_client(workers=1) as client:
        # Warm: the worker imports TensorFlow and loads the model on the first run.
        infer_slides(client, model_dir, [slide], work / "dask-warm", config, overwrite=True)
        started = time.perf_counter()
        results = infer_slides(client, model_dir, [slide], work / "dask", config, overwrite=True)
        seconds = time.perf_counter() - started
    return results[0].patches / seconds


if __name__ == "__main__":
    main()
