"""Tumor probability of single patch images (``wsiflow predict``), as fastai's ``learn.predict``.

Images are files (PNG, JPEG, TIFF, BMP, GIF, WebP) or folders of them
(searched recursively, :func:`pipeline.images.find_images`). Each must be
the model's patch size, unless ``resize`` is asked for (then it is
resampled, with a warning). An unreadable image or one of the wrong size is
one failed row naming the file and the reason; the others are predicted all
the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

#: Images predicted per batch (and at most this many held in memory at once).
BATCH = 64


@dataclass
class ImagePrediction:
    """One image's result: ``probability`` of tumor, or ``reason`` it could not be predicted."""

    path: str
    probability: float | None = None
    reason: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.probability is not None


def load_patch(path: Path, patch_px: int, *, resize: bool) -> tuple[np.ndarray, list[str]]:
    """``(patch_px, patch_px, 3)`` uint8 RGB of ``path`` and its warnings.

    Raises ``ValueError`` with the reason for an unreadable image or, without
    ``resize``, one whose size is not the model's patch size.
    """
    warnings = []
    try:
        with Image.open(path) as image:
            image.load()
            size, mode = image.size, image.mode
            rgb = image.convert("RGB")
    except (OSError, Image.DecompressionBombError, ValueError) as exc:
        raise ValueError(f"not a readable image ({exc})") from exc
    if mode not in ("RGB", "RGBA", "P"):
        warnings.append(f"{mode} image converted to RGB")
    if size != (patch_px, patch_px):
        if not resize:
            raise ValueError(
                f"Expected a {patch_px} x {patch_px} px patch (the model's). Got "
                f"{size[0]} x {size[1]} px instead; --resize resamples it"
            )
        rgb = rgb.resize((patch_px, patch_px), Image.Resampling.LANCZOS)
        warnings.append(f"resized from {size[0]} x {size[1]} px to {patch_px} x {patch_px} px")
    return np.asarray(rgb, dtype=np.uint8), warnings


def _normalized(patch: np.ndarray, stain: dict, warnings: list[str]) -> np.ndarray:
    """The patch mapped onto the model's stain target from its own fit (a patch is its slide)."""
    from pipeline.slides.stain import fit_stain, normalize

    try:
        source = fit_stain(patch, stain["normalization"], target=stain["target"])
    except ValueError as exc:
        warnings.append(f"stain not normalised ({exc})")
        return patch
    if "fallback" in source:
        warnings.append(source["fallback"])
    return normalize(patch, source, stain["target"])


def predict_images(
    model_dir: Path | str, paths: Sequence[Path], *, resize: bool = False, tta: bool = False
) -> list[ImagePrediction]:
    """Predict every image in ``paths`` (in order) with the model in ``model_dir``.

    ``tta``: each probability is the mean over the image's 8 flips and rotations. A
    model trained with stain normalisation gets each image normalised from its own fit.

    Raises :class:`pipeline.errors.ModelError` for an unusable model directory.
    """
    from pipeline.inference.predict import load_predictor, model_spec

    spec = model_spec(model_dir)
    predictor = None
    results: list[ImagePrediction] = []
    for start in range(0, len(paths), BATCH):
        batch, waiting = [], []
        for path in paths[start : start + BATCH]:
            result = ImagePrediction(str(path))
            results.append(result)
            try:
                patch, result.warnings = load_patch(Path(path), spec.patch_px, resize=resize)
            except ValueError as exc:
                result.reason = str(exc)
                continue
            if spec.stain is not None:
                patch = _normalized(patch, spec.stain, result.warnings)
            batch.append(patch)
            waiting.append(result)
        if not batch:
            continue
        if predictor is None:
            predictor = load_predictor(model_dir, batch_size=min(BATCH, len(paths)), tta=tta)
        for result, probability in zip(waiting, predictor(np.stack(batch)), strict=True):
            result.probability = float(probability)
    return results
