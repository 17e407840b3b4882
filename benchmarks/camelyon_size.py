"""`wsiflow tile` and `wsiflow infer` on one slide of CAMELYON16's size, per process.

    .venv/bin/python benchmarks/camelyon_size.py [--pairs 3] [--workdir /tmp/wsiflow-c16size]

Generates (once, a few minutes) a 98,304 x 215,040 px slide at 0.243 µm/px,
CAMELYON16's level-0 size and resolution (256 px JPEG tiles, q80, a
pyramid; tissue tiles repeat 64 rendered H&E tiles, as benchmarks/tiling.py
makes its slide), then runs the real commands as a user would, for the
demo's patches (96 px at 0.5 µm/px) and configs/camelyon16.yaml's (224 px
at 0.5 µm/px):

- ``wsiflow tile SLIDE --config C`` in ``--pairs`` interleaved pairs, with
  wsiflow's allocator settings (A) and with glibc's defaults
  (``WSIFLOW_ALLOCATOR=default``, B);
- ``wsiflow infer MODEL SLIDE --config C`` once with A (and once with B for
  the demo's patches), the model an untrained MobileNetV2 of that patch
  size (the same cost as a trained one); camelyon16.yaml's at a stride of
  one patch (``--stride 224``; its own half-patch stride predicts 4x the
  patches, at the same peak memory);

each with its wall time, CPU time (user and kernel) and peak memory (VmHWM)
of the driver and of each Dask worker process, read from /proc every 0.2 s.
CAMELYON16's own backbone (InceptionV3 at 224 px) predicts far slower on a
CPU: its predict-only rate on a sample of patches gives the estimate for
that config. Results: a table here, and ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import _model_dir  # the benchmarks' own helpers
from tiling import make_slide

ROOT = Path(__file__).resolve().parents[1]
WSIFLOW = str(Path(sys.executable).parent / "wsiflow")
WIDTH, HEIGHT = 98_304, 215_040  # CAMELYON16's level 0 (e.g. Tumor_001: 97,792 x 221,184)
#: name -> (config, patch px, extra `infer` options). camelyon16.yaml's stride of half a
#: patch predicts 4x the patches: measured at a stride of one patch, the rest scales.
CONFIGS = {
    "demo": (ROOT / "configs" / "demo.yaml", 96, []),
    "camelyon16": (ROOT / "configs" / "camelyon16.yaml", 224, ["--stride", "224"]),
}


def measure(args: list[str], env: dict[str, str]) -> dict:
    """Run ``wsiflow ARGS``; wall, CPU and peak memory of it and of every process it started."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [WSIFLOW, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    root = psutil.Process(process.pid)
    peaks: dict[int, dict] = {}
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for p in tree:
            try:
                with open(f"/proc/{p.pid}/status") as status:
                    hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
                times = p.cpu_times()
                name = "driver" if p.pid == root.pid else " ".join(p.cmdline()[:3])
            except (psutil.NoSuchProcess, FileNotFoundError, StopIteration, ProcessLookupError):
                continue
            peaks[p.pid] = {
                "name": name,
                "peak_mib": hwm / 1024,
                "user_s": times.user,
                "system_s": times.system,
            }
        time.sleep(0.2)
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"wsiflow {' '.join(args)} failed:\n{stderr[-2000:]}")
    driver = next(v for v in peaks.values() if v["name"] == "driver")
    # Dask's worker processes hold the model or the slide; small helpers (resource tracker) not.
    workers = sorted(
        (v for v in peaks.values() if v["name"] != "driver" and v["peak_mib"] > 100),
        key=lambda v: -v["peak_mib"],
    )
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {
        "wall_s": wall,
        "cpu_s": sum(v["user_s"] + v["system_s"] for v in peaks.values()),
        "kernel_s": sum(v["system_s"] for v in peaks.values()),
        "driver_peak_mib": driver["peak_mib"],
        "worker_peaks_mib": [round(v["peak_mib"]) for v in workers],
        "summary": summary,
    }


