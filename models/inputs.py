"""A training run's inputs, checked before Keras is imported: stores, labels, split, settings.

Everything here reads stores and metadata only (no TensorFlow), so a bad
input fails in about a second, before the seconds a Keras import costs:
the CLI checks with :func:`check_training_inputs` first, then trains with
the result (:func:`models.train.train_classifier`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import TrainingConfig
from pipeline.errors import ConfigError, ModelError, StoreError
from pipeline.identity import file_identity, fingerprint
from pipeline.store.patch_store import canonical

from .classifier import WeightsError, check_backbone
from .data import SlidePatches, open_stores, pooled_stain_target, split_slides
from .phases import Phase, plan_phases
from .saved import model_dir_of, read_metadata

#: Settings that change nothing about the trained model (not part of its fingerprint).
#: exclude_slides: the slides' list in the fingerprint already says which slides were used.
#: hard_negative_share: in the fingerprint with the mining records, only when above 0.
#: The stain settings and the rate schedule likewise, only when they differ from the defaults.
NOT_FINGERPRINTED = (
    "mlflow", "mlflow_tracking_uri", "exclude_slides", "hard_negative_share",
    "hard_negatives_from", "stain_normalization", "stain_reference", "stain_jitter",
    "lr_schedule",
)  # fmt: skip


@dataclass(frozen=True)
class TrainingInputs:
    """Everything a run needs to know before it touches its directory, all checked."""

    slides: list[SlidePatches]
    train: list[SlidePatches]
    val: list[SlidePatches]
    test: list[SlidePatches]  # held out (a store's given test split): scored once, at the end
    patch_px: int
    patch_mpp: float | None
    backbone: str
    preprocessing: str
    parent_dir: Path | None
    parent: dict[str, Any] | None
    phases: list[Phase]
    fingerprint: str
    stain: dict[str, Any]  # normalisation, its target and the jitter (see _stain)
    patch_level: int | None  # the pyramid level read, where no µm/px is known (else None)


def check_training_inputs(
    stores: list[Path] | tuple[Path, ...], cfg: TrainingConfig, workers: int = 1
) -> TrainingInputs:
    """Stores, labels, classes, backbone, patch size and weights; typed errors otherwise.

    ``workers``: the processes of a multi-worker run (their number changes
    the global batch, so it is part of the fingerprint).
    """
    hard = cfg.hard_negative_share > 0
    slides = _without(
        open_stores(stores, hard_negatives=hard, mining_key=_mining_key(cfg)),
        cfg.exclude_slides,
        stores,
    )
    px = slides[0].patch_px
    patch_mpp = _common_mpp(slides)
    patch_level = _common_level(slides) if patch_mpp is None else None
    parent_dir = model_dir_of(cfg.weights) if cfg.weights not in ("none", "imagenet") else None
    parent = read_metadata(parent_dir) if parent_dir else None
    backbone = parent["backbone"] if parent else cfg.backbone
    if parent and int(parent["patch_px"]) != px:
        raise ModelError(
            parent_dir,
            f"was trained on {parent['patch_px']} px patches; the stores hold {px} px patches",
        )
    weights_file = cfg.weights not in ("none", "imagenet") and parent is None
    if weights_file and not Path(cfg.weights).is_file():
        raise WeightsError(
            Path(cfg.weights),
            "no such weights file or wsiflow model directory "
            "(expected imagenet, none, a weights file or a model directory)",
        )
    spec = check_backbone(backbone, px)
    # Something to protect from a fresh head's first gradients: a pretrained backbone.
    pretrained = backbone != "small_cnn" and (parent is not None or cfg.weights != "none")
    phases = plan_phases(cfg, pretrained)
    train, val, test = split_slides(slides, cfg.validation_fraction, cfg.seed)
    _check_split(train, val)
    identity = {
        "slides": [[canonical(s.store), s.slide_id, s.fingerprint, len(s)] for s in slides],
        "training": cfg.model_dump(mode="json", exclude=set(NOT_FINGERPRINTED)),
        "parent": parent.get("fingerprint") if parent else None,
    }
    if workers > 1:  # one machine's runs keep the fingerprints they always had
        identity["workers"] = workers
    if cfg.stain_normalization != "none" or cfg.stain_jitter != 1.0:  # likewise
        reference = cfg.stain_reference
        identity["stain"] = [
            cfg.stain_normalization,
            file_identity(Path(reference)) if reference and Path(reference).exists() else reference,
            cfg.stain_jitter,
        ]
    if cfg.lr_schedule != "plateau":  # likewise
        identity["lr_schedule"] = cfg.lr_schedule
    if hard:  # likewise
        _check_mined(train)
        identity["hard_negatives"] = [
            cfg.hard_negative_share,
            [[s.slide_id, s.mining["fingerprint"]] for s in train],
        ]
    digest = fingerprint(identity)
    stain = _stain(cfg, train)  # a bad reference fails here, before anything is made
    return TrainingInputs(
        slides, train, val, test, px, patch_mpp, backbone, spec.preprocessing, parent_dir,
        parent, phases, digest, stain, patch_level,
    )  # fmt: skip


def _without(
    slides: list[SlidePatches], excluded: tuple[str, ...], stores: list[Path] | tuple[Path, ...]
) -> list[SlidePatches]:
    """``slides`` less those named in ``training.exclude_slides`` (each must be there)."""
    if not excluded:
        return slides
    unknown = sorted(set(excluded) - {s.slide_id for s in slides})
    if unknown:
        raise ConfigError(
            None,
            [("training.exclude_slides", f"not a slide of {', '.join(map(str, stores))}: "
              f"{', '.join(unknown)}", None)],
        )  # fmt: skip
    return [s for s in slides if s.slide_id not in set(excluded)]


def _common_mpp(slides: list[SlidePatches]) -> float | None:
    """The patches' µm/px; ``StoreError`` if slides differ by more than 10%."""
    values = [s.patch_mpp for s in slides if s.patch_mpp is not None]
    if not values:
        return None
    low, high = min(values), max(values)
    if high > low * 1.1:
        worst = max(slides, key=lambda s: s.patch_mpp or 0)
        raise StoreError(
            worst.store,
            f"patches of different physical sizes ({low:.3f}-{high:.3f} µm/px); "
            "tile every slide at one --mpp to train one model",
        )
    return float(np.median(values))


