"""Prefect flows over the pipeline's stages: tile, train, infer, evaluate, camelyon, mnist.

Tasks are thin wrappers over functions in ``pipeline`` and ``models``;
per-slide work is one task per slide on prefect-dask's DaskTaskRunner.
Run them with ``wsiflow flow NAME`` (or each module's ``run``), which
starts a temporary local Prefect API when ``PREFECT_API_URL`` is unset and
tells the Dask workers about it; called directly from Python, wrap them in
:func:`flows.runtime.prefect_api`.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Flow name -> module of ``flows`` defining ``<name>_flow`` and ``run``.
FLOW_NAMES = ("tile", "train", "infer", "evaluate", "camelyon", "mnist")


def get_flow(name: str) -> Any:
    """The Prefect flow object called ``name`` (imports its module only)."""
    if name not in FLOW_NAMES:
        raise KeyError(f"Expected one of {', '.join(FLOW_NAMES)}. Got {name!r} instead.")
    return getattr(importlib.import_module(f"flows.{name}"), f"{name}_flow")
