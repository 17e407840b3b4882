"""Patch-store codecs on real H&E patches: size, speed and fidelity, against uncompressed.

    .venv/bin/python benchmarks/codecs.py [--slide ../shared/data/slides/CMU-1-Small-Region.svs]

Reads the tissue patches (128 px, level 0, whole 64-patch chunks) of the real Aperio slide, writes
them into a wsiflow patch store array with each codec (64-patch chunks, the
store's own settings) and reads them back. Prints, per codec, the compression
ratio against raw pixels, write and read rates as ratios to the uncompressed
store measured in the same run, and the mean absolute error and PSNR against
the decoded source pixels. Medians over ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from pipeline.config import TilingConfig
from pipeline.slides.reader import open_slide
from pipeline.store.codecs import image_formats
from pipeline.store.patch_store import create_slide_group, open_patches, open_root, store_bytes
from pipeline.tiling.plan import SlideJob, plan_slide

DEFAULT_SLIDE = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
)
CODECS = [
    ("none", 0),
    ("lz4", 0),
    ("zstd", 0),
    ("jpeg", 80),
    ("jpeg", 90),
    ("jpeg", 95),
    ("jpegxl", 90),
    ("avif", 90),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", type=Path, default=DEFAULT_SLIDE)
    parser.add_argument("--patch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not args.slide.is_file():
        sys.exit(f"{args.slide}: no such slide (the real Aperio slide lives in ../shared/data)")
    px = args.patch_size
    plan = plan_slide(
        SlideJob("s", args.slide, None), TilingConfig(target_mpp=None, level=0, patch_px=px)
    )
    with open_slide(args.slide) as reader:
        patches = np.stack(
            [reader.read_level(0, (int(x), int(y)), (px, px)) for x, y in plan.table.level_xy]
        )
    # Whole chunks only: a partial last chunk is stored full size and would skew the ratios.
    patches = patches[: max(64, len(patches) // 64 * 64)]
    raw = patches.nbytes
    print(f"{args.slide.name}: {len(patches)} tissue patches of {px} px ({raw / 1e6:.1f} MB raw)\n")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for codec, quality in CODECS:
            if codec in ("jpegxl", "avif") and codec not in image_formats():
                continue
            writes, reads = [], []
            for repeat in range(args.repeats):
                path = Path(scratch) / f"{codec}{quality}_{repeat}.zarr"
                root = open_root(path)
                create_slide_group(
                    root,
                    "s",
                    n_patches=len(patches),
                    patch_px=px,
                    chunk_patches=64,
                    codec=codec,
                    codec_quality=max(quality, 1),
                    attrs={},
                )
                array = open_patches(path, "s")
                t0 = time.perf_counter()
                for start in range(0, len(patches), 64):
                    array[start : start + 64] = patches[start : start + 64]
                writes.append(len(patches) / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                back = zarr.open_array(str(path / "s" / "patches"), mode="r")[:]
                reads.append(len(patches) / (time.perf_counter() - t0))
                size = store_bytes(path / "s" / "patches")
            error = np.abs(back.astype(np.int16) - patches)
            mse = float((error.astype(np.float64) ** 2).mean())
            psnr = float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)
            name = codec if codec in ("none", "lz4", "zstd") else f"{codec} q{quality}"
            rows.append(
                (
                    name,
                    raw / size,
                    statistics.median(writes),
                    statistics.median(reads),
                    error.mean(),
                    psnr,
                )
            )
    base_write, base_read = rows[0][2], rows[0][3]
    print(
        f"{'codec':<12}{'ratio':>8}{'write/s':>10}{'x none':>8}{'read/s':>10}{'x none':>8}{'MAE':>7}{'PSNR dB':>9}"
    )
    for name, ratio, write, read, mae, psnr in rows:
        print(
            f"{name:<12}{ratio:>8.2f}{write:>10,.0f}{write / base_write:>8.2f}"
            f"{read:>10,.0f}{read / base_read:>8.2f}{mae:>7.2f}{psnr:>9.1f}"
        )


if __name__ == "__main__":
    main()
