"""Write a synthetic cohort laid out exactly like CAMELYON16.

::

    OUT_DIR/training/tumor/tumor_001.tif        OUT_DIR/testing/images/test_001.tif
    OUT_DIR/training/normal/normal_001.tif      OUT_DIR/testing/lesion_annotations/test_001.xml
    OUT_DIR/training/lesion_annotations/tumor_001.xml
    OUT_DIR/testing/reference.csv               OUT_DIR/synth.json (parameters, written last)
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from pipeline.config import SyntheticConfig
from pipeline.outputs import claim_folder, write_atomic
from pipeline.slides.annotations import write_asap_xml
from pipeline.slides.pyramid import write_pyramid_tiff
from pipeline.synth.centres import CENTRES
from pipeline.synth.painting import make_camelyon_scene
from pipeline.synth.scene import diameter_px, make_scene

MANIFEST = "synth.json"
#: CAMELYON16's macro/micro-metastasis boundary: largest lesion diameter 2 mm.
_MACRO_DIAMETER_UM = 2000.0


@dataclass(frozen=True)
class SlideSpec:
    """One slide to generate: ``split`` is training/testing, ``label`` Tumor/Normal."""

    slide_id: str
    split: str
    label: str
    seed: int
    centre: str = ""  # camelyon difficulty: the scanning centre (see pipeline.synth.centres)

    @property
    def is_tumor(self) -> bool:
        return self.label == "Tumor"

    def image_path(self, root: Path) -> Path:
        if self.split == "testing":
            return root / "testing" / "images" / f"{self.slide_id}.tif"
        folder = "tumor" if self.is_tumor else "normal"
        return root / "training" / folder / f"{self.slide_id}.tif"

    def annotation_path(self, root: Path) -> Path | None:
        if not self.is_tumor:
            return None
        return root / self.split / "lesion_annotations" / f"{self.slide_id}.xml"


@dataclass(frozen=True)
class SlideRecord:
    """A generated slide: paths relative to the cohort root, lesion counts, bytes."""

    slide_id: str
    split: str
    label: str
    image: str
    annotation: str | None
    level_count: int
    lesions: int
    isolated_tumor_cells: int
    exclusions: int
    largest_lesion_um: float
    file_bytes: int
    centre: str = ""
    mpp: float = 0.0
    jpeg_quality: int = 0
    # camelyon difficulty: what was drawn, for tests and the contact sheet; each
    # {"kind", "size_class", "bounds": [x0, y0, x1, y1] and "anchor": [x, y] in level-0 px,
    # "diameter_um"}
    features: tuple[dict, ...] = ()


@dataclass(frozen=True)
class CohortSummary:
    root: Path
    params: SyntheticConfig
    slides: tuple[SlideRecord, ...]
    reused: bool


def plan_cohort(params: SyntheticConfig) -> list[SlideSpec]:
    """Split ``params.slides`` slides into CAMELYON16's training and testing sets.

    A third (at least two) go to testing; each set is half tumor (rounded up),
    half normal. ``params.extra_normal_slides`` more normal slides join the
    training set, numbered after the others, so every other slide stays as it
    was without them. Test slides are numbered in a shuffled order, as in the
    challenge, so the number does not give the label away.
    """
    if params.slides < 4:
        raise ValueError(
            "Expected at least 4 slides (a tumor and a normal slide in each of training "
            f"and testing). Received: slides={params.slides}"
        )
    n_test = max(2, round(params.slides / 3))
    n_train = params.slides - n_test
    train_tumor, test_tumor = math.ceil(n_train / 2), math.ceil(n_test / 2)
    specs = [
        SlideSpec(f"tumor_{i + 1:03d}", "training", "Tumor", _slide_seed(params.seed, 0, i))
        for i in range(train_tumor)
    ]
    specs += [
        SlideSpec(f"normal_{i + 1:03d}", "training", "Normal", _slide_seed(params.seed, 1, i))
        for i in range(n_train - train_tumor + params.extra_normal_slides)
    ]
    labels = ["Tumor"] * test_tumor + ["Normal"] * (n_test - test_tumor)
    order = np.random.default_rng(_slide_seed(params.seed, 2, 0)).permutation(n_test)
    specs += [
        SlideSpec(f"test_{i + 1:03d}", "testing", labels[order[i]], _slide_seed(params.seed, 3, i))
        for i in range(n_test)
    ]
    if params.difficulty == "camelyon":
        specs = _assign_centres(specs, params.camelyon.centres)
    return specs


def _assign_centres(specs: list[SlideSpec], centres: tuple[str, ...]) -> list[SlideSpec]:
    """Alternate centres within each split and label, so every set mixes them evenly.

    Normal slides and the testing split start one centre later: in a cohort of
    one slide per split and label, each split still holds both centres and the
    centre predicts neither the label nor the split.
    """
    seen: dict[tuple[str, str], int] = {}
    assigned = []
    for spec in specs:
        n = seen.get((spec.split, spec.label), 0)
        seen[(spec.split, spec.label)] = n + 1
        shift = int(not spec.is_tumor) + int(spec.split == "testing")
        assigned.append(replace(spec, centre=centres[(n + shift) % len(centres)]))
    return assigned


def write_cohort(
    root: Path | str,
    params: SyntheticConfig,
    *,
    workers: int = 1,
    overwrite: bool = False,
    on_slide_done: Callable[[SlideRecord], None] | None = None,
) -> CohortSummary:
    """Generate (or reuse) the cohort under ``root``; return what is there.

    When ``root/synth.json`` records the same parameters and every file it
    lists exists, nothing is regenerated. The manifest is written last, so an
    interrupted run is redone, never reused. Slides are generated in
    ``workers`` processes.
    """
    root = claim_folder(root, "cohort")
    reused = None if overwrite else _reuse(root, params)
    if reused is not None:
        return CohortSummary(root=root, params=params, slides=reused, reused=True)
    manifest = root / MANIFEST
    manifest.unlink(missing_ok=True)
    specs = plan_cohort(params)
    for spec in specs:
        spec.image_path(root).parent.mkdir(parents=True, exist_ok=True)
    records: dict[str, SlideRecord] = {}
    if workers <= 1:
        for spec in specs:
            records[spec.slide_id] = write_slide(root, spec, params)
            if on_slide_done is not None:
                on_slide_done(records[spec.slide_id])
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(write_slide, root, spec, params) for spec in specs]
            for future in futures:
                record = future.result()
                records[record.slide_id] = record
                if on_slide_done is not None:
                    on_slide_done(record)
    slides = tuple(records[spec.slide_id] for spec in specs)
    _write_reference(root / "testing" / "reference.csv", slides)
    write_atomic(
        manifest,
        json.dumps(
            {"params": params.model_dump(mode="json"), "slides": [asdict(r) for r in slides]},
            indent=2,
        )
        + "\n",
    )
    return CohortSummary(root=root, params=params, slides=slides, reused=False)


def write_slide(root: Path, spec: SlideSpec, params: SyntheticConfig) -> SlideRecord:
    """Render one slide (and its ASAP XML if it has tumor) under ``root``."""
    if spec.centre:
        centre = CENTRES[spec.centre]
        scene = make_camelyon_scene(
            params.width_px,
            params.height_px,
            spec.seed,
            tumor=spec.is_tumor,
            centre=centre,
            params=params.camelyon,
            stain_jitter=params.stain_jitter,
        )
        jpeg_quality = centre.jpeg_quality
    else:
        scene = make_scene(
            params.width_px,
            params.height_px,
            params.mpp,
            spec.seed,
            tumor=spec.is_tumor,
            stain_jitter=params.stain_jitter,
        )
        jpeg_quality = params.jpeg_quality
    mpp = scene.mpp
    image = spec.image_path(root)
    info = write_pyramid_tiff(
        image,
        params.width_px,
        params.height_px,
        scene.render,
        mpp=mpp,
        tile_px=params.tile_px,
        jpeg_quality=jpeg_quality,
        description=f"wsiflow synthetic CAMELYON16-format slide {spec.slide_id} (seed {spec.seed})",
    )
    annotation = spec.annotation_path(root)
    if annotation is not None:
        annotation.parent.mkdir(parents=True, exist_ok=True)
        write_asap_xml(annotation, scene.annotations)
    diameters_um = [_grown_major_axis_um(p.level0_xy, mpp) for p in scene.lesions]
    largest_um = max((_diameter_um(p.level0_xy, mpp) for p in scene.lesions), default=0.0)
    return SlideRecord(
        slide_id=spec.slide_id,
        split=spec.split,
        label=spec.label,
        image=str(image.relative_to(root)),
        annotation=None if annotation is None else str(annotation.relative_to(root)),
        level_count=len(info.level_wh),
        lesions=len(scene.lesions),
        isolated_tumor_cells=sum(d < 275.0 for d in diameters_um),
        exclusions=len(scene.exclusions),
        largest_lesion_um=round(largest_um, 1),
        file_bytes=info.file_bytes,
        centre=spec.centre,
        mpp=mpp,
        jpeg_quality=jpeg_quality,
        features=tuple(
            {
                "kind": f.kind,
                "size_class": f.size_class,
                "bounds": [round(v) for v in f.bounds()],
                "anchor": [round(v) for v in f.anchor_xy],
                "diameter_um": round(_diameter_um(f.level0_xy, mpp), 1),
            }
            for f in getattr(scene, "features", ())
        ),
    )


def _diameter_um(level0_xy: np.ndarray, mpp: float) -> float:
    """Largest distance between two vertices, in µm."""
    return diameter_px(level0_xy) * mpp


def _grown_major_axis_um(level0_xy: np.ndarray, mpp: float) -> float:
    """Approximate major axis after CAMELYON16's 37.5 µm growth on each side."""
    return _diameter_um(level0_xy, mpp) + 75.0


