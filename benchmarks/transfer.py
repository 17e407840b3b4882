"""Transfer learning shown offline: pretrained on an easy cohort, fine-tuned on few slides.

    .venv/bin/python benchmarks/transfer.py --work runs/ [--seeds 0,1,2] [--labelled 4]

ImageNet weights cannot be downloaded here, so the source task is one
wsiflow makes itself: an ``easy``-difficulty cohort (24 slides of 8192 px,
its own seed), tiled and trained on with the demo's configuration. The
target is each seed's ``camelyon`` benchmark cohort (the one
``recipe.py --work`` made, reused from ``--work`` when there), with only
``--labelled`` tumor and as many normal training slides labelled (the rest
left out with ``training.exclude_slides``). Two arms train on those slides
with the same budget (the demo's epochs and steps): from scratch, and
fine-tuned from the source model (``training.weights: SOURCE_MODEL_DIR``:
the head first with the base frozen, then its top layers). Each infers the
12 test slides and is evaluated; the table gives validation AUC, slide AUC
and FROC (mean ± sd over seeds, and the paired difference) and the
training time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import yaml
from recipe import _mean_sd, _overridden, _wsiflow, baseline_config, paired_cells

SOURCE_SEED = 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="runs (and recipe.py's cohorts)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--labelled", type=int, default=4, help="tumor (and normal) slides")
    parser.add_argument("--size", type=int, default=8192, help="level-0 slide side, px")
    args = parser.parse_args()
    base = baseline_config()
    synthetic = base["slides"]["synthetic"]
    synthetic["width_px"] = synthetic["height_px"] = args.size
    source_model = _source_model(args.work / "transfer" / "source", base)
    record_path = args.work / "transfer" / "transfer.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    for seed in (int(s) for s in args.seeds.split(",")):
        folder = args.work / f"seed{seed}"
        cohort = folder / "cohort"
        store = folder / "patches.zarr"
        seed_base = _overridden(
            base, {"slides.synthetic.seed": seed, "slides.synthetic.slides": 36}
        )
        if not (cohort / "synth.json").is_file():
            _write(folder / "seed.yaml", seed_base)
            _wsiflow("synth", str(cohort), "--config", str(folder / "seed.yaml"))
        if not store.exists():
            _wsiflow(
                "tile", str(cohort / "training"), "--out", str(store), "--annotations",
                str(cohort / "training" / "lesion_annotations"), "--config", str(folder / "seed.yaml"),
            )  # fmt: skip
        excluded = _unlabelled(cohort, args.labelled)
        for arm, weights in (("scratch", "none"), ("pretrained", str(source_model))):
            if str(seed) in record.get(arm, {}):
                continue
            out = args.work / "transfer" / f"seed{seed}" / arm
            config = out.parent / f"{arm}.yaml"
            _write(
                config,
                _overridden(
                    seed_base,
                    {"training.exclude_slides": excluded, "training.weights": weights},
                ),
            )
            started = time.perf_counter()
            train = _wsiflow(
                "train", str(store), "--out", str(out / "model"), "--config", str(config)
            )
            seconds = time.perf_counter() - started
            _wsiflow(
                "infer", str(out / "model"), str(cohort / "testing" / "images"), "--out",
                str(out / "inference"), "--config", str(config),
            )  # fmt: skip
            evaluation = _wsiflow(
                "evaluate", str(out / "inference"), "--reference",
                str(cohort / "testing" / "reference.csv"), "--annotations",
                str(cohort / "testing" / "lesion_annotations"), "--slides",
                str(cohort / "testing" / "images"),
            )  # fmt: skip
            record.setdefault(arm, {})[str(seed)] = {
                "val_auc": train["val_auc"],
                "slide_auc": evaluation["slide_auc"],
                "froc": evaluation["froc"],
                "train_seconds": seconds,
                "train_slides": len(train["train_slides"]),
            }
            record_path.write_text(json.dumps(record, indent=1))
            print(
                f"seed {seed} {arm:<10} val AUC {train['val_auc']:.3f}  slide AUC "
                f"{evaluation['slide_auc']:.3f}  FROC {evaluation['froc']:.3f}  "
                f"train {seconds:.0f} s on {len(train['train_slides'])} slides",
                flush=True,
            )
    _print(record)


def _source_model(folder: Path, base: dict) -> Path:
    """The model of the source task: the demo's recipe on an ``easy`` cohort of its own."""
    model = folder / "model"
    if (model / "wsiflow_model.json").is_file():
        return model
    config = _overridden(
        base,
        {
            "slides.synthetic.difficulty": "easy",
            "slides.synthetic.slides": 24,
            "slides.synthetic.seed": SOURCE_SEED,
        },
    )
    _write(folder / "source.yaml", config)
    cohort, store = folder / "cohort", folder / "patches.zarr"
    if not (cohort / "synth.json").is_file():
        _wsiflow("synth", str(cohort), "--config", str(folder / "source.yaml"))
    _wsiflow(
        "tile", str(cohort / "training"), "--out", str(store), "--annotations",
        str(cohort / "training" / "lesion_annotations"), "--config", str(folder / "source.yaml"),
    )  # fmt: skip
    started = time.perf_counter()
    summary = _wsiflow(
        "train", str(store), "--out", str(model), "--config", str(folder / "source.yaml")
    )
    print(
        f"source model: val AUC {summary['val_auc']:.3f} on {len(summary['train_slides'])} "
        f"easy slides, {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return model


def _unlabelled(cohort: Path, labelled: int) -> list[str]:
    """Training slides left out: all but the first ``labelled`` tumor and normal ones."""
    left_out = []
    for label in ("tumor", "normal"):
        names = sorted(p.stem for p in (cohort / "training" / label).glob("*.tif"))
        if len(names) < labelled:
            sys.exit(f"{cohort}: only {len(names)} {label} training slides")
        left_out += names[labelled:]
    return left_out


def _write(path: Path, config: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _print(record: dict) -> None:
    scratch = record.get("scratch", {})
    print(f"\n{'arm':<11} {'seeds':>5} {'val AUC':>15} {'slide AUC':>15} {'vs scratch':>15} "
          f"{'FROC':>15} {'vs scratch':>15} {'train s':>8}")  # fmt: skip
    for arm, runs in record.items():
        seeds = sorted(runs, key=int)
        cells = [_mean_sd([runs[s]["val_auc"] for s in seeds]), *paired_cells(runs, scratch, seeds)]
        seconds = statistics.median(runs[s]["train_seconds"] for s in seeds)
        print(f"{arm:<11} {len(seeds):>5} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15} "
              f"{cells[3]:>15} {cells[4]:>15} {seconds:>8.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
