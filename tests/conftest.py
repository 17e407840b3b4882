"""Shared fixtures: small real slides generated with the project's own writer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
APERIO_SLIDE = SHARED_DATA / "slides" / "CMU-1-Small-Region.svs"
WSIFLOW = str(Path(sys.executable).parent / "wsiflow")


def run(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    return subprocess.run(
        [WSIFLOW, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False
    )


def last_json(result: subprocess.CompletedProcess) -> dict:
    """The JSON summary a command prints as its last stdout line with --json."""
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def aperio_slide() -> Path:
    """The real Aperio slide from ../shared/data (skips where this checkout has none)."""
    if not APERIO_SLIDE.is_file():
        pytest.skip(
            f"real slide not present: {APERIO_SLIDE} (../shared/data is beside CI's clone only)"
        )
    return APERIO_SLIDE


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory: pytest.TempPathFactory):
    """A 4-slide CAMELYON16-format cohort of 3072 x 2560 px slides (generated once)."""
    from pipeline.config import SyntheticConfig
    from pipeline.synth.cohort import write_cohort

    root = tmp_path_factory.mktemp("cohort")
    params = SyntheticConfig(slides=4, seed=7, width_px=3072, height_px=2560)
    return write_cohort(root, params, workers=2)
