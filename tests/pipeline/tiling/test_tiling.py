"""Tiling on generated CAMELYON16-format slides with a real Dask cluster and real OpenSlide."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import zarr
from skimage.measure import points_in_poly

from pipeline.config import TilingConfig
from pipeline.slides.annotations import read_asap_xml, write_asap_xml
from pipeline.slides.pyramid import write_pyramid_tiff
from pipeline.slides.reader import open_slide
from pipeline.store.codecs import PatchImageCodec
from pipeline.store.patch_store import read_summary
from pipeline.tiling.driver import COPY_FACTOR, _block_patches, tile_slides


@pytest.fixture(scope="module")
def client():
    from pipeline.cluster import dask_client

    with dask_client(workers=2) as c:
        yield c


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from pipeline.config import SyntheticConfig
    from pipeline.synth.cohort import write_cohort

    root = tmp_path_factory.mktemp("tiling-cohort")
    return write_cohort(
        root, SyntheticConfig(slides=4, seed=21, width_px=4096, height_px=3072), workers=2
    )


def _train(cohort):
    root = cohort.root
    return [
        root / r.image for r in cohort.slides if r.split == "training"
    ], root / "training" / "lesion_annotations"


def _tiles_checked_before_copying(page) -> set[int]:
    """Indices of the 256 px level-0 tiles planning decodes before copying: first and central."""
    height, width = page.shape[:2]
    return {0, (height // 2 // 256) * -(-width // 256) + width // 2 // 256}


def _tumor_fraction_exact(polygons, x0, y0, size, step=4):
    """Independent check: sample the patch's pixel centres against the polygons."""
    ys, xs = np.mgrid[0:size:step, 0:size:step]
    points = np.stack([x0 + xs.ravel() + 0.5, y0 + ys.ravel() + 0.5], axis=1)
    inside = np.zeros(len(points), dtype=bool)
    for p in polygons:
        if p.is_tumor:
            inside |= points_in_poly(points, p.level0_xy)
    for p in polygons:
        if p.is_exclusion:
            inside &= ~points_in_poly(points, p.level0_xy)
    return inside.mean()


def test_labels_follow_the_annotations_and_pixels_match_openslide(client, cohort, tmp_path):
    slides, annotations = _train(cohort)
    store = tmp_path / "store.zarr"
    config = TilingConfig(target_mpp=None, level=1, patch_px=64, codec="zstd")
    results = tile_slides(client, slides, store, config, annotations_dir=annotations)
    assert [r.status for r in results] == ["done", "done"]
    root = zarr.open_group(str(store), mode="r")
    for path in slides:
        group = root[path.stem]
        assert group.attrs["complete"] is True
        assert group.attrs["level"] == 1 and group.attrs["patch_px"] == 64
        coords, labels = group["coords"][:], group["labels"][:]
        patches = group["patches"]
        assert patches.shape == (len(labels), 64, 64, 3)
        assert len(labels) > 100
        if path.stem.startswith("normal"):
            assert labels.sum() == 0
            assert group["tumor_fraction"][:].max() == 0
            continue
        polygons = read_asap_xml(annotations / f"{path.stem}.xml")
        assert labels.sum() > 5
        for i in np.flatnonzero(labels == 1):
            x, y = coords[i]
            assert _tumor_fraction_exact(polygons, x, y, 128) >= 0.45
        for i in np.flatnonzero(labels == 0)[::7]:
            x, y = coords[i]
            assert _tumor_fraction_exact(polygons, x, y, 128) <= 0.55
        with open_slide(path, direct=False) as slide:  # OpenSlide itself is the reference
            for i in np.random.default_rng(0).choice(len(labels), 25, replace=False):
                x, y = (int(v) for v in coords[i])
                np.testing.assert_array_equal(patches[i], slide.read_region((x, y), 1, (64, 64)))
    summary = read_summary(store)
    assert {k: v["status"] for k, v in summary.items()} == {p.stem: "done" for p in slides}
    assert summary[slides[0].stem]["patches"] == root[slides[0].stem]["labels"].shape[0]


