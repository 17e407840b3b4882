"""Resampled tiling throughput against a limit and a peer measured in the same run.

    .venv/bin/python benchmarks/resampling.py [--size 40960] [--mpp 0.5] [--patch-size 256] [--repeats 3]

CAMELYON16's slides are 0.243 µm/px at level 0 and 0.486 at level 1, so the
usual ``--mpp 0.5 --patch-size 256`` reads 263 px of level 1 per patch and
resamples them to 256 (``--patch-size 96``: 99 px to 96): no patch is a
stored tile. On the generated slide of
``benchmarks/tiling.py`` (same file, same 0.243 µm/px), prints:

- wsiflow's whole tiling pipeline with ``--mpp 0.5 --patch-size 256`` on a
  LocalCluster of 1 and of 2 single-threaded workers (runs alternating);
- the work each patch needs, each alone on one core: decoding the level-1
  tiles under the patches (each once), resampling 263 px to 256 with
  wsiflow's resampler, and JPEG-encoding and writing the patches;
- the limit 1 / (those three times per patch);
- the peer: what a plain script does, OpenSlide ``read_region`` of the same
  263 px regions and Pillow's bilinear resize to 256, in a loop;

then wsiflow / limit, wsiflow / peer and 2 workers / 1. Medians over
``--repeats`` runs.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from tiling import bench_slide, median_rate, slide_parser

from pipeline.cluster import dask_client
from pipeline.config import TilingConfig
from pipeline.slides.patches import resize_patch
from pipeline.slides.reader import open_slide
from pipeline.store.codecs import PatchImageCodec, pack_images
from pipeline.tiling.driver import tile_slides
from pipeline.tiling.plan import SlideJob, plan_slide


def main() -> None:
    parser = slide_parser(__doc__)
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--patch-size", type=int, default=256)
    args = parser.parse_args()
    slide = bench_slide(args.workdir, args.size)

    patch_px = args.patch_size
    config = TilingConfig(target_mpp=args.mpp, patch_px=patch_px)
    plan = plan_slide(SlideJob("bench", slide, None), config)
    resolution, table = plan.resolution, plan.table
    level, read_px = resolution.level, resolution.read_px
    n_patches = len(table)
    sample = table.level_xy[:: max(1, n_patches // 1000)]  # for the per-patch loops
    print(
        f"slide {args.size} x {args.size}: {n_patches} tissue patches of {patch_px} px at "
        f"{args.mpp} µm/px: {read_px} px of level {level} ({resolution.level_mpp:.3f} µm/px)"
    )

    # The level's tiles under the patches, each decoded once.
    with tifffile.TiffFile(slide) as tif, open_slide(slide) as reader:
        level_w, level_h = reader.info.level_wh[level]
        page = next(p for p in tif.pages if p.shape[:2] == (level_h, level_w))
        across = -(-level_w // page.tilewidth)
        tiles = sorted(
            {
                (ty * across + tx)
                for x, y in table.level_xy
                for tx in range(x // page.tilewidth, (x + read_px - 1) // page.tilewidth + 1)
                for ty in range(y // page.tilelength, (y + read_px - 1) // page.tilelength + 1)
            }
        )
        fd = os.open(slide, os.O_RDONLY)
        stored = [os.pread(fd, page.databytecounts[i], page.dataoffsets[i]) for i in tiles]
        os.close(fd)

        def decode_all() -> None:
            for i, data in zip(tiles, stored, strict=True):
                page.decode(data, i, jpegtables=page.jpegtables)

        tile_rate = median_rate(decode_all, len(tiles), args.repeats)
        regions = [
            reader.read_level(level, (int(x), int(y)), (read_px, read_px)) for x, y in sample
        ]
    resize_rate = median_rate(
        lambda: [resize_patch(r, patch_px) for r in regions], len(regions), args.repeats
    )

    # JPEG-encode the resampled patches with the store's codec and write them as chunk files.
    patches = [resize_patch(r, patch_px) for r in regions]
    codec = PatchImageCodec(format="jpeg", quality=config.codec_quality)
    scratch = Path(tempfile.mkdtemp(dir=args.workdir))

    def encode_write() -> None:
        for c, start in enumerate(range(0, len(patches), config.chunk_patches)):
            chunk = patches[start : start + config.chunk_patches]
            (scratch / f"c.{c}").write_bytes(pack_images([codec.encode_patch(p) for p in chunk]))

    encode_rate = median_rate(encode_write, len(patches), args.repeats)
    shutil.rmtree(scratch)
    tiles_per_patch = len(tiles) / n_patches
    limit = 1 / (tiles_per_patch / tile_rate + 1 / resize_rate + 1 / encode_rate)

    # The peer: OpenSlide read_region of the same regions and Pillow's bilinear resize.
    with open_slide(slide, direct=False) as reader:
        osr = reader._osr
        downsample = reader.info.level_downsamples[level]

        def peer_loop() -> None:
            for x, y in sample:
                region = osr.read_region(
                    (round(x * downsample), round(y * downsample)), level, (read_px, read_px)
                )
                np.asarray(
                    region.convert("RGB").resize((patch_px, patch_px), Image.Resampling.BILINEAR)
                )

        peer_rate = median_rate(peer_loop, len(sample), args.repeats)

    # wsiflow's whole pipeline on 1 and 2 single-threaded workers, runs alternating.
    store = args.workdir / "bench_resampled.zarr"
    warnings.filterwarnings("ignore", message="Port 8787 is already in use")
    rates: dict[int, list[float]] = {1: [], 2: []}
    with dask_client(workers=1) as one, dask_client(workers=2) as two:
        clients = {1: one, 2: two}
        for c in clients.values():  # warm up: imports, slide handles
            tile_slides(c, [slide], store, config, overwrite=True)
        for repeat in range(args.repeats):
            for workers in (1, 2) if repeat % 2 == 0 else (2, 1):
                shutil.rmtree(store, ignore_errors=True)
                os.sync()
                t0 = time.perf_counter()
                (result,) = tile_slides(clients[workers], [slide], store, config)
                rates[workers].append(result.patches / (time.perf_counter() - t0))
    shutil.rmtree(store, ignore_errors=True)
    wsiflow = {workers: statistics.median(r) for workers, r in rates.items()}

    print()
    print(f"{'decode level ' + str(level) + ' tiles (1 core)':<52}{tile_rate:>10,.0f} tiles/s")
    print(f"  {tiles_per_patch:.2f} tiles per patch")
    print(
        f"{'resample ' + str(read_px) + ' -> ' + str(patch_px) + ' px (1 core)':<52}{resize_rate:>10,.0f} patches/s"
    )
    print(
        f"{'encode + write (jpeg q' + str(config.codec_quality) + ')':<52}{encode_rate:>10,.0f} patches/s"
    )
    print(f"{'limit 1/(decode + resample + encode-write)':<52}{limit:>10,.0f} patches/s")
    print(f"{'peer: OpenSlide read_region + Pillow resize':<52}{peer_rate:>10,.0f} patches/s")
    for workers in (1, 2):
        label = f"wsiflow tile --mpp {args.mpp} --patch-size {patch_px}, {workers} worker{'s' if workers > 1 else ''}"
        print(f"{label:<52}{wsiflow[workers]:>10,.0f} patches/s")
    print()
    print(f"  wsiflow / limit       = {wsiflow[1] / limit:.2f}")
    print(f"  wsiflow / peer        = {wsiflow[1] / peer_rate:.2f}")
    print(f"  2 workers / 1 worker  = {wsiflow[2] / wsiflow[1]:.2f}")
    if args.json:
        results = {
            "slide_px": args.size,
            "patches": n_patches,
            "patch_px": patch_px,
            "level": level,
            "read_px": read_px,
            "tiles_per_patch": round(tiles_per_patch, 3),
            "tile_decode_per_s": round(tile_rate),
            "resample_per_s": round(resize_rate),
            "encode_write_per_s": round(encode_rate),
            "limit_per_s": round(limit),
            "peer_per_s": round(peer_rate),
            "wsiflow_1_worker_per_s": round(wsiflow[1]),
            "wsiflow_2_workers_per_s": round(wsiflow[2]),
            "ratio_to_limit": round(wsiflow[1] / limit, 3),
            "ratio_to_peer": round(wsiflow[1] / peer_rate, 2),
            "scaling_2_workers": round(wsiflow[2] / wsiflow[1], 2),
        }
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
