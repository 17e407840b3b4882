"""The winning recipe's ablation, and the baseline's calibration, on ``camelyon`` cohorts.

    .venv/bin/python benchmarks/recipe.py --ablation --work runs/ [--seeds 0,1,2]
    .venv/bin/python benchmarks/recipe.py [--seeds 0,1,2] [--test-slides 12] [--quick]

``--ablation``: for each seed, one ``camelyon``-difficulty cohort and patch
store (reused from ``--work`` when there), then the ``camelyon`` Prefect
flow once per variant: the baseline (the demo's configuration), each step
of the recipe added alone (hard-negative mining, detection by local maxima,
the slide classifier on out-of-fold heatmaps, test-time augmentation, Macenko
stain normalisation) and the steps together. Every variant starts from the baseline's first model
(copied: the flow reuses a finished model trained on the same store with the
same settings), so its time is what the step adds. Prints slide AUC and
FROC per variant, mean and standard deviation over the seeds, the mean
paired difference from the baseline with its standard deviation, and the
median minutes per seed of the variant's own stages (not the shared tiling,
not the baseline's inference the flow runs beside a recipe). ``--analyse DIR`` with ``--ablation`` prints the
table again from ``DIR/ablation.json``. ``--held-out N`` also scores each
variant's final model (and slide classifier) on N more slides per seed, all
of them test slides, from a second cohort of the same generator (seed 1000 +
the seed), and prints that table too: 12 test slides move the AUC by 0.028
per swapped tumor-normal pair. ``--training-seeds 0,1,2`` trains each
cohort's variants again with other ``training.seed`` values (another
initialisation and patch order on the same slides; runs ``<seed>/t<N>``,
folders ``ablation_t<N>``): how much of the spread is the training's own.
For each variant with a slide classifier, its held-out slide AUC gain is
then split in two: its model's (both runs' slides scored by the heatmap
maximum) and its classifier's (the classifier's score against its own
model's maxima). ``--set KEY=VALUE`` (repeatable) changes the baseline's configuration, and so
every variant's, by a dotted key (e.g. ``training.fine_tune_epochs=13``: a
longer budget); use a fresh ``--work`` for each setting.

For each seed it generates a ``camelyon``-difficulty cohort (a third of the
slides for testing: ``--test-slides`` of them) and runs ``wsiflow demo`` on it
with the demo's own configuration (``configs/demo.yaml``: its backbone,
training budget, inference and detection) except the cohort's size and
seed, and without the real slides. It prints each run's slide AUC and FROC
(the organisers' rules), their mean and standard deviation over the seeds,
the time per stage, and whether the means lie in the calibration band the
cohort is meant for (slide AUC 0.75-0.95, FROC 0.35-0.75: well below
saturation, so a better method can show a gain of ~0.05).

``--quick``: 12 slides of 6144 px, one seed: a check that the benchmark
runs (minutes), not a calibration. ``--analyse DIR``: only the tables, from
the runs a previous ``--work DIR`` kept.

Last, what fools the baseline: on the normal test slides, for each kind of
mimic and artefact, on how many slides the heatmap's maximum inside that
feature's bounding box reaches 0.5 (a slide-level false alarm), and the
median of those maxima; "plain node" is everything outside every feature.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
WSIFLOW = str(Path(sys.executable).parent / "wsiflow")
AUC_BAND = (0.75, 0.95)
FROC_BAND = (0.35, 0.75)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated cohort seeds")
    parser.add_argument("--test-slides", type=int, default=12, help="test slides per cohort")
    parser.add_argument("--size", type=int, default=8192, help="level-0 slide side, px")
    parser.add_argument("--quick", action="store_true", help="a minutes-long smoke run")
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here")
    parser.add_argument("--analyse", type=Path, default=None, help="tables of kept runs only")
    parser.add_argument("--ablation", action="store_true", help="the recipe's ablation")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="ablation variants")
    parser.add_argument(
        "--held-out",
        type=int,
        default=0,
        help="ablation: also score each variant's models on this many more slides per seed",
    )
    parser.add_argument(
        "--training-seeds",
        default="0",
        help="ablation: training.seed values per cohort; each is a run (another start, same slides)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="ablation: a dotted config key of the baseline (and every variant), e.g. "
        "training.fine_tune_epochs=13; repeatable",
    )
    args = parser.parse_args()
    if args.ablation:
        _ablation(args)
        return
    if args.analyse:
        _print_fooled_by(sorted(args.analyse.glob("seed*/inference")))
        return

    config = baseline_config()
    seeds = [int(s) for s in args.seeds.split(",")]
    synthetic = config["slides"]["synthetic"]
    synthetic["slides"] = 3 * args.test_slides
    synthetic["width_px"] = synthetic["height_px"] = args.size
    config["slides"]["extra"] = []
    if args.quick:
        seeds = seeds[:1]
        # 4 test slides; 4 training tumor slides (some hold only ITCs); 1.5 mm slides still
        # hold micro-metastases (on 1 mm ones every lesion shrinks to an ITC).
        synthetic["slides"] = 12
        synthetic["width_px"] = synthetic["height_px"] = 6144
    work = args.work or Path(tempfile.mkdtemp(prefix="wsiflow-bench-recipe-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in seeds:
        synthetic["seed"] = seed
        path = work / f"seed{seed}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        started = time.perf_counter()
        result = subprocess.run(
            [WSIFLOW, "demo", "--config", str(path), "--out", str(work / f"seed{seed}"), "--json"],
            capture_output=True,
            text=True,
            check=False,
        )
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            sys.exit(f"seed {seed}: wsiflow demo failed:\n{result.stderr[-3000:]}")
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        runs.append((seed, summary, seconds))
        evaluation = summary["evaluate"]
        print(
            f"seed {seed}: slide AUC {_num(evaluation['slide_auc'])}  FROC {_num(evaluation['froc'])}"
            f"  val AUC {summary['train']['val_auc']:.3f}  {summary['tile']['patches']} patches"
            f"  {seconds / 60:.1f} min  stages (s): "
            + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items()),
            flush=True,
        )
    # None: undefined on a cohort (e.g. FROC with no lesion above the ITC size).
    aucs = [
        s["evaluate"]["slide_auc"] for _, s, _ in runs if s["evaluate"]["slide_auc"] is not None
    ]
    frocs = [s["evaluate"]["froc"] for _, s, _ in runs if s["evaluate"]["froc"] is not None]
    minutes = [t / 60 for _, _, t in runs]
    print(f"\n{len(runs)} seed(s), {synthetic['slides']} slides of {synthetic['width_px']} px each")
    for name, values, band in (("slide AUC", aucs, AUC_BAND), ("FROC", frocs, FROC_BAND)):
        if not values:
            print(f"{name:<10} undefined on every seed")
            continue
        mean = statistics.fmean(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        verdict = "in" if band[0] <= mean <= band[1] else "OUTSIDE"
        print(f"{name:<10} mean {mean:.3f}  sd {sd:.3f}  range {min(values):.3f}-{max(values):.3f}"
              f"  ({verdict} the band {band[0]}-{band[1]})")  # fmt: skip
    print(f"time       median {statistics.median(minutes):.1f} min per seed "
          f"(range {min(minutes):.1f}-{max(minutes):.1f}) on {_cores()} cores; runs in {work}")  # fmt: skip
    _print_fooled_by([work / f"seed{seed}" / "inference" for seed, _, _ in runs])


#: The baseline: the demo's configuration without any step of the recipe.
BASELINE: dict[str, object] = {
    "training.stain_normalization": "none",
    "mining.enabled": False,
    "inference.detection": "regions",
    "inference.slide_score": "max",
    "inference.tta": False,
    "slide_classifier.enabled": False,
    "slide_classifier.folds": 3,
}

#: Ablation variants: dotted config overrides on the baseline.
VARIANTS: dict[str, dict[str, object]] = {
    "baseline": {},
    "hard negatives": {"mining.enabled": True},
    "maxima": {"inference.detection": "maxima"},
    "slide classifier": {"slide_classifier.enabled": True},
    # On the main model's own heatmaps of its training slides (in-sample, and said so).
    "classifier in-sample": {"slide_classifier.enabled": True, "slide_classifier.folds": 1},
    "tta": {"inference.tta": True},
    "macenko": {"training.stain_normalization": "macenko"},
    "reinhard": {"training.stain_normalization": "reinhard"},
    "all but tta": {
        "mining.enabled": True,
        "inference.detection": "maxima",
        "slide_classifier.enabled": True,
    },
    # The two steps that helped alone, together (measured after the others).
    "mining + maxima": {"mining.enabled": True, "inference.detection": "maxima"},
    # With the classifier on the model's own heatmaps (measured after it helped alone).
    "mining + maxima + classifier in-sample": {
        "mining.enabled": True,
        "inference.detection": "maxima",
        "slide_classifier.enabled": True,
        "slide_classifier.folds": 1,
    },
    # configs/demo.yaml's recipe: the above with TTA.
    "demo recipe": {
        "mining.enabled": True,
        "inference.detection": "maxima",
        "slide_classifier.enabled": True,
        "slide_classifier.folds": 1,
        "inference.tta": True,
    },
    # Mining + maxima + classifier in-sample, its second training from the first model's
    # weights with every layer open (mining.retrain: continue; measured after that variant's
    # second model came out close to its first).
    "continued mining + maxima + classifier in-sample": {
        "mining.enabled": True,
        "mining.retrain": "continue",
        "inference.detection": "maxima",
        "slide_classifier.enabled": True,
        "slide_classifier.folds": 1,
    },
}


def _ablation(args: argparse.Namespace) -> None:
    import shutil

    work = args.work or Path(tempfile.mkdtemp(prefix="wsiflow-bench-ablation-"))
    record_path = (args.analyse or work) / "ablation.json"
    if args.analyse:
        record = json.loads(record_path.read_text())
        _print_ablation(record)
        _print_score_split(args.analyse, record)
        return
    work.mkdir(parents=True, exist_ok=True)
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown variants: {', '.join(sorted(unknown))}; known: {', '.join(VARIANTS)}")
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    base = _overridden(baseline_config(), settings(args.set))
    synthetic = base["slides"]["synthetic"]
    synthetic["slides"] = 3 * args.test_slides
    synthetic["width_px"] = synthetic["height_px"] = args.size
    training_seeds = [int(t) for t in args.training_seeds.split(",")]
    for seed, training_seed in ((int(s), t) for s in args.seeds.split(",") for t in training_seeds):
        synthetic["seed"] = seed
        base["training"]["seed"] = training_seed
        key = _run_key(seed, training_seed)
        folder = work / f"seed{seed}"
        folder.mkdir(exist_ok=True)
        cohort = folder / "cohort"
        seed_config = folder / "seed.yaml"
        seed_config.write_text(yaml.safe_dump(base, sort_keys=False))
        if not (cohort / "synth.json").is_file():
            _wsiflow("synth", str(cohort), "--config", str(seed_config))
        store = _store(folder, training_seed)
        for variant in _baseline_first(variants):
            if key in record.get(variant, {}):
                continue
            out, variant_config = _variant_paths(folder, variant, training_seed)
            if variant != "baseline" and not (out / "model").exists():
                out.mkdir(parents=True, exist_ok=True)
                first = _variant_paths(folder, "baseline", training_seed)[0] / "model"
                shutil.copytree(first, out / "model")
            config = _overridden(base, VARIANTS[variant])
            out.parent.mkdir(parents=True, exist_ok=True)
            variant_config.write_text(yaml.safe_dump(config, sort_keys=False))
            started = time.perf_counter()
            summary = _wsiflow(
                "flow", "camelyon", str(cohort), "--out", str(out), "--store",
                str(store), "--config", str(variant_config),
            )  # fmt: skip
            seconds = time.perf_counter() - started
            evaluation = summary["evaluate"]
            record.setdefault(variant, {})[key] = {
                "slide_auc": evaluation["slide_auc"],
                "froc": evaluation["froc"],
                "seconds": seconds,
                "stages": summary["seconds"],
            }
            record_path.write_text(json.dumps(record, indent=1))
            print(
                f"seed {key} {variant:<17} slide AUC {_num(evaluation['slide_auc'])}  "
                f"FROC {_num(evaluation['froc'])}  {seconds / 60:.1f} min  stages (s): "
                + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items()),
                flush=True,
            )
        if args.held_out:
            _score_held_out(args, seed, training_seed, folder, base, variants, record, record_path)
    _print_ablation(record)
    _print_score_split(work, record)


def _baseline_first(variants: list[str]) -> list[str]:
    """The baseline, then the other ``variants``: each variant starts from its first model."""
    return ["baseline", *[v for v in variants if v != "baseline"]]


def _variant_paths(folder: Path, variant: str, training_seed: int) -> tuple[Path, Path]:
    """A variant's flow output folder in a seed's ``folder``, and the config it ran with."""
    runs = folder / ("ablation" if training_seed == 0 else f"ablation_t{training_seed}")
    out = runs / variant.replace(" ", "_")
    return out, out.parent / f"{out.name}.yaml"


def _store(folder: Path, training_seed: int) -> Path:
    """A training seed's patch store: the seed's own, or a copy without what models mined.

    Each training seed mines with its own models; a copy keeps the store of
    the runs kept for the others unchanged (their flows then reuse it).
    """
    import shutil

    store = folder / "patches.zarr"
    if training_seed == 0:
        return store
    copy_ = folder / f"patches_t{training_seed}.zarr"
    if store.is_dir() and not copy_.exists():
        partial = copy_.with_name(copy_.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)  # our own unfinished copy
        shutil.copytree(store, partial, ignore=shutil.ignore_patterns("hard_negatives"))
        partial.rename(copy_)
    return copy_


def _run_key(seed: int, training_seed: int) -> str:
    """A run's key in ``ablation.json``: the cohort's seed, and ``/t<N>`` for training seed N."""
    return str(seed) if training_seed == 0 else f"{seed}/t{training_seed}"


def _key_order(key: str) -> tuple[int, ...]:
    return tuple(int(part) for part in key.replace("/t", " ").split())


#: A held-out cohort's seed is this plus its training cohort's seed.
HELD_OUT_SEED = 1000


def _score_held_out(
    args: argparse.Namespace,
    seed: int,
    training_seed: int,
    folder: Path,
    base: dict,
    variants: list[str],
    record: dict,
    record_path: Path,
) -> None:
    """Each variant's final model (and slide classifier) on ``--held-out`` more slides.

    The slides are a second cohort from the same generator and settings with
    seed ``HELD_OUT_SEED + seed``, every one of them a test slide (its
    ``training/`` and ``testing/`` alike): more test slides per seed, so one
    slide's score moves the AUC less. Scored with ``wsiflow infer`` and
    ``wsiflow evaluate`` as the flow scores its own test slides.
    """
    held = folder / f"held_out_{args.held_out}"
    test = held / "test"
    if not (test / "reference.csv").is_file():
        config = copy.deepcopy(base)
        # Test slides only, half tumor: extra normal training slides are not theirs.
        config["slides"]["synthetic"].update(
            slides=args.held_out, seed=HELD_OUT_SEED + seed, extra_normal_slides=0
        )
        held.mkdir(parents=True, exist_ok=True)
        (held / "cohort.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        if not (held / "cohort" / "synth.json").is_file():
            _wsiflow("synth", str(held / "cohort"), "--config", str(held / "cohort.yaml"))
        _gather_as_test(held / "cohort", test)
    key = _run_key(seed, training_seed)
    for variant in _baseline_first(variants):
        runs = record.get(variant, {})
        scored = runs.get(key, {}).get("held_out", {}).get("slides")
        if key not in runs or scored == args.held_out:
            continue  # not run, or scored on these slides already
        out, variant_config = _variant_paths(folder, variant, training_seed)
        config = _overridden(base, VARIANTS[variant])
        model = out / ("model_hnm" if config["mining"]["enabled"] else "model")
        flags = ["--slide-score", "classifier"] if config["slide_classifier"]["enabled"] else []
        inference = _held_out_inference(held, out, training_seed)
        started = time.perf_counter()
        _wsiflow(
            "infer", str(model), str(test / "images"), "--out", str(inference),
            "--config", str(variant_config), *flags,
        )  # fmt: skip
        evaluation = _wsiflow(
            "evaluate", str(inference), "--reference", str(test / "reference.csv"),
            "--annotations", str(test / "lesion_annotations"), "--slides", str(test / "images"),
            "--config", str(variant_config),
        )  # fmt: skip
        runs[key]["held_out"] = {
            "slides": args.held_out,
            "slide_auc": evaluation["slide_auc"],
            "froc": evaluation["froc"],
            "seconds": time.perf_counter() - started,
        }
        record_path.write_text(json.dumps(record, indent=1))
        print(
            f"seed {key} {variant:<17} held out ({args.held_out} slides): slide AUC "
            f"{_num(evaluation['slide_auc'])}  FROC {_num(evaluation['froc'])}",
            flush=True,
        )


def _held_out_inference(held: Path, out: Path, training_seed: int) -> Path:
    """Where a variant's run (flow output ``out``) was inferred on the held-out slides."""
    return held / (out.name if training_seed == 0 else f"{out.parent.name}_{out.name}")