def _common_level(slides: list[SlidePatches]) -> int | None:
    """The pyramid level patches without µm/px were read at; ``StoreError`` if slides differ."""
    levels = sorted({s.level for s in slides if s.level is not None})
    if len(levels) > 1:
        raise StoreError(
            slides[0].store,
            f"patches read at different pyramid levels ({', '.join(map(str, levels))}) and none "
            "records µm/px; tile every slide at one --level to train one model",
        )
    return int(levels[0]) if levels else None


def _stain(cfg: TrainingConfig, train: list[SlidePatches]) -> dict[str, Any]:
    """The model's stain record: normalisation, its target (fitted now), jitter strength."""
    method = cfg.stain_normalization
    record: dict[str, Any] = {"normalization": method, "jitter": cfg.stain_jitter}
    if method == "none":
        return record
    if cfg.stain_reference:
        record["reference"] = cfg.stain_reference
        record["target"] = reference_stain(Path(cfg.stain_reference), method)
    else:
        record["reference"] = "the training slides' patches, pooled"
        record["target"] = pooled_stain_target(train, method)
    return record


def reference_stain(path: Path, method: str) -> dict[str, Any]:
    """The ``method`` fit of a reference slide (its overview) or image; ModelError otherwise."""
    from PIL import Image

    from pipeline.errors import SlideError
    from pipeline.slides.reader import open_slide
    from pipeline.slides.stain import fit_stain

    try:
        with open_slide(path) as reader:
            rgb, _ = reader.overview(max(1.0, max(reader.info.level0_wh) / 4096))
    except SlideError:
        try:
            with Image.open(path) as image:
                rgb = np.asarray(image.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise ModelError(
                path, f"training.stain_reference: not a slide or image ({exc})"
            ) from exc
    try:
        return fit_stain(rgb, method)
    except ValueError as exc:
        raise ModelError(path, f"training.stain_reference: {exc}") from exc


def _mining_key(cfg: TrainingConfig) -> str | None:
    """The record key of ``training.hard_negatives_from``'s mining, when it names a model."""
    from pipeline.mining.driver import mining_key

    if cfg.hard_negatives_from is None:
        return None
    model_dir = model_dir_of(cfg.hard_negatives_from)
    if model_dir is None:
        raise ModelError(
            Path(cfg.hard_negatives_from),
            "training.hard_negatives_from: not a wsiflow model directory (the model that mined)",
        )
    return mining_key(read_metadata(model_dir).get("fingerprint"))


def _check_mined(train: list[SlidePatches]) -> None:
    """Every training slide has a complete mining record (``wsiflow mine``), or StoreError."""
    missing = [s for s in train if s.mining is None]
    if missing:
        raise StoreError(
            missing[0].store,
            "training.hard_negative_share needs mined hard negatives, and training slides "
            f"{', '.join(s.slide_id for s in missing)} have none: run `wsiflow mine "
            f"{missing[0].store} --model FIRST_MODEL_DIR` first",
        )


def _check_split(train: list[SlidePatches], val: list[SlidePatches]) -> None:
    for name, side in (("training", train), ("validation", val)):
        tumor = sum(s.tumor for s in side)
        if tumor == 0 or tumor == sum(len(s) for s in side):
            missing = "tumor" if tumor == 0 else "normal"
            raise StoreError(
                side[0].store,
                f"the {name} slides ({', '.join(s.slide_id for s in side)}) have no {missing} "
                + (
                    f"patch; import a {name} split with both classes"
                    if all(s.split for s in side)
                    else "patch; a slide-level split needs at least two slides with tumor "
                    "and one without"
                ),
            )
