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


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lstrip("#").strip().lower())
    return text.replace(" ", "-")


def test_readme_is_short_and_every_doc_link_resolves():
    """README <= 300 lines; every relative link in it and docs/ names a file and heading."""
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= 300
    pages = [readme, *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 10
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # http(s): and mailto: are not checked offline
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md":
                headings = re.findall(r"^#+ .*$", linked.read_text(), flags=re.M)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_nothing_outside_tests_and_the_demo_points_outside_the_repository():
    """`../shared` is for tests, benchmarks, CI and the demo's config; docs say so only there."""
    allowed = {"configs/demo.yaml", "docs/development.md", "pyproject.toml", "BENCHMARKS.md"}
    files = [p for p in ROOT.iterdir() if p.is_file()]
    for folder in ("pipeline", "models", "flows", "configs", "docs"):
        files += [p for p in (ROOT / folder).rglob("*") if p.is_file()]
    offenders = [
        p.relative_to(ROOT).as_posix()
        for p in files
        if p.suffix in {".py", ".md", ".yaml", ".toml", ".html", ".js", ""}
        and p.relative_to(ROOT).as_posix() not in allowed
        and re.search(r"\.\./shared|PERF_NOTES|STYLE\.md", p.read_text(errors="ignore"))
    ]
    assert len(files) > 50 and not offenders, offenders


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_gpu_script_says_in_one_line_that_there_is_no_gpu(tmp_path):
    """benchmarks/gpu.sh stops before installing or writing anything where no GPU is."""
    results = tmp_path / "gpu-results.txt"
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(results)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr == (
        "error: no NVIDIA GPU here (nvidia-smi finds none); run this on a machine with one\n"
    )
    assert not results.exists()


def test_the_stages_reach_models_through_one_seam():
    """Only pipeline/inference/predict.py imports ``models`` (the CLI, a front end, may too)."""
    import ast

    importers = set()
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        if "cli" in path.relative_to(ROOT / "pipeline").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            if any(n == "models" or n.startswith("models.") for n in names):
                importers.add(str(path.relative_to(ROOT)))
    assert importers == {"pipeline/inference/predict.py"}
