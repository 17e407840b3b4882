"""Mine a patch store's hard negatives with a trained model, and record them in the store.

For each slide the model trained on, the candidates (:mod:`pipeline.mining.rules`)
are read chunk by chunk (only they are decoded), predicted in batches, and
those the model calls tumor at ``threshold`` or above are recorded beside
the slide's patches, not copied, one record per mining model (``KEY``: the
first 16 hex digits of its metadata fingerprint, so that the model's folder
can move, and the models of the slide classifier's folds mine the same store)::

    SLIDE/hard_negatives/KEY/index         (M,) int32   rows of SLIDE/patches
    SLIDE/hard_negatives/KEY/probability   (M,) float32 the mining model's tumor probability
    SLIDE/hard_negatives/KEY attrs         model directory and identity, threshold,
                                           margin_um, candidate and near-annotation counts,
                                           fingerprint, complete (written last)

A slide whose record is complete for the same slide group, model and
settings is skipped; an interrupted one is mined again. ``wsiflow train
--hard-negative-share`` then draws that share of each epoch's normal
patches from one model's records (``--hard-negatives-from``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline import __version__
from pipeline.config import MiningConfig, TilingConfig, annotation_groups
from pipeline.errors import AnnotationError, ModelError, StoreError, failure_reason
from pipeline.identity import file_identity, fingerprint
from pipeline.mining.rules import candidates, near_annotations
from pipeline.store.patch_store import location, open_store, read_rows, stored_stain_fit, zarr_root

#: The array group of a slide's mined hard negatives.
MINED = "hard_negatives"


@dataclass
class SlideMining:
    """One slide's mining: ``status`` done, skipped or failed, and its counts."""

    slide_id: str
    status: str
    patches: int = 0
    candidates: int = 0
    near_annotations: int = 0
    mined: int = 0
    reason: str = ""
    seconds: float = 0.0


def mine_store(
    store: Path | str,
    model_dir: Path | str,
    cfg: MiningConfig,
    *,
    slides: Sequence[str] | None = None,
    overwrite: bool = False,
    on_slide: Callable[[SlideMining], None] | None = None,
) -> list[SlideMining]:
    """Mine ``slides`` of ``store`` (default: those the model trained on that it holds).

    Raises :class:`ModelError` for an unusable model or one of another patch
    size or µm/px than the store's, :class:`StoreError` for a store that
    cannot be opened or a named slide it lacks; a slide that cannot be mined
    (a changed annotation file, say) is a failed result and the others go on.
    """
    from pipeline.inference.predict import load_predictor, model_spec, seen_slides

    spec = model_spec(model_dir)
    open_store(store)  # a wsiflow patch store, or StoreError
    root = zarr_root(store)
    complete = {k for k in root.group_keys() if root[k].attrs.get("complete") is True}
    if slides is None:
        slide_ids = sorted(seen_slides(model_dir, ("train",)) & complete)
        if not slide_ids:
            raise StoreError(location(store), f"holds none of the slides {model_dir} trained on")
    else:
        slide_ids = list(slides)
        missing = sorted(set(slide_ids) - complete)
        if missing:
            raise StoreError(location(store), f"has no complete slide {', '.join(missing)}")
    key = mining_key(spec.identity["fingerprint"])
    predictor = None
    results = []
    for slide_id in slide_ids:
        started = time.perf_counter()
        group = root[slide_id]
        try:
            _check_model(spec, group, model_dir, slide_id)
            digest = _fingerprint(group, spec.identity, cfg)
            if not overwrite and _is_complete(group, key, digest):
                mined = group[f"{MINED}/{key}"]
                result = SlideMining(
                    slide_id, "skipped", **{k: mined.attrs[k] for k in _COUNTS}, reason="mined"
                )
            else:
                if predictor is None:
                    predictor = load_predictor(model_dir, batch_size=cfg.batch_size)
                result = _mine_slide(group, slide_id, predictor, cfg, spec, key, digest)
        except (AnnotationError, StoreError, OSError, ValueError) as exc:
            if isinstance(exc, ModelError):
                raise
            result = SlideMining(slide_id, "failed", reason=failure_reason(slide_id, exc))
        result.seconds = round(time.perf_counter() - started, 2)
        results.append(result)
        if on_slide is not None:
            on_slide(result)
    return results


