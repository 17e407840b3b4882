"""A slide-level classifier on heatmap features (HMS-MIT's random forest), kept with the model.

Fitted on heatmaps of labelled slides (``wsiflow slide-classifier``, or the
``camelyon`` flow on out-of-fold heatmaps of the training slides) and used
by ``wsiflow infer`` for ``scores.csv`` with ``inference.slide_score:
classifier``. Two files go into the patch model's directory::

    slide_classifier.joblib   the fitted scikit-learn estimator
    slide_classifier.json     kind, thresholds, features, the slides it was fitted on (label,
                              whether the patch model trained on them), its out-of-fold AUC
                              and the heatmap maximum's AUC on the same slides

Both are written under temporary names and renamed, the JSON last: a
classifier counts only once its JSON names the estimator file's SHA-256
(a content hash, so the model directory can move).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.config import SlideClassifierConfig
from pipeline.errors import ModelError, ResultsError
from pipeline.identity import fingerprint
from pipeline.inference.results import SCORES, heatmap_path, read_heatmap, read_scores
from pipeline.inference.slide_features import feature_names, slide_features
from pipeline.outputs import atomic, write_atomic

ESTIMATOR_FILE = "slide_classifier.joblib"
METADATA_FILE = "slide_classifier.json"
KINDS = ("random_forest", "gradient_boosting")
#: Where the µm/px is unknown, a cell counts as 1 mm: areas and lengths then count cells.
UNKNOWN_CELL_UM = 1000.0


def cell_um(attrs: dict[str, Any]) -> tuple[float, float]:
    """A heatmap cell's width and height in µm, from its attributes (stride x patch µm/px)."""
    patch_mpp, stride_px = attrs.get("patch_mpp"), attrs.get("stride_px")
    if patch_mpp is None or stride_px is None:
        return (UNKNOWN_CELL_UM, UNKNOWN_CELL_UM)
    side = float(stride_px) * float(patch_mpp)
    return (side, side)


def heatmap_features(
    heatmap: np.ndarray, attrs: dict[str, Any], thresholds: Sequence[float]
) -> np.ndarray:
    """:func:`~pipeline.inference.slide_features.slide_features` of a heatmap and its attributes."""
    return slide_features(heatmap, cell_um(attrs), thresholds)


@dataclass(frozen=True)
class LabelledSlide:
    """One slide's features for fitting: ``tumor`` its label, ``in_sample`` if the model saw it."""

    slide_id: str
    tumor: bool
    features: np.ndarray
    in_sample: bool
    source: str  # the inference folder its heatmap is in


def labelled_slides(
    results_dirs: Sequence[Path], labels: dict[str, bool], thresholds: Sequence[float]
) -> tuple[list[LabelledSlide], list[str]]:
    """The complete slides of ``wsiflow infer`` folders that ``labels`` names, and the others.

    ``in_sample`` is whether the model that made a slide's heatmap trained or
    validated on that slide. Raises :class:`ResultsError` for a folder that
    is not an inference folder or a slide in two of them.
    """
    from pipeline.inference.predict import seen_slides

    by_name = {name.casefold(): tumor for name, tumor in labels.items()}
    slides: list[LabelledSlide] = []
    unlabelled: list[str] = []
    seen: dict[str, set[str]] = {}
    where: dict[str, Path] = {}
    for results in map(Path, results_dirs):
        scores = results / SCORES
        if not scores.is_file():
            raise ResultsError(results, "not a `wsiflow infer` output folder (no scores.csv)")
        for slide_id in read_scores(scores):  # the complete slides
            if slide_id.casefold() in where:
                raise ResultsError(
                    results, f"slide {slide_id} is also in {where[slide_id.casefold()]}"
                )
            where[slide_id.casefold()] = results
            tumor = by_name.get(slide_id.casefold())
            if tumor is None:
                unlabelled.append(slide_id)
                continue
            heatmap, attrs = read_heatmap(heatmap_path(results, slide_id))
            model_dir = str(attrs.get("model_dir"))
            if model_dir not in seen:
                seen[model_dir] = {s.casefold() for s in seen_slides(model_dir)}
            slides.append(
                LabelledSlide(
                    slide_id,
                    tumor,
                    heatmap_features(heatmap, attrs, thresholds),
                    slide_id.casefold() in seen[model_dir],
                    str(results),
                )
            )
    return slides, unlabelled


def make_estimator(kind: str, trees: int, seed: int) -> Any:
    """An unfitted scikit-learn classifier of ``kind`` (:data:`KINDS`)."""
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier

    if kind == "random_forest":
        return RandomForestClassifier(n_estimators=trees, random_state=seed, n_jobs=1)
    if kind == "gradient_boosting":
        return HistGradientBoostingClassifier(max_iter=trees, random_state=seed)
    raise ValueError(f"Expected a kind in {KINDS}. Received: kind={kind!r}")


