"""Packaging facts users rely on: dependency bounds, the console script, a lint-clean Dockerfile."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return project["dependencies"] + extras


@pytest.mark.parametrize("requirement", _requirements())
def test_every_dependency_has_lower_and_upper_bounds(requirement):
    spec = requirement.split(";")[0]
    assert re.search(r">=\s*\d", spec), f"no lower bound: {requirement}"
    assert re.search(r"<\s*\d", spec), f"no upper bound: {requirement}"


def test_console_script_is_installed():
    assert (Path(sys.executable).parent / "wsiflow").is_file()


def test_dockerfile_is_lint_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_the_viewer_port():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M)
    assert 'ENTRYPOINT ["wsiflow"]' in text
    assert "EXPOSE 8000" in text
    assert "ARG VARIANT=cpu" in text and "tensorflow[and-cuda]" in text


@pytest.mark.slow
def test_wheel_ships_the_viewer_templates_and_openseadragon(tmp_path):
    """A non-editable install (the Docker image) has the viewer's assets, not only its code."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", str(ROOT), "-w", str(tmp_path)],
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    import zipfile

    (wheel,) = tmp_path.glob("wsiflow-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in (
        "pipeline/viewer/templates/index.html",
        "pipeline/viewer/templates/slide.html",
        "pipeline/viewer/static/openseadragon/openseadragon.min.js",
        "pipeline/viewer/static/openseadragon/LICENSE.txt",
        "pipeline/viewer/static/openseadragon/images/zoomin_rest.png",
    ):
        assert name in names, name