def summarize(results: list[SlideMining], store: Path | str, model_dir: Path | str) -> dict:
    """A mining run's summary, the same for every front end (CLI, flows)."""
    return {
        "store": location(store),
        "model_dir": str(model_dir),
        "slides": len(results),
        "done": sum(r.status == "done" for r in results),
        "skipped": sum(r.status == "skipped" for r in results),
        "failed": sum(r.status == "failed" for r in results),
        "candidates": sum(r.candidates for r in results),
        "mined": sum(r.mined for r in results),
        "failures": [
            {"slide": r.slide_id, "reason": r.reason} for r in results if r.status == "failed"
        ],
        "per_slide": [asdict(r) for r in results],
    }


def mining_key(model_fingerprint: str | None) -> str:
    """The record key of a mining model: its metadata fingerprint's first 16 hex digits."""
    if not model_fingerprint:
        raise ValueError("Expected a model with a metadata fingerprint (a finished wsiflow model)")
    return str(model_fingerprint)[:16]


def read_mined(
    group: zarr.Group, key: str | None = None
) -> tuple[np.ndarray, dict[str, Any]] | None:
    """A slide's complete hard-negative record of mining model ``key``: ``(index, attrs)``.

    None if it has none. Without ``key``, its only record; :class:`StoreError`
    if several models mined it.
    """
    if MINED not in group:
        return None
    records = group[MINED]
    keys = sorted(k for k in records.group_keys() if records[k].attrs.get("complete") is True)
    if key is None:
        if len(keys) > 1:
            raise StoreError(
                group.name.strip("/"),
                f"was mined by {len(keys)} models: choose one with --hard-negatives-from "
                "(training.hard_negatives_from)",
            )
        key = keys[0] if keys else None
    if key not in keys:
        return None
    mined = records[key]
    return np.asarray(mined["index"][:], dtype=np.int64), dict(mined.attrs)


_COUNTS = ("patches", "candidates", "near_annotations", "mined")


def _check_model(spec: Any, group: zarr.Group, model_dir: Path | str, slide_id: str) -> None:
    patch_px = int(group["patches"].shape[1])
    patch_mpp = group.attrs.get("patch_mpp")
    same_mpp = (
        spec.patch_mpp is None
        or patch_mpp is None
        or abs(float(patch_mpp) - spec.patch_mpp) <= 0.01 * spec.patch_mpp
    )
    if patch_px != spec.patch_px or not same_mpp:
        raise ModelError(
            Path(model_dir),
            f"was trained on {spec.patch_px} px patches at {spec.patch_mpp} µm/px; slide "
            f"{slide_id} holds {patch_px} px patches at {patch_mpp} µm/px",
        )


def _fingerprint(group: zarr.Group, model: dict[str, Any], cfg: MiningConfig) -> str:
    return fingerprint(
        {
            "slide": group.attrs.get("fingerprint"),
            "model": model,
            "threshold": cfg.threshold,
            "margin_um": cfg.margin_um,
            "version": __version__,
        }
    )


def _is_complete(group: zarr.Group, key: str, digest: str) -> bool:
    found = read_mined(group, key)
    return found is not None and found[1].get("fingerprint") == digest