def inception_rate(patches: int = 256, batch: int = 64) -> float:
    """InceptionV3 at 224 px, predict-only on random uint8 patches (patches/s, warm)."""
    import numpy as np

    from models.classifier import build_classifier

    model, _ = build_classifier("inceptionv3", 224)
    data = np.random.default_rng(0).integers(0, 256, (patches, 224, 224, 3), dtype=np.uint8)
    model.predict(data[:batch], batch_size=batch, verbose=0)
    started = time.perf_counter()
    model.predict(data, batch_size=batch, verbose=0)
    return patches / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3, help="A/B pairs of each tile run")
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "wsiflow-c16size"
    )
    parser.add_argument("--skip-infer-b", action="store_true", help="infer with A only")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    slide = work / "c16size.tif"
    if not slide.exists():
        started = time.perf_counter()
        make_slide(slide, WIDTH, HEIGHT)
        print(f"generated {slide} ({slide.stat().st_size / 1e9:.2f} GB) in "
              f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
    env_a = {k: v for k, v in os.environ.items() if k != "WSIFLOW_ALLOCATOR"}
    env_b = {**env_a, "WSIFLOW_ALLOCATOR": "default"}
    results: dict = {"slide": str(slide), "width": WIDTH, "height": HEIGHT}
    for name, (config, px, infer_options) in CONFIGS.items():
        store = work / f"{name}.zarr"
        tiles = {"A": [], "B": []}
        for pair in range(args.pairs):
            for label in "AB" if pair % 2 == 0 else "BA":
                env = env_a if label == "A" else env_b
                run = measure(["tile", str(slide), "--out", str(store), "--config", str(config),
                               "--overwrite", "--json"], env)  # fmt: skip
                tiles[label].append(run)
                print(f"{name} tile {label}: {run['wall_s']:.1f} s, "
                      f"{run['summary']['patches']:,} patches, driver "
                      f"{run['driver_peak_mib']:.0f} MiB, workers {run['worker_peaks_mib']}",
                      flush=True)  # fmt: skip
        model = _model_dir(work, "mobilenetv2", px)
        infers = {}
        for label in ("A",) if (args.skip_infer_b or name != "demo") else ("A", "B"):
            env = env_a if label == "A" else env_b
            out = work / f"infer_{name}_{label}"
            run = measure(["infer", str(model), str(slide), "--out", str(out), "--config",
                           str(config), *infer_options, "--overwrite", "--json"], env)  # fmt: skip
            infers[label] = run
            print(f"{name} infer {label}: {run['wall_s']:.1f} s, {run['kernel_s']:.0f} s "
                  f"kernel of {run['cpu_s']:.0f} s CPU, driver {run['driver_peak_mib']:.0f} "
                  f"MiB, workers {run['worker_peaks_mib']}", flush=True)  # fmt: skip
        results[name] = {"patch_px": px, "tile": tiles, "infer": infers}

    rate = inception_rate()
    results["inceptionv3_224_predict_per_s"] = rate
    print(f"\nInceptionV3 at 224 px, predict-only: {rate:.1f} patches/s")
    print("\n| config | step | runs | wall s median (range) | CPU s | kernel s | "
          "driver peak MiB | worker peaks MiB |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for name in CONFIGS:
        for step in ("tile", "infer"):
            for label, runs in sorted(results[name][step].items()):
                runs = runs if isinstance(runs, list) else [runs]
                walls = [r["wall_s"] for r in runs]
                print(f"| {name} | {step} {label} | {len(runs)} | "
                      f"{statistics.median(walls):.1f} ({min(walls):.1f}-{max(walls):.1f}) | "
                      f"{statistics.median(r['cpu_s'] for r in runs):.0f} | "
                      f"{statistics.median(r['kernel_s'] for r in runs):.0f} | "
                      f"{max(r['driver_peak_mib'] for r in runs):.0f} | "
                      f"{max(r['worker_peaks_mib'] for r in runs)} |")  # fmt: skip
    for name in CONFIGS:
        tile = results[name]["tile"]
        if tile["A"] and tile["B"]:
            ratios = [a["wall_s"] / b["wall_s"] for a, b in zip(tile["A"], tile["B"], strict=True)]
            print(f"{name} tile A/B wall: median {statistics.median(ratios):.2f} "
                  f"(range {min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip
    demo = results["demo"]["infer"]
    if "B" in demo:
        print(f"demo infer A/B wall: {demo['A']['wall_s'] / demo['B']['wall_s']:.2f}")
    patches = results["camelyon16"]["infer"]["A"]["summary"]["patches"]
    print(
        f"camelyon16 config ({patches:,} patches of 224 px at a stride of 224, 4x that at "
        f"its stride of 112): InceptionV3 predict-only alone ~{4 * patches / rate / 60:.0f} "
        "min per slide on this machine"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
