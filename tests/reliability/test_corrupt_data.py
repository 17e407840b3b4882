"""Corrupt JPEG data inside a valid slide is an error, never patches or heatmaps.

libjpeg decodes through most corruption with only a warning ("Corrupt JPEG
data: premature end of data segment"), returning grey or shifted blocks.
These tests write random bytes into tiles the tiling plan reads and check
that the slide fails naming the level and region, on every read path.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from pipeline.config import TilingConfig
from pipeline.tiling.plan import SlideJob, plan_slide
from tests.conftest import last_json, run


def _corrupt_tiles(path: Path, page_index: int, tile_indices: list[int], seed: int = 0) -> None:
    """Write 40 random bytes into the middle of each tile's JPEG data, in place."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[page_index]
        offsets, counts = page.dataoffsets, page.databytecounts
    rng = np.random.default_rng(seed)
    with open(path, "r+b") as f:
        for index in tile_indices:
            f.seek(offsets[index] + counts[index] // 2)
            f.write(rng.integers(0, 256, 40, dtype=np.uint8).tobytes())


@pytest.fixture(scope="module")
def clean_slide(small_cohort) -> Path:
    record = next(r for r in small_cohort.slides if r.slide_id.startswith("tumor"))
    return small_cohort.root / record.image


def _tiles_under_patches(slide: Path, config: TilingConfig, n: int) -> tuple[int, list[int]]:
    """The TIFF page of the level the plan reads and the tiles under its first ``n`` patches."""
    plan = plan_slide(SlideJob(slide.stem, slide, None), config)
    level = plan.resolution.level
    with tifffile.TiffFile(slide) as tif:
        page = tif.pages[level]
        tile_w, tile_h, width = page.tilewidth, page.tilelength, page.shape[1]
    across = -(-width // tile_w)
    picks = np.linspace(0, len(plan.table) - 1, n).astype(int)
    tiles = {(int(y) // tile_h) * across + int(x) // tile_w for x, y in plan.table.level_xy[picks]}
    return level, sorted(tiles)


@pytest.mark.parametrize(
    ("name", "args", "config"),
    [
        # Patches resampled from level 1: decoded by wsiflow's direct reader.
        (
            "decoded",
            ("--mpp", "0.6", "--patch-size", "96"),
            TilingConfig(target_mpp=0.6, patch_px=96),
        ),
        # Patches that are the stored tiles: copied, never re-encoded.
        (
            "copied",
            ("--level", "0", "--patch-size", "256"),
            TilingConfig(target_mpp=None, level=0, patch_px=256),
        ),
    ],
)
def test_corrupt_tiles_fail_the_slide_naming_level_and_region(
    name, args, config, clean_slide, tmp_path
):
    slide = Path(shutil.copy(clean_slide, tmp_path / f"corrupt_{name}.tif"))
    level, tiles = _tiles_under_patches(slide, config, 5)
    _corrupt_tiles(slide, level, tiles)
    good = Path(shutil.copy(clean_slide, tmp_path / "good.tif"))
    store = tmp_path / "s.zarr"
    result = run("tile", str(slide), str(good), "--out", str(store), *args, "-w", "1", "--json")
    assert result.returncode == 1, result.stderr
    summary = last_json(result)
    assert [r["status"] for r in summary["per_slide"]] == ["failed", "done"]
    reason = summary["failures"][0]["reason"]
    assert reason.startswith(str(slide)) and f"level {level}" in reason, reason
    assert "corrupt JPEG data" in reason, reason
    failed_lines = [line for line in result.stderr.splitlines() if str(slide) in line]
    assert len(failed_lines) == 1 and "Traceback" not in result.stderr, result.stderr
    import zarr

    assert not zarr.open_group(str(store), mode="r")[slide.stem].attrs.get("complete")


@pytest.mark.slow
def test_inference_refuses_corrupt_tiles(clean_slide, trained_model, tmp_path):
    from pipeline.inference.predict import model_spec

    spec = model_spec(trained_model)
    config = TilingConfig(target_mpp=spec.patch_mpp, patch_px=spec.patch_px)
    slide = Path(shutil.copy(clean_slide, tmp_path / "corrupt.tif"))
    level, tiles = _tiles_under_patches(slide, config, 5)
    _corrupt_tiles(slide, level, tiles)
    out = tmp_path / "inference"
    result = run("infer", str(trained_model), str(slide), "--out", str(out), "--json")
    assert result.returncode == 1, result.stderr
    summary = last_json(result)
    reason = summary["failures"][0]["reason"]
    assert "corrupt JPEG data" in reason and f"level {level}" in reason, reason
    assert not (out / "heatmaps" / "corrupt.zarr").exists()
    assert "corrupt" not in (out / "scores.csv").read_text()