def test_resume_skips_complete_slides_and_redoes_changed_ones(client, cohort, tmp_path):
    slides, annotations = _train(cohort)
    store = tmp_path / "store.zarr"
    config = TilingConfig(patch_px=48)
    first = tile_slides(client, slides, store, config, annotations_dir=annotations)
    assert [r.status for r in first] == ["done", "done"]
    again = tile_slides(client, slides, store, config, annotations_dir=annotations)
    assert [r.status for r in again] == ["skipped", "skipped"]
    assert [r.patches for r in again] == [r.patches for r in first]
    # A touched slide or another config is redone; --overwrite redoes everything.
    os.utime(slides[0], ns=(1, 1))
    assert [
        r.status for r in tile_slides(client, slides, store, config, annotations_dir=annotations)
    ] == [
        "done",
        "skipped",
    ]
    other = TilingConfig(patch_px=48, min_tissue_fraction=0.9)
    assert [
        r.status for r in tile_slides(client, slides, store, other, annotations_dir=annotations)
    ] == [
        "done",
        "done",
    ]
    assert [
        r.status
        for r in tile_slides(
            client, slides, store, other, annotations_dir=annotations, overwrite=True
        )
    ] == ["done", "done"]


def _failures_logged_by_workers(client) -> int:
    """How many failed tasks (Dask's "Compute Failed", with traceback) the workers logged."""
    logs = client.get_worker_logs()
    return sum("Compute Failed" in message for records in logs.values() for _, message in records)