def _gather_as_test(cohort: Path, test: Path) -> None:
    """Every slide of ``cohort`` as a test slide: links to its images and annotations, and a
    reference.csv (name, Tumor|Normal) of them all."""
    slides = json.loads((cohort / "synth.json").read_text())["slides"]
    for sub in ("images", "lesion_annotations"):
        (test / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for slide in slides:
        image = cohort / slide["image"]
        link = test / "images" / image.name
        if not link.exists():
            link.symlink_to(image.resolve())
        if slide.get("annotation"):
            annotation = cohort / slide["annotation"]
            link = test / "lesion_annotations" / annotation.name
            if not link.exists():
                link.symlink_to(annotation.resolve())
        rows.append(f"{slide['slide_id']},{slide['label']}\n")
    (test / "reference.csv").write_text("".join(rows))


def baseline_config() -> dict:
    """``configs/demo.yaml`` without the recipe's steps and without real slides."""
    base = _overridden(yaml.safe_load((REPO / "configs" / "demo.yaml").read_text()), BASELINE)
    base["slides"]["extra"] = []
    return base


def settings(pairs: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` strings as dotted overrides, each value read as YAML (13, true, null)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            sys.exit(f"--set {pair!r}: expected KEY=VALUE, e.g. training.fine_tune_epochs=13")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def _overridden(config: dict, overrides: dict[str, object]) -> dict:
    config = copy.deepcopy(config)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return config


def _wsiflow(*args: str) -> dict:
    result = subprocess.run([WSIFLOW, *args, "--json"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"wsiflow {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


#: Stages of a variant's flow run that are not the cost of its step.
NOT_ITS_OWN = ("tile", "infer_baseline", "evaluate_baseline")


def _print_ablation(everything: dict) -> None:
    """Per variant: mean ± sd over seeds, the paired difference from the baseline, minutes.

    The tables hold each cohort's first training (``training.seed`` 0); the
    other training seeds' runs are compared with them after.
    """
    record = {
        variant: {key: run for key, run in runs.items() if "/t" not in key}
        for variant, runs in everything.items()
    }
    baseline = record.get("baseline", {})
    print(f"\n{'variant':<17} {'seeds':>5} {'slide AUC':>15} {'vs baseline':>15} "
          f"{'FROC':>15} {'vs baseline':>15} {'min/seed':>9}")  # fmt: skip
    for variant, runs in record.items():
        seeds = sorted(runs, key=_key_order)
        cells = paired_cells(runs, baseline, seeds)
        # The variant's own stages: not tiling (shared), not the baseline's inference beside it.
        minutes = statistics.median(
            sum(v for k, v in runs[s]["stages"].items() if k not in NOT_ITS_OWN) / 60 for s in seeds
        )
        print(f"{variant:<17} {len(seeds):>5} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15} "
              f"{cells[3]:>15} {minutes:>9.1f}")  # fmt: skip
    held = _held_out(record)
    if any(held.values()):
        slides = sorted({run["slides"] for runs in held.values() for run in runs.values()})
        print(f"\nthe same models on held-out slides ({'/'.join(map(str, slides))} per seed):")
        for variant, runs in held.items():
            if not runs:
                continue
            seeds = sorted(runs, key=_key_order)
            cells = paired_cells(runs, held.get("baseline", {}), seeds)
            print(f"{variant:<17} {len(seeds):>5} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15} "
                  f"{cells[3]:>15}")  # fmt: skip
    _print_training_spread(everything)


def _held_out(record: dict) -> dict:
    """``record`` with each run's held-out scores in place of its own (runs without left out)."""
    return {
        variant: {key: run["held_out"] for key, run in runs.items() if "held_out" in run}
        for variant, runs in record.items()
    }


def _print_training_spread(record: dict) -> None:
    """Where cohorts were trained with several ``training.seed`` values: how far one cohort's
    runs spread (pooled sd within a cohort) against the spread across cohorts (sd of each
    cohort's first run), for the baseline's scores and each variant's paired difference."""
    if not any("/t" in key for runs in record.values() for key in runs):
        return
    print("\nanother training.seed on the same cohort: sd within a cohort / across cohorts"
          " (how many; mean ± sd over all runs)")  # fmt: skip
    for title, scored in (("test slides", record), ("held out", _held_out(record))):
        baseline = scored.get("baseline", {})
        for variant, runs in scored.items():
            cells = []
            for metric in ("slide_auc", "froc"):
                if variant == "baseline":  # its scores; the others' paired differences
                    values = {
                        key: run[metric] for key, run in runs.items() if run[metric] is not None
                    }
                else:
                    values = _differences(runs, baseline, metric, list(runs))
                cells.append(_spread(values, signed=variant != "baseline"))
            if any(cells):
                what = "" if variant == "baseline" else " vs baseline"
                print(f"{title:<11} {variant + what:<52} slide AUC {cells[0]}  FROC {cells[1]}")


def _print_score_split(work: Path, record: dict) -> None:
    """A slide classifier variant's held-out slide AUC gain, split in two: its model's own
    (both runs scored by the heatmap maximum) and its classifier's (its classifier's score
    against its own heatmap maxima), over every run (all training seeds) both have."""
    from sklearn.metrics import roc_auc_score

    from pipeline.evaluation.reference import read_reference
    from pipeline.inference.results import heatmap_path, read_heatmap

    def auc_of_maxima(inference: Path, reference: Path) -> float:
        tumor = read_reference(reference)
        slides = sorted(tumor)
        maxima = [_nanmax(read_heatmap(heatmap_path(inference, s))[0][:]) for s in slides]
        return float(roc_auc_score([tumor[s] for s in slides], maxima))

    rows = {}
    for variant, runs in record.items():
        if not VARIANTS.get(variant, {}).get("slide_classifier.enabled"):
            continue
        model, classifier = [], []
        for key, run in sorted(runs.items(), key=lambda item: _key_order(item[0])):
            first = record.get("baseline", {}).get(key, {})
            if "held_out" not in run or "held_out" not in first:
                continue
            seed, training_seed = _key_order(key) if "/t" in key else (int(key), 0)
            folder = work / f"seed{seed}"
            held = folder / f"held_out_{run['held_out']['slides']}"
            reference = held / "test" / "reference.csv"
            out = _variant_paths(folder, variant, training_seed)[0]
            own = auc_of_maxima(_held_out_inference(held, out, training_seed), reference)
            # The baseline scores its slides by the heatmap maximum already.
            model.append(own - first["held_out"]["slide_auc"])
            classifier.append(run["held_out"]["slide_auc"] - own)
        if model:
            rows[variant] = (len(model), _mean_sd(model, True), _mean_sd(classifier, True))
    if rows:
        print("\nheld-out slide AUC vs baseline, split: the model's (both by the heatmap maximum)"
              " + the classifier's (vs its own maximum), over every run")  # fmt: skip
        for variant, (runs, model, classifier) in rows.items():
            print(f"{variant:<40} {runs:>3} runs  model {model}  classifier {classifier}")


def _spread(values: dict[str, float], signed: bool) -> str:
    """``within (cohorts x runs) / across (cohorts); mean ± sd`` of run-keyed ``values``."""
    cohorts: dict[str, list[float]] = {}
    for key, value in sorted(values.items(), key=lambda item: _key_order(item[0])):
        cohorts.setdefault(key.split("/")[0], []).append(value)
    several = [v for v in cohorts.values() if len(v) > 1]
    firsts = [values[c] for c in cohorts if c in values]
    if not several or len(firsts) < 2:
        return ""
    within = float(np.sqrt(np.mean([statistics.variance(v) for v in several])))
    across = statistics.stdev(firsts)
    runs = max(len(v) for v in several)
    return (f"{within:.3f} ({len(several)}x{runs}) / {across:.3f} ({len(firsts)}); "
            f"{_mean_sd(list(values.values()), signed=signed)}")  # fmt: skip


def paired_cells(runs: dict, reference: dict, seeds: list[str]) -> list[str]:
    """Slide AUC and FROC, each: mean ± sd over ``seeds``, then the paired difference from
    ``reference`` (the seeds both have, where neither is undefined)."""
    cells = []
    for metric in ("slide_auc", "froc"):
        values = [runs[s][metric] for s in seeds if runs[s][metric] is not None]
        paired = list(_differences(runs, reference, metric, seeds).values())
        cells += [_mean_sd(values), _mean_sd(paired, signed=True)]
    return cells


def _differences(runs: dict, reference: dict, metric: str, keys: list[str]) -> dict[str, float]:
    """``runs``' ``metric`` minus ``reference``'s, per run of ``keys`` both have defined."""
    return {
        key: runs[key][metric] - reference[key][metric]
        for key in keys
        if key in reference and None not in (runs[key][metric], reference[key][metric])
    }


def _mean_sd(values: list[float], signed: bool = False) -> str:
    if not values:
        return "undefined"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    mean = statistics.fmean(values)
    return f"{mean:+.3f} ± {sd:.3f}" if signed else f"{mean:.3f} ± {sd:.3f}"


def _print_fooled_by(results_dirs: list[Path]) -> None:
    """Per mimic and artefact kind, how often it raises a normal slide's score to 0.5 or more."""
    from pipeline.inference.results import heatmap_path, read_heatmap

    maxima: dict[str, list[float]] = {}
    for results in results_dirs:
        cohort = json.loads((results.parent / "cohort" / "synth.json").read_text())
        for record in cohort["slides"]:
            if record["split"] != "testing" or record["label"] != "Normal":
                continue
            probability, attrs = read_heatmap(heatmap_path(results, record["slide_id"]))
            cell_w, cell_h = attrs["level0_cell_px"]
            rows, cols = probability.shape
            xs = (np.arange(cols) + 0.5) * cell_w
            ys = (np.arange(rows) + 0.5) * cell_h
            claimed = np.zeros(probability.shape, dtype=bool)
            for feature in record["features"]:
                x0, y0, x1, y1 = feature["bounds"]
                inside = ((xs >= x0 - cell_w / 2) & (xs <= x1 + cell_w / 2))[None, :] & (
                    (ys >= y0 - cell_h / 2) & (ys <= y1 + cell_h / 2)
                )[:, None]
                claimed |= inside
                maxima.setdefault(feature["kind"], []).append(_nanmax(probability[inside]))
            maxima.setdefault("plain node", []).append(_nanmax(probability[~claimed]))
    print("\nwhat fools the baseline on normal test slides (heatmap maximum per feature box):")
    print(f"{'kind':<16} {'features':>8} {'>= 0.5':>7} {'median max':>11}")
    for kind, values in sorted(maxima.items(), key=lambda kv: -statistics.median(kv[1])):
        fooled = sum(v >= 0.5 for v in values)
        print(f"{kind:<16} {len(values):8d} {fooled:7d} {statistics.median(values):11.2f}")


def _nanmax(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.max()) if values.size else 0.0


def _num(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
