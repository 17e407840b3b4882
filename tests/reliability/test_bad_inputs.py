"""Bad inputs and odd options: each its own one-line reason, never silence or a traceback."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pipeline.cluster import dask_client
from tests.conftest import APERIO_SLIDE, last_json, run


@pytest.fixture
def good_slide(small_cohort, tmp_path) -> Path:
    folder = tmp_path / "slides"
    folder.mkdir()
    record = next(r for r in small_cohort.slides if r.label == "Normal")
    return Path(shutil.copy(small_cohort.root / record.image, folder / "good.tif"))


def test_links_that_lead_nowhere_are_reported_not_dropped(good_slide, tmp_path):
    folder = good_slide.parent
    (folder / "dangling.tif").symlink_to(tmp_path / "moved-away.tif")
    (folder / "loop.tif").symlink_to("loop.tif")
    store = tmp_path / "s.zarr"
    result = run("tile", str(folder), "--out", str(store), "-w", "1", "--json")
    assert result.returncode == 1, result.stderr
    reasons = {Path(f["path"]).name: f["reason"] for f in last_json(result)["failures"]}
    assert set(reasons) == {"dangling.tif", "loop.tif"}
    assert "a broken link: its target" in reasons["dangling.tif"]
    assert str(tmp_path / "moved-away.tif") in reasons["dangling.tif"]
    assert "a link loop" in reasons["loop.tif"]
    assert last_json(result)["done"] == 1
    assert "Traceback" not in result.stderr


def test_a_truncated_slide_says_it_is_truncated(tmp_path):
    if not APERIO_SLIDE.is_file():
        pytest.skip(f"real slide not present: {APERIO_SLIDE}")
    # Aperio writes its directories after the tiles: a copy cut short loses them.
    cut = tmp_path / "cut.svs"
    cut.write_bytes(APERIO_SLIDE.read_bytes()[: APERIO_SLIDE.stat().st_size * 3 // 4])
    result = run("info", str(cut))
    assert result.returncode == 1
    assert "truncated or corrupt: a TIFF of" in result.stderr and "cut short" in result.stderr
    assert "not a slide format" not in result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file: no permission to deny")
def test_a_slide_without_read_permission_says_so(good_slide):
    good_slide.chmod(0)
    try:
        result = run("info", str(good_slide))
    finally:
        good_slide.chmod(0o644)
    assert result.returncode == 1
    assert "cannot read the file: Permission denied" in result.stderr


def test_workers_are_bounded_by_memory_and_warned_above_the_cores(good_slide, tmp_path):
    too_many = run("tile", str(good_slide), "--out", str(tmp_path / "a.zarr"), "-w", "100000")
    assert too_many.returncode == 2
    assert "Expected at most" in too_many.stderr and "Got 100000 instead" in too_many.stderr
    assert not (tmp_path / "a.zarr").exists()
    cores = os.cpu_count() or 1
    more = run("tile", str(good_slide), "--out", str(tmp_path / "b.zarr"), "-w", str(cores + 1))
    assert more.returncode == 0, more.stderr
    assert f"--workers {cores + 1} is more than this machine's {cores} cores" in more.stderr
    synth = run("synth", str(tmp_path / "c"), "--workers", "0")
    assert synth.returncode == 2 and "--workers" in synth.stderr


def test_a_second_run_beside_a_first_prints_no_port_warning(good_slide, tmp_path):
    with dask_client(workers=1):  # holds the HTTP port a first run would take
        result = run("tile", str(good_slide), "--out", str(tmp_path / "s.zarr"), "-w", "1")
    assert result.returncode == 0, result.stderr
    assert "already in use" not in result.stderr and "Port" not in result.stderr


def test_duplicate_yaml_keys_and_size_errors_are_one_clear_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("tiling:\n  patch_px: 64\n  codec: zstd\n  patch_px: 128\n")
    result = run("config", str(config))
    assert result.returncode == 2
    assert f"{config}:4: tiling.patch_px: given twice (lines 2 and 4)" in result.stderr
    size = run("synth", str(tmp_path / "s"), "--size", "12")
    assert size.returncode == 2
    assert size.stderr.count("--size") == 1, size.stderr


def test_a_degenerate_lesion_or_unknown_group_never_sinks_a_tumor_slide(small_cohort, tmp_path):
    """A real CAMELYON16 annotation has a 2-vertex lesion; exports rename groups."""
    import xml.etree.ElementTree as ET

    record = next(r for r in small_cohort.slides if r.label == "Tumor")
    slide = small_cohort.root / record.image
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    xml = annotations / f"{slide.stem}.xml"
    tree = ET.parse(small_cohort.root / record.annotation)
    parent = tree.getroot().find("Annotations")
    for name, group, points in (("Two", "_0", 2), ("Other", "stroma", 4)):
        element = ET.SubElement(parent, "Annotation", Name=name, Type="Polygon", PartOfGroup=group)
        coordinates = ET.SubElement(element, "Coordinates")
        for order in range(points):
            ET.SubElement(
                coordinates, "Coordinate", Order=str(order), X=str(100 + 9 * order),
                Y=str(100 + 7 * order * order),
            )  # fmt: skip
    tree.write(xml)
    result = run(
        "tile", str(slide), "--out", str(tmp_path / "s.zarr"), "--annotations", str(annotations),
        "--level", "0", "--patch-size", "128", "-w", "1", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (row,) = last_json(result)["per_slide"]
    assert row["status"] == "done" and row["tumor_patches"] > 0
    assert f"warning: {xml}: annotation 'Two' left out: 2 distinct vertices" in result.stderr
    assert "group(s) 'stroma' (1) left out" in result.stderr
    assert len(row["warnings"]) == 2