def _mine_slide(
    group: zarr.Group,
    slide_id: str,
    predictor: Callable[[np.ndarray], np.ndarray],
    cfg: MiningConfig,
    spec: Any,
    key: str,
    digest: str,
) -> SlideMining:
    attrs = dict(group.attrs)
    labels = np.asarray(group["labels"][:])
    tumor_fraction = np.asarray(group["tumor_fraction"][:])
    level0_xy = np.asarray(group["coords"][:])
    level0_patch_px = float(attrs["read_px"]) * float(attrs["downsample"])
    near = near_annotations(
        level0_xy,
        level0_patch_px,
        _polygons(attrs, slide_id),
        _margin_px(attrs, cfg.margin_um, slide_id),
    )
    chosen = np.flatnonzero(candidates(labels, tumor_fraction, near))
    probability = _predict(
        group["patches"], chosen, predictor, cfg.batch_size, _normalizer(group, spec, slide_id)
    )
    hard = probability >= cfg.threshold
    counts = {
        "patches": len(labels),
        "candidates": len(chosen),
        "near_annotations": int((near & (labels == 0)).sum()),
        "mined": int(hard.sum()),
    }
    records = group.require_group(MINED)
    mined = records.create_group(key, overwrite=True)  # complete: false until the end
    for name, values, dtype in (
        ("index", chosen[hard], "int32"),
        ("probability", probability[hard], "float32"),
    ):
        array = mined.create_array(name, shape=(len(values),), dtype=dtype, fill_value=0)
        if len(values):
            array[:] = values
    mined.update_attributes(
        {
            **counts,
            "model_dir": spec.model_dir,
            "model": spec.identity,
            "threshold": cfg.threshold,
            "margin_um": cfg.margin_um,
            "fingerprint": digest,
            "wsiflow_version": __version__,
            "complete": True,
        }
    )
    return SlideMining(slide_id, "done", **counts)


def _polygons(attrs: dict[str, Any], slide_id: str) -> list:
    """The slide's annotation as tiled, read again; AnnotationError if it changed since."""
    from pipeline.slides.annotations import read_annotations

    recorded = attrs.get("annotation")
    if not recorded:
        return []
    path = Path(recorded["path"])
    if not path.is_file() or file_identity(path) != recorded:
        raise AnnotationError(
            path,
            f"changed or gone since slide {slide_id} was tiled: tile it again before mining "
            "(its labels came from the annotation as it was)",
        )
    groups = annotation_groups(TilingConfig.model_validate(attrs.get("config") or {}))
    return read_annotations(path, groups)


def _margin_px(attrs: dict[str, Any], margin_um: float, slide_id: str) -> float:
    """``margin_um`` in level-0 pixels, by the µm/px the slide was tiled at."""
    if not margin_um:
        return 0.0
    if attrs.get("level_mpp") is None:
        raise StoreError(
            slide_id,
            "was tiled without a µm/px (by level), so a margin in µm cannot be placed: "
            "set mining.margin_um: 0, or tile it with --slide-mpp",
        )
    return margin_um / (float(attrs["level_mpp"]) / float(attrs["downsample"]))


def _normalizer(
    group: zarr.Group, spec: Any, slide_id: str
) -> Callable[[np.ndarray], np.ndarray] | None:
    """The model's stain normalisation for this slide's stored patches, as in its training."""
    from pipeline.slides.stain import normalize

    if spec.stain is None:
        return None
    try:
        source = stored_stain_fit(
            group["patches"], spec.stain["normalization"], spec.stain["target"]
        )
    except ValueError as exc:
        raise StoreError(slide_id, f"its stain cannot be normalised: {exc}") from exc
    return lambda patches: normalize(patches, source, spec.stain["target"])


def _predict(
    patches: zarr.Array,
    rows: np.ndarray,
    predictor: Callable[[np.ndarray], np.ndarray],
    batch_size: int,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """``(len(rows),)`` float32 probabilities of ``patches[rows]`` (sorted), chunk by chunk.

    At most one batch and one chunk's patches are in memory at a time;
    ``transform`` (stain normalisation) applies to each chunk's patches.
    """
    out = np.empty(len(rows), dtype=np.float32)
    pending: list[np.ndarray] = []
    waiting = done = 0

    def flush() -> None:
        nonlocal pending, waiting, done
        out[done : done + waiting] = predictor(np.concatenate(pending))
        done += waiting
        pending, waiting = [], 0

    for read in read_rows(patches, rows):
        pending.append(read if transform is None else transform(read))
        waiting += len(read)
        if waiting >= batch_size:
            flush()
    if waiting:
        flush()
    return out
