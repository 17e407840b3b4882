"""Patch-classifier training and prediction speed, and whether the input pipeline keeps up.

    .venv/bin/python benchmarks/training.py [--repeats 3] [--steps 15] [--batch 32]
        [--mixed-precision]

Generates a 6-slide CAMELYON16-format cohort (8192 px slides at 0.243 µm/px)
and tiles it at 0.5 µm/px into a 96 px and a 224 px JPEG patch store. For
each model (small_cnn and MobileNetV2 at 96 px, MobileNetV2 at 224 px,
trained from scratch as the demo does) it measures, in the same process:

- input: the training stream alone (balanced chunks, augmentation, the
  backbone's preprocessing, batching), patches/s;
- step limit: ``fit`` on batches of the same stream cached in memory, under
  the same MirroredStrategy: what training costs when input is free;
- end to end: ``fit`` reading the stream from the store, as ``wsiflow train``;
- predict: ``predict`` on in-memory batches.

and prints input / step limit (>= 2 means the pipeline has headroom) and end
to end / step limit (>= 0.9 means the input pipeline is not the bottleneck).
Medians over ``--repeats``.
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

MODELS = [("small_cnn", 96), ("mobilenetv2", 96), ("mobilenetv2", 224)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15, help="training steps per measurement")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--work", type=Path, default=None, help="keep the cohort/stores here")
    parser.add_argument(
        "--models",
        default=",".join(f"{b}:{px}" for b, px in MODELS),
        help="comma-separated BACKBONE:PX (default: all three)",
    )
    parser.add_argument(
        "--mixed-precision",
        action="store_true",
        help="float16 compute on GPUs, bfloat16 on CPUs (training.mixed_precision)",
    )
    args = parser.parse_args()

    from models.distribute import mixed_policy
    from models.train import distribution_strategy

    # Every visible GPU, else one CPU device; before anything starts TensorFlow's runtime.
    strategy = distribution_strategy(1)
    print(f"{strategy.num_replicas_in_sync} replica(s): {list(strategy.extended.worker_devices)}")
    if args.mixed_precision:
        import keras

        keras.mixed_precision.set_global_policy(mixed_policy())
        print(f"mixed precision: {keras.mixed_precision.global_policy().name}")
    work = args.work or Path(tempfile.mkdtemp(prefix="wsiflow-bench-train-"))
    try:
        stores = _stores(work)
        print(f"{'model':<18} {'input':>8} {'limit':>8} {'e2e':>8} {'predict':>8}"
              f" {'input/limit':>12} {'e2e/limit':>10}   (patches/s)")  # fmt: skip
        for item in args.models.split(","):
            backbone, px = item.split(":")[0], int(item.split(":")[1])
            row = [_measure(strategy, stores[px], backbone, args) for _ in range(args.repeats)]
            med = {k: statistics.median(r[k] for r in row) for k in row[0]}
            print(
                f"{backbone + ' ' + str(px):<18} {med['input']:>8,.0f} {med['limit']:>8,.1f} "
                f"{med['e2e']:>8,.1f} {med['predict']:>8,.1f} "
                f"{med['input'] / med['limit']:>12.1f} {med['e2e'] / med['limit']:>10.2f}",
                flush=True,
            )
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _stores(work: Path) -> dict[int, Path]:
    from pipeline.cluster import dask_client
    from pipeline.config import SyntheticConfig, TilingConfig
    from pipeline.synth.cohort import write_cohort
    from pipeline.tiling.driver import tile_slides

    cohort = write_cohort(
        work / "cohort", SyntheticConfig(slides=6, seed=0, width_px=8192, height_px=8192), workers=2
    )
    annotations = work / "annotations"
    annotations.mkdir(exist_ok=True)
    for xml in cohort.root.glob("*/lesion_annotations/*.xml"):
        shutil.copy(xml, annotations)
    slides = [cohort.root / r.image for r in cohort.slides]
    stores = {}
    with dask_client(workers=2) as client:
        for px in sorted({px for _, px in MODELS}):
            stores[px] = work / f"patches_{px}.zarr"
            results = tile_slides(
                client,
                slides,
                stores[px],
                TilingConfig(target_mpp=0.5, patch_px=px),
                annotations_dir=annotations,
            )
            tumor = sum(r.tumor_patches for r in results)
            total = sum(r.patches for r in results)
            print(f"{px} px store: {total:,} patches, {tumor:,} tumor, {len(results)} slides")
    return stores


def _measure(strategy, store: Path, backbone: str, args) -> dict[str, float]:
    import keras
    import numpy as np

    from models.classifier import BACKBONES, build_classifier, preprocess_fn
    from models.data import make_dataset, open_stores

    slides = open_stores([store])
    preprocess = preprocess_fn(BACKBONES[backbone].preprocessing)
    stream = make_dataset(
        slides, batch_size=args.batch, training=True, seed=1, preprocess=preprocess
    )
    n = args.steps * args.batch

    iterator = iter(stream)
    next(iterator)  # the shuffle buffer fills once per run, as in training
    started = time.perf_counter()
    for _ in range(args.steps * 4):
        next(iterator)
    input_rate = 4 * n / (time.perf_counter() - started)

    cached = stream.take(8).cache().repeat()
    with strategy.scope():
        model, _ = build_classifier(backbone, slides[0].patch_px)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss="binary_crossentropy",
            metrics=[keras.metrics.AUC(name="auc", num_thresholds=500)],
        )
    model.fit(cached, steps_per_epoch=3, epochs=1, verbose=0, shuffle=False)  # trace once
    limit = _fit_rate(model, cached, args.steps, n)
    e2e = _fit_rate(model, stream, args.steps, n)

    batch = np.concatenate([x for x, _ in cached.take(8).as_numpy_iterator()] * 2)
    model.predict(batch, batch_size=args.batch, verbose=0)
    started = time.perf_counter()
    model.predict(batch, batch_size=args.batch, verbose=0)
    predict = len(batch) / (time.perf_counter() - started)
    keras.backend.clear_session()
    return {"input": input_rate, "limit": limit, "e2e": e2e, "predict": predict}


def _fit_rate(model, dataset, steps: int, n: int) -> float:
    """Patches/s of ``fit`` from the end of its first step (the shuffle buffer has filled)."""
    import keras

    marks: list[float] = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            marks.append(time.perf_counter())

    model.fit(
        dataset, steps_per_epoch=steps + 1, epochs=1, verbose=0, shuffle=False, callbacks=[Clock()]
    )
    return n / (marks[-1] - marks[0])


if __name__ == "__main__":
    main()
