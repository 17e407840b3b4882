"""Slide ids: a repeated id is one failure naming both files, the same in every stage."""

from __future__ import annotations

from pathlib import Path

from pipeline.inference.driver import unique_slides
from pipeline.tiling.driver import make_jobs


def test_a_repeated_slide_id_fails_naming_both_files_in_tiling_and_inference():
    slides = [Path("a/case1.tif"), Path("b/case2.svs"), Path("b/case1.svs"), Path("c/case1.tif")]
    jobs, failed = make_jobs(slides, annotations_dir=None)
    assert [job.path for job in jobs] == [Path("a/case1.tif"), Path("b/case2.svs")]
    reasons = [
        "b/case1.svs: duplicate slide id 'case1' (also a/case1.tif)",
        "c/case1.tif: duplicate slide id 'case1' (also a/case1.tif)",
    ]
    assert [(r.slide_id, r.status, r.reason) for r in failed] == [
        ("case1", "failed", reason) for reason in reasons
    ]
    unique, duplicates = unique_slides(slides)
    assert unique == [Path("a/case1.tif"), Path("b/case2.svs")]
    assert [(r.path, r.status, r.reason) for r in duplicates] == [
        ("b/case1.svs", "failed", reasons[0]),
        ("c/case1.tif", "failed", reasons[1]),
    ]
