"""wsiflow: whole-slide pathology from a folder of slides to heatmaps and metrics.

The `pipeline` package holds the pure computation (slides, annotations,
synthetic cohorts, configuration) and the thin `wsiflow` CLI at its edge.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wsiflow")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