def fit_slide_classifier(
    slides: Sequence[LabelledSlide],
    thresholds: Sequence[float],
    *,
    kind: str = "random_forest",
    trees: int = 500,
    seed: int = 0,
) -> tuple[Any, dict[str, Any]]:
    """Fit on ``slides``; the estimator and its metadata (see the module's docstring).

    Raises ``ValueError`` unless both labels are present. The out-of-fold
    AUC is the classifier's own (stratified folds over the slides, at most
    5, at least 2 slides of each label per fold when there are that many).
    """
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    labels = np.array([s.tumor for s in slides], dtype=np.int64)
    n_tumor, n_normal = int(labels.sum()), int(len(labels) - labels.sum())
    if not n_tumor or not n_normal:
        raise ValueError(
            "Expected heatmaps of both tumor and normal slides. Got "
            f"{n_tumor} tumor and {n_normal} normal instead."
        )
    features = np.stack([s.features for s in slides])
    # The heatmap maximum's AUC on the same slides: what the classifier has to beat.
    maximum = features[:, feature_names(thresholds).index("max_probability")]
    maximum_auc = float(roc_auc_score(labels, maximum))
    folds = min(5, n_tumor, n_normal)
    oof_auc = None
    if folds >= 2:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        oof = cross_val_predict(
            make_estimator(kind, trees, seed), features, labels, cv=splitter, method="predict_proba"
        )[:, 1]
        oof_auc = float(roc_auc_score(labels, oof))
    estimator = make_estimator(kind, trees, seed).fit(features, labels)
    metadata = {
        "kind": kind,
        "trees": trees,
        "seed": seed,
        "thresholds": [float(t) for t in thresholds],
        "features": feature_names(thresholds),
        "slides": [
            {"slide_id": s.slide_id, "tumor": s.tumor, "in_sample": s.in_sample, "source": s.source}
            for s in slides
        ],
        "in_sample": sum(s.in_sample for s in slides),
        "out_of_fold_auc": oof_auc,
        "out_of_fold_folds": folds if oof_auc is not None else 0,
        "maximum_auc": maximum_auc,
    }
    return estimator, metadata


def save_slide_classifier(model_dir: Path, estimator: Any, metadata: dict[str, Any]) -> Path:
    """Write the estimator, then its JSON (which makes it count); the JSON's path."""
    import joblib
    import sklearn

    model_dir = Path(model_dir)
    with atomic(model_dir / ESTIMATOR_FILE) as partial:
        joblib.dump(estimator, partial)
    record = {
        **metadata,
        "estimator": _digest(model_dir / ESTIMATOR_FILE),
        "sklearn_version": sklearn.__version__,
        "wsiflow_version": __version__,
    }
    path = model_dir / METADATA_FILE
    write_atomic(path, json.dumps(record, indent=2) + "\n")
    return path


def assign_folds(labels: dict[str, bool], folds: int, seed: int) -> list[list[str]]:
    """Slide ids in ``folds`` groups, each label spread evenly (shuffled with ``seed``).

    The slides of each label are shuffled and dealt in turn, tumor first, the
    deal going on from fold to fold across labels, so fold sizes differ by at
    most one. Raises ``ValueError`` for fewer slides of a label than folds.
    """
    rng = np.random.default_rng(seed)
    groups: list[list[str]] = [[] for _ in range(folds)]
    dealt = 0
    for tumor in (True, False):
        names = sorted(name for name, label in labels.items() if label is tumor)
        if len(names) < folds:
            raise ValueError(
                f"Expected at least {folds} {'tumor' if tumor else 'normal'} slides for "
                f"{folds} folds. Got {len(names)} instead."
            )
        for name in rng.permutation(names):
            groups[dealt % folds].append(str(name))
            dealt += 1
    return [sorted(group) for group in groups]


def fit_from_results(
    model_dir: Path | str,
    results_dirs: Sequence[Path | str],
    labels: dict[str, bool],
    cfg: SlideClassifierConfig,
) -> dict[str, Any]:
    """Fit the slide classifier of ``model_dir`` on inference folders' heatmaps; a summary.

    The one engine behind ``wsiflow slide-classifier`` and the ``camelyon``
    flow. A classifier already fitted on the same features, labels and
    settings is kept (``reused``), so a rerun does not rescore every slide.
    The summary says how many heatmaps the patch model had seen in training
    (``in_sample``: their heatmaps are more confident than a new slide's)
    and which complete slides had no label.
    """
    from pipeline.inference.predict import model_spec

    model_dir = Path(model_dir)
    model_spec(model_dir)  # a finished patch model, or ModelError
    slides, unlabelled = labelled_slides([Path(r) for r in results_dirs], labels, cfg.thresholds)
    inputs = fingerprint(
        {
            "config": cfg.model_dump(mode="json", exclude={"enabled", "folds"}),
            "slides": [[s.slide_id, s.tumor, s.in_sample, s.features.tolist()] for s in slides],
        }
    )
    metadata = _existing(model_dir, inputs)
    reused = metadata is not None
    if metadata is None:
        estimator, metadata = fit_slide_classifier(
            slides, cfg.thresholds, kind=cfg.kind, trees=cfg.trees, seed=cfg.seed
        )
        save_slide_classifier(model_dir, estimator, {**metadata, "inputs": inputs})
    return {
        "model_dir": str(model_dir),
        "classifier": str(model_dir / METADATA_FILE),
        "reused": reused,
        "kind": cfg.kind,
        "slides": len(slides),
        "tumor": sum(s.tumor for s in slides),
        "normal": sum(not s.tumor for s in slides),
        "in_sample": metadata["in_sample"],
        "unlabelled": unlabelled,
        "out_of_fold_auc": metadata["out_of_fold_auc"],
        "maximum_auc": metadata.get("maximum_auc"),  # None: fitted before it was recorded
    }


