"""Prefect artifacts: the numbers users look for, as tables and markdown in the UI."""

from __future__ import annotations

import re
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact


def _key(name: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")


def slides_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    """One row per slide (status, numbers, reason when it failed)."""
    create_table_artifact(key=_key(key), table=rows, description=description)


def metric(value: float | None) -> str:
    """A summary's metric: 4 decimals, or "undefined" (e.g. an AUC without both labels)."""
    return "undefined" if value is None else f"{value:.4f}"


def summary_markdown(key: str, title: str, lines: list[tuple[str, Any]]) -> None:
    """A short markdown table of what / value, e.g. validation AUC or the heatmap folder."""
    body = "\n".join(f"| {what} | {value} |" for what, value in lines)
    create_markdown_artifact(
        key=_key(key),
        markdown=f"# {title}\n\n| what | value |\n|---|---|\n{body}\n",
        description=title,
    )