def test_bad_slides_are_reported_and_the_rest_complete(client, cohort, tmp_path):
    slides, annotations = _train(cohort)
    bad = tmp_path / "bad"
    bad.mkdir()
    good = bad / "good.tif"
    shutil.copy(slides[0], good)
    notes = tmp_path / "notes"
    notes.mkdir()
    shutil.copy(annotations / f"{slides[0].stem}.xml", notes / "good.xml")
    corrupt = bad / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00" + os.urandom(5000))
    truncated = bad / "truncated.tif"
    truncated.write_bytes(slides[1].read_bytes()[: slides[1].stat().st_size // 3])
    blank = bad / "blank.tif"
    write_pyramid_tiff(
        blank, 2048, 2048, lambda x, y, w, h: np.full((h, w, 3), 243, np.uint8), mpp=0.25
    )
    malformed = bad / "malformed.tif"
    shutil.copy(slides[0], malformed)
    (notes / "malformed.xml").write_text("<ASAP_Annotations><Annotations><Annotation")
    elsewhere = bad / "elsewhere.tif"
    shutil.copy(slides[0], elsewhere)
    polygons = read_asap_xml(annotations / f"{slides[0].stem}.xml")
    write_asap_xml(
        notes / "elsewhere.xml", [type(p)(p.name, p.group, p.level0_xy + 10_000) for p in polygons]
    )
    missing = bad / "missing.tif"
    inputs = [good, corrupt, truncated, blank, malformed, elsewhere, missing]
    logged = _failures_logged_by_workers(client)
    results = tile_slides(
        client, inputs, tmp_path / "s.zarr", TilingConfig(patch_px=48), annotations_dir=notes
    )
    # Each reason is reported once, by the driver: no worker logged a failed task.
    assert _failures_logged_by_workers(client) == logged
    by_id = {r.slide_id: r for r in results}
    assert by_id["good"].status == "done" and by_id["good"].patches > 0
    expected = {
        "corrupt": "truncated or corrupt: a TIFF of",
        "truncated": "truncated.tif",
        "blank": "no patch has >= 50% tissue",
        "malformed": "malformed XML at line 1",
        "elsewhere": "Expected coordinates within the slide's 4096 x 3072",
        "missing": "no such file",
    }
    for slide_id, text in expected.items():
        result = by_id[slide_id]
        assert result.status == "failed", slide_id
        assert text in result.reason, (slide_id, result.reason)
        assert result.reason.startswith(str(bad)) or result.reason.startswith(str(notes))
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert [k for k in root.group_keys() if root[k].attrs.get("complete")] == ["good"]
    assert read_summary(tmp_path / "s.zarr")["blank"]["status"] == "failed"


def test_real_aperio_slide(client, aperio_slide, tmp_path):
    store = tmp_path / "real.zarr"
    results = tile_slides(client, [aperio_slide], store, TilingConfig(target_mpp=0.5, patch_px=128))
    (result,) = results
    assert result.status == "done" and result.level == 0 and result.read_px == 128
    group = zarr.open_group(str(store), mode="r")[aperio_slide.stem]
    tissue = group["tissue_fraction"][:]
    coords = group["coords"][:]
    assert 60 < len(tissue) < 0.7 * (2220 // 128) * (2967 // 128)  # background excluded
    assert tissue.min() >= 0.5
    patches = group["patches"][:]
    assert patches.reshape(len(patches), -1).mean(axis=1).max() < 235  # no blank glass
    assert not ((coords[:, 0] < 250) & (coords[:, 1] < 700)).any()  # the glass at top left


def test_aligned_jpeg_tiles_are_copied_losslessly(client, cohort, tmp_path):
    slides, annotations = _train(cohort)
    aligned = TilingConfig(target_mpp=None, level=0, patch_px=256, min_tissue_fraction=0.3)
    store = tmp_path / "copy.zarr"
    results = tile_slides(client, slides, store, aligned, annotations_dir=annotations)
    assert [r.status for r in results] == ["done", "done"]
    root = zarr.open_group(str(store), mode="r")
    for path in slides:
        group = root[path.stem]
        assert group.attrs["passthrough"] is True
        # Chunk files side by side, none left half-written.
        files = {p.name for p in (store / path.stem / "patches").iterdir()}
        n_chunks = -(-group["patches"].shape[0] // group["patches"].chunks[0])
        assert files == {"zarr.json"} | {f"c.{i}.0.0.0" for i in range(n_chunks)}
        patches, coords = group["patches"], group["coords"][:]
        with open_slide(path, direct=False) as slide:
            for i in range(patches.shape[0]):
                x, y = (int(v) for v in coords[i])
                np.testing.assert_array_equal(patches[i], slide.read_region((x, y), 0, (256, 256)))
    # Re-encoding instead: same patches within JPEG q90's error, not bit-exact.
    encoded = tile_slides(
        client, slides[:1], tmp_path / "enc.zarr", aligned.model_copy(update={"passthrough": False})
    )
    assert encoded[0].status == "done"
    group = zarr.open_group(str(tmp_path / "enc.zarr"), mode="r")[slides[0].stem]
    assert group.attrs["passthrough"] is False
    difference = np.abs(group["patches"][:].astype(int) - root[slides[0].stem]["patches"][:])
    assert 0 < difference.mean() < 4


def test_copied_slides_are_one_task_each_until_the_cohort_runs_out(client, cohort, tmp_path):
    """Slides of copied tiles are written by their plan task, the last few are spread out."""
    import tifffile
    from distributed import get_task_stream

    slides, _ = _train(cohort)
    inputs = tmp_path / "in"
    inputs.mkdir()
    # A slide whose level-0 tile byte counts (but those of the first and central tiles,
    # which planning checks) run past the end of the file: it plans fine and fails while
    # its tiles are copied.
    broken = inputs / "broken.tif"
    shutil.copy(slides[0], broken)
    with tifffile.TiffFile(broken, mode="r+b") as tif:
        checked = _tiles_checked_before_copying(tif.pages[0])
        counts = tif.pages[0].tags["TileByteCounts"]
        counts.overwrite([c if i in checked else c + 10**9 for i, c in enumerate(counts.value)])
    names = [broken]
    for i in range(2):
        for path in slides:
            name = inputs / f"{path.stem}_{i}.tif"
            os.link(path, name)
            names.append(name)
    config = TilingConfig(target_mpp=None, level=0, patch_px=256, min_tissue_fraction=0.3)
    store = tmp_path / "cohort.zarr"
    planned, written = [], []
    with get_task_stream(client) as stream:
        results = tile_slides(
            client, names, store, config, on_planned=planned.append, on_patches=written.append
        )
    assert [r.status for r in results] == ["failed"] + ["done"] * 4
    assert results[0].reason.startswith(str(broken))
    assert "cannot read level 0 tiles: tile" in results[0].reason
    assert sum(planned) == sum(written) == sum(r.patches for r in results[1:]) > 0
    # 2 workers: the first 3 slides (broken included) are one task each; the last 2 are
    # a plan and its extraction tasks, so that both workers share them.
    tasks = [t["key"].split("-")[0] for t in stream.data]
    assert tasks.count("plan_and_start") == 5
    block = [_block_patches(config, True, r.patches, workers=2) for r in results[-2:]]
    expected = sum(-(-r.patches // b) for r, b in zip(results[-2:], block, strict=True))
    assert tasks.count("extract_chunk") == expected
    root = zarr.open_group(str(store), mode="r")
    assert not root["broken"].attrs.get("complete")
    for result in results[1:]:
        group = root[result.slide_id]
        assert group.attrs["complete"] is True and group.attrs["passthrough"] is True
        assert group.attrs["patches"] == result.patches == group["patches"].shape[0]
    # Whole-task and spread-out copies of the same slide are the same store content.
    for path in slides:
        one, two = root[f"{path.stem}_0"], root[f"{path.stem}_1"]
        for name in ("patches", "coords", "labels", "tissue_fraction"):
            np.testing.assert_array_equal(one[name][:], two[name][:])
        with open_slide(path, direct=False) as slide:
            n = one["coords"].shape[0]
            for i in (0, n // 2, n - 1):
                x, y = (int(v) for v in one["coords"][i])
                np.testing.assert_array_equal(
                    one["patches"][i], slide.read_region((x, y), 0, (256, 256))
                )


def test_extraction_tasks_are_whole_chunks_shared_by_the_workers():
    config = TilingConfig(target_mpp=None, level=0, patch_px=256, chunk_patches=64)
    # 64 MB of raw pixels: 5 chunks of 64 patches of 256 px (12 MB each); copying tasks
    # 8x the bytes: 42 chunks.
    assert COPY_FACTOR == 8
    assert _block_patches(config, False, 100_000, workers=2) == 5 * 64
    assert _block_patches(config, True, 100_000, workers=2) == 42 * 64
    # Equal tasks, a multiple of the workers: 138 chunks are 4 x 35 on 1, 2 or 4 workers
    # (not 42, 42, 42, 12), 6 x 23 on 3.
    for workers, chunks in ((1, 35), (2, 35), (3, 23), (4, 35)):
        assert _block_patches(config, True, 137 * 64 + 22, workers=workers) == chunks * 64
    # A slide of 16 chunks still gives each of 2 (or 16) workers a task.
    assert _block_patches(config, True, 16 * 64 - 5, workers=2) == 8 * 64
    assert _block_patches(config, False, 16 * 64, workers=16) == 64
    assert _block_patches(config, False, 10, workers=4) == 64
    # Small patches: more of them per task.
    small = config.model_copy(update={"patch_px": 96})
    assert _block_patches(small, False, 100_000, workers=1) == 37 * 64


def test_aperio_tiles_are_copied_with_their_tables(client, aperio_slide, tmp_path):
    """Aperio's abbreviated RGB tiles get the page's tables and an Adobe marker, not a re-encode."""
    config = TilingConfig(target_mpp=None, level=0, patch_px=240)
    _assert_tiles_copied(client, aperio_slide, tmp_path, config)


def test_shared_table_rgb_tiles_are_copied(client, tmp_path):
    """A generated TIFF laid out as Aperio's: shared JPEGTables, RGB components numbered 0-2."""
    import tifffile

    from pipeline.synth.scene import make_scene

    image = make_scene(1024, 768, 0.25, seed=5, tumor=False).render(0, 0, 1024, 768)
    tables, tiles = _abbreviated_rgb_tiles(image, 256)
    path = tmp_path / "abbreviated.tif"
    tifffile.imwrite(
        path,
        iter(tiles),
        shape=image.shape,
        dtype=np.uint8,
        tile=(256, 256),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"outcolorspace": "RGB"},
        subsampling=(1, 1),
        jpegtables=tables,
        resolution=(1e4 / 0.25, 1e4 / 0.25),
        resolutionunit="CENTIMETER",
    )
    # The tables alone do not make the tiles decodable: read as YCbCr, the colours are wrong.
    with open_slide(path, direct=False) as slide:
        reference = slide.read_region((0, 0), 0, (256, 256))
    tables_only = PatchImageCodec(format="jpeg").decode_image(tables[:-2] + tiles[0][2:])
    assert np.abs(tables_only.astype(int) - reference).mean() > 20
    config = TilingConfig(target_mpp=None, level=0, patch_px=256, min_tissue_fraction=0.0)
    assert _assert_tiles_copied(client, path, tmp_path, config) == 12


def test_a_copied_tile_that_is_not_jpeg_fails_its_slide(client, cohort, tmp_path):
    """Bytes that are not a JPEG stream never go into the store as a patch."""
    import tifffile

    slides, _ = _train(cohort)
    broken = tmp_path / "notjpeg.tif"
    shutil.copy(slides[0], broken)
    with tifffile.TiffFile(broken) as tif:
        checked = _tiles_checked_before_copying(tif.pages[0])
        offsets = [o for i, o in enumerate(tif.pages[0].dataoffsets) if i not in checked]
    with open(broken, "r+b") as f:
        for offset in offsets:
            f.seek(offset)
            f.write(b"\0\0")
    config = TilingConfig(target_mpp=None, level=0, patch_px=256, min_tissue_fraction=0.3)
    store = tmp_path / "s.zarr"
    logged = _failures_logged_by_workers(client)
    bad, good = tile_slides(client, [broken, slides[1]], store, config)
    assert _failures_logged_by_workers(client) == logged
    assert bad.status == "failed" and good.status == "done"
    assert bad.reason.startswith(f"{broken}: cannot read level 0 tiles: tile ")
    assert bad.reason.endswith("is not a JPEG stream (starts with 0000)")
    assert not zarr.open_group(str(store), mode="r")["notjpeg"].attrs.get("complete")


def _abbreviated_rgb_tiles(image: np.ndarray, tile_px: int) -> tuple[bytes, list[bytes]]:
    """JPEG tiles of ``image`` as Aperio stores them: the shared tables, and each tile without.

    The components are R, G, B with ids 0, 1, 2 and no APP marker, so nothing in
    a tile says it is not YCbCr.
    """
    import imagecodecs

    tables, tiles = None, []
    for y in range(0, image.shape[0], tile_px):
        for x in range(0, image.shape[1], tile_px):
            stream = imagecodecs.jpeg8_encode(
                image[y : y + tile_px, x : x + tile_px],
                level=80,
                colorspace="RGB",
                outcolorspace="RGB",
            )
            pos, shared, own = 2, [], []
            while stream[pos : pos + 2] != b"\xff\xda":  # segments up to the scan's
                length = int.from_bytes(stream[pos + 2 : pos + 4], "big")
                segment = bytearray(stream[pos : pos + 2 + length])
                if segment[1] in (0xDB, 0xC4):  # quantisation and Huffman tables
                    shared.append(bytes(segment))
                elif segment[1] == 0xC0:  # frame header: component ids 'R', 'G', 'B' -> 0, 1, 2
                    segment[10::3] = bytes(range(3))
                    own.append(bytes(segment))
                elif not 0xE0 <= segment[1] <= 0xEF:  # APP markers (Adobe's) dropped
                    own.append(bytes(segment))
                pos += 2 + length
            scan = bytearray(stream[pos:])
            scan[5:11:2] = bytes(range(3))  # the scan header's component ids
            shared_tables = b"\xff\xd8" + b"".join(shared) + b"\xff\xd9"
            assert tables in (None, shared_tables)
            tables = shared_tables
            tiles.append(b"\xff\xd8" + b"".join(own) + bytes(scan))
    assert tables is not None
    return tables, tiles


def _assert_tiles_copied(client, slide_path, tmp_path, config) -> int:
    """Tile ``slide_path`` with ``config``: tiles copied, each patch OpenSlide's exactly.

    Re-encoding instead (``passthrough: false``) gives the same patches within
    JPEG q90's error (a mean of ~6 grey levels on real H&E). Returns the number of patches.
    """
    (result,) = tile_slides(client, [slide_path], tmp_path / "copy.zarr", config)
    assert result.status == "done"
    group = zarr.open_group(str(tmp_path / "copy.zarr"), mode="r")[slide_path.stem]
    assert group.attrs["passthrough"] is True
    patches, coords = group["patches"][:], group["coords"][:]
    size = config.patch_px
    with open_slide(slide_path, direct=False) as slide:
        for patch, (x, y) in zip(patches, coords, strict=True):
            np.testing.assert_array_equal(
                patch, slide.read_region((int(x), int(y)), 0, (size, size))
            )
    reencode = config.model_copy(update={"passthrough": False})
    (result,) = tile_slides(client, [slide_path], tmp_path / "enc.zarr", reencode)
    group = zarr.open_group(str(tmp_path / "enc.zarr"), mode="r")[slide_path.stem]
    assert result.status == "done" and group.attrs["passthrough"] is False
    difference = np.abs(group["patches"][:].astype(int) - patches)
    assert 0 < difference.mean() < 8
    return len(patches)


def test_slide_without_mpp_needs_a_level(client, tmp_path):
    from pipeline.synth.scene import make_scene

    scene = make_scene(2048, 2048, 0.25, seed=9, tumor=False)
    path = tmp_path / "nompp.tif"
    write_pyramid_tiff(path, 2048, 2048, scene.render, mpp=None)
    with open_slide(path) as slide:
        assert slide.info.mpp_xy is None
    store = tmp_path / "s.zarr"
    (by_mpp,) = tile_slides(client, [path], store, TilingConfig(target_mpp=0.5, patch_px=64))
    assert by_mpp.status == "failed"
    assert by_mpp.reason == (
        f"{path}: the slide records neither a pixel size (mpp) nor an objective power, so "
        "--mpp cannot be honoured; give --slide-mpp M (the scan's µm/px) or use --level to "
        "read a pyramid level at the scan's own resolution"
    )
    (by_level,) = tile_slides(
        client, [path], store, TilingConfig(target_mpp=None, level=1, patch_px=64)
    )
    assert by_level.status == "done" and by_level.patches > 50
    group = zarr.open_group(str(store), mode="r")["nompp"]
    assert group.attrs["mpp"] is None and group.attrs["patch_mpp"] is None


def test_resolutions_a_slide_cannot_give_fail_that_slide_and_redo_nothing(client, cohort, tmp_path):
    """Upsampling beyond tiling.max_upsample and patches larger than the slide are refused."""
    slides, _ = _train(cohort)
    store = tmp_path / "s.zarr"
    first = tile_slides(client, slides[:1], store, TilingConfig(patch_px=48))
    assert [r.status for r in first] == ["done"]
    # The guard stores nothing, so changing it does not redo a complete slide.
    same = tile_slides(client, slides[:1], store, TilingConfig(patch_px=48, max_upsample=4))
    assert [r.status for r in same] == ["skipped"]

    (upsampled,) = tile_slides(client, slides[:1], store, TilingConfig(target_mpp=0.05))
    assert upsampled.status == "failed"
    assert upsampled.reason == (
        f"{slides[0]}: patches at 0.05 µm/px would be upsampled 4.9x from the slide's finest "
        "level (0.243 µm/px); more than 2x is refused (tiling.max_upsample); check --mpp "
        "(tiling.target_mpp)"
    )
    (huge,) = tile_slides(client, slides[:1], store, TilingConfig(target_mpp=20, patch_px=256))
    assert huge.status == "failed"
    width_um, height_um = 4096 * 0.243, 3072 * 0.243
    assert huge.reason == (
        f"{slides[0]}: one patch (256 px at 20 µm/px = 5,120 µm) is larger than the slide "
        f"({width_um:,.0f} x {height_um:,.0f} µm)"
    )
    # The slide's complete group from the first run is kept.
    assert zarr.open_group(str(store), mode="r")[slides[0].stem].attrs["complete"] is True


def test_a_slide_with_two_annotation_files_fails_naming_both(client, cohort, tmp_path):
    """An ASAP XML and a QuPath export of the same slide may disagree: no silent choice."""
    slides, annotations = _train(cohort)
    both = tmp_path / "annotations"
    shutil.copytree(annotations, both)
    stem = slides[0].stem
    assert (both / f"{stem}.xml").is_file()
    (both / f"{stem}.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    results = tile_slides(
        client, slides, tmp_path / "s.zarr", TilingConfig(patch_px=48), annotations_dir=both
    )
    by_id = {r.slide_id: r for r in results}
    assert by_id[stem].status == "failed"
    assert by_id[stem].reason == (
        f"{both}: 2 annotation files for slide {stem!r} ({stem}.xml, {stem}.geojson); keep one"
    )
    assert [by_id[p.stem].status for p in slides[1:]] == ["done"] * len(slides[1:])