def describe(summary: dict[str, Any]) -> str:
    """One line on a fitted classifier from :func:`fit_from_results`'s summary.

    What every front end prints (the CLI, the ``slide-classifier`` and
    ``camelyon`` flows): the estimator, the heatmaps it learnt from (with
    ``folds`` where a flow made them), its own out-of-fold AUC and, what it
    has to beat, the heatmap maximum's AUC on the same slides.
    """
    folds = f"{summary['folds']} folds, " if "folds" in summary else ""
    auc, maximum = summary["out_of_fold_auc"], summary.get("maximum_auc")
    return (
        f"{summary['kind']} on {summary['slides']} heatmaps ({summary['tumor']} tumor, "
        f"{summary['normal']} normal; {folds}{summary['in_sample']} in-sample); its own "
        "out-of-fold AUC " + ("undefined (too few slides)" if auc is None else f"{auc:.4f}")
        + ("" if maximum is None else f" (the heatmap maximum's: {maximum:.4f})")
    )  # fmt: skip


def _existing(model_dir: Path, inputs: str) -> dict[str, Any] | None:
    """The saved classifier's metadata if it was fitted on ``inputs`` and is intact."""
    try:
        metadata = read_classifier_metadata(model_dir)
        intact = _digest(model_dir / ESTIMATOR_FILE) == metadata["estimator"]
    except ModelError:
        return None
    return metadata if intact and metadata.get("inputs") == inputs else None


class SlideClassifier:
    """A saved classifier: :meth:`score` gives a slide's tumor probability from its heatmap."""

    def __init__(self, model_dir: Path | str):
        import joblib

        self.model_dir = Path(model_dir)
        self.metadata = read_classifier_metadata(self.model_dir)
        path = self.model_dir / ESTIMATOR_FILE
        if _digest(path) != self.metadata.get("estimator"):
            raise ModelError(
                path, f"not the estimator {METADATA_FILE} names (changed or half-written): refit it"
            )
        try:
            self.estimator = joblib.load(path)
        except Exception as exc:  # unpickling raises anything
            raise ModelError(path, f"cannot load the slide classifier: {exc}") from exc
        self.thresholds = tuple(self.metadata["thresholds"])

    @property
    def identity(self) -> dict[str, Any]:
        """What decides whether scores change: the estimator file and the features."""
        return {"estimator": self.metadata["estimator"], "features": self.metadata["features"]}

    def score(self, heatmap: np.ndarray, attrs: dict[str, Any]) -> float:
        """The tumor probability of the slide whose heatmap and attributes are given."""
        features = heatmap_features(heatmap, attrs, self.thresholds)
        return float(self.estimator.predict_proba(features[None, :])[0, 1])


def read_classifier_metadata(model_dir: Path | str) -> dict[str, Any]:
    """``slide_classifier.json`` of ``model_dir``; :class:`ModelError` if absent or unreadable."""
    path = Path(model_dir) / METADATA_FILE
    try:
        metadata = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(
            path, "the model has no slide classifier: fit one with `wsiflow slide-classifier`"
        ) from None
    except (OSError, ValueError) as exc:
        raise ModelError(path, f"not a readable slide classifier record: {exc}") from exc
    if not isinstance(metadata, dict) or not {"thresholds", "features", "estimator"} <= set(
        metadata
    ):
        raise ModelError(path, "not a slide classifier record (thresholds, features, estimator)")
    return metadata


def _digest(path: Path) -> str:
    """``sha256:<hex>`` of a file; :class:`ModelError` if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as exc:
        raise ModelError(path, f"cannot read the slide classifier: {exc.strerror}") from exc


_lock = threading.Lock()
_loaded: dict[tuple[str, str], SlideClassifier] = {}


def cached_slide_classifier(model_dir: Path | str) -> SlideClassifier:
    """This process's :class:`SlideClassifier` of ``model_dir`` (reloaded when refitted)."""
    metadata = read_classifier_metadata(model_dir)
    key = (str(Path(model_dir).resolve()), str(metadata["estimator"]))
    with _lock:
        classifier = _loaded.get(key)
        if classifier is None:
            _loaded.clear()
            classifier = _loaded[key] = SlideClassifier(model_dir)
    return classifier
