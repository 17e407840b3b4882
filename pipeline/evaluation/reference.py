"""The CAMELYON16 reference: which slides are tumor, from its ``reference.csv``."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from pipeline.errors import ResultsError


def read_reference(path: Path) -> dict[str, bool]:
    """``{slide: is_tumor}`` from CAMELYON16's ``reference.csv`` (``name,Tumor|Normal[,...]``)."""
    try:
        rows = list(csv.reader(io.StringIO(Path(path).read_text(encoding="utf-8"))))
    except (OSError, UnicodeDecodeError) as exc:
        raise ResultsError(path, f"cannot read the reference: {exc}") from exc
    reference: dict[str, bool] = {}
    for number, row in enumerate(rows, start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        label = row[1].strip().lower() if len(row) > 1 else ""
        if number == 1 and label not in ("tumor", "normal"):
            continue  # a header line
        if label not in ("tumor", "normal"):
            raise ResultsError(
                path,
                f"line {number}: Expected 'name,Tumor[,Macro|Micro]' or 'name,Normal'. "
                f"Got {','.join(row)!r} instead.",
            )
        name = Path(row[0].strip()).stem  # "test_001" or "test_001.tif"
        if name in reference:
            raise ResultsError(path, f"line {number}: slide {name!r} is listed twice")
        reference[name] = label == "tumor"
    if not reference:
        raise ResultsError(path, "no slides in the reference")
    return reference