def _write_reference(path: Path, slides: tuple[SlideRecord, ...]) -> None:
    """Write ``reference.csv`` as CAMELYON16's: name, Tumor/Normal, and Macro/Micro for tumors."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for record in slides:
        if record.split != "testing":
            continue
        # The centre, where there is one, as a last column (readers take the first two).
        centre = [record.centre] if record.centre else []
        if record.label == "Tumor":
            size = "Macro" if record.largest_lesion_um >= _MACRO_DIAMETER_UM else "Micro"
            writer.writerow([record.slide_id, "Tumor", size, *centre])
        else:
            writer.writerow([record.slide_id, "Normal", *(["None", *centre] if centre else [])])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())


def _reuse(root: Path, params: SyntheticConfig) -> tuple[SlideRecord, ...] | None:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        # Read through the config, so a key added since (at its default) still matches.
        recorded = type(params).model_validate(manifest["params"])
        if recorded.model_dump(mode="json") != params.model_dump(mode="json"):
            return None
        slides = tuple(
            SlideRecord(**{**r, "features": tuple(r.get("features", ()))})
            for r in manifest["slides"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for record in slides:
        files = [record.image] + ([record.annotation] if record.annotation else [])
        if not all((root / f).is_file() for f in files):
            return None
    return slides


def _slide_seed(seed: int, kind: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, kind, index]).generate_state(1)[0])
