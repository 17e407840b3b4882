"""Configuration: frozen pydantic models mirroring the YAML files in ``configs/``.

Sections: ``slides``, ``tiling``, ``training``, ``inference``, ``mining``,
``slide_classifier``, ``evaluation``, ``orchestration``. Every section and
key is optional (defaults below) but an unknown key or a value of the wrong
type is a :class:`ConfigError` naming the file, the line, the key and what
was expected. Command-line flags override values through
:func:`with_overrides`, validated the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.errors import ConfigError

BACKBONES = ("mobilenetv2", "resnet50", "inceptionv3", "efficientnetb0", "small_cnn")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HardCohortConfig(_Section):
    """What makes the ``camelyon`` difficulty hard, as parameters (ignored under ``easy``)."""

    centres: tuple[Literal["radboud", "utrecht"], ...] = Field(
        ("radboud", "utrecht"), min_length=1, description="slides alternate between these"
    )
    lobular_fraction: float = Field(
        0.35, ge=0, le=1, description="share of lesions of small discohesive lymphocyte-like cells"
    )
    nuclear_overlap: float = Field(
        0.4, ge=0, le=1, description="0: tumor nuclei apart from lymphocytes; 1: same size/colour"
    )
    lesion_mix: tuple[float, float, float] = Field(
        (0.2, 0.45, 0.35), description="proportions of macro (> 2 mm), micro and ITC (< 0.2 mm)"
    )
    lesions_per_slide: tuple[int, int] = Field((1, 4), description="inclusive range")
    mimics_per_slide: tuple[int, int] = Field(
        (2, 5), description="germinal centres, histiocytes, ..."
    )
    artefacts_per_slide: tuple[int, int] = Field(
        (1, 4), description="pen, folds, blur, bubbles, dust"
    )
    annotation_margin_um: float = Field(
        20.0,
        ge=0,
        le=200,
        description="how loosely lesions are outlined (at most a quarter radius)",
    )

    @field_validator("lesion_mix")
    @classmethod
    def _proportions(cls, mix: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(mix) < 0 or sum(mix) <= 0:
            raise ValueError(f"Expected non-negative proportions, not all 0. Received: {mix}")
        return mix

    @field_validator("lesions_per_slide", "mimics_per_slide", "artefacts_per_slide")
    @classmethod
    def _range(cls, bounds: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= bounds[0] <= bounds[1] <= 20:
            raise ValueError(f"Expected 0 <= low <= high <= 20. Received: {bounds}")
        return bounds


class SyntheticConfig(_Section):
    """A generated CAMELYON16-format cohort (``wsiflow synth``)."""

    difficulty: Literal["easy", "camelyon"] = Field(
        "easy", description="easy: separable toy; camelyon: centres, mimics, artefacts, ITCs"
    )

    slides: int = Field(8, ge=4, description="total slides; a third (at least 2) for testing")
    extra_normal_slides: int = Field(
        0,
        ge=0,
        le=10_000,
        description="normal training slides on top of `slides`: the normal tissue per tumor "
        "a gigapixel slide has and a small one lacks",
    )
    seed: int = Field(0, ge=0, description="same seed, byte-identical slides")
    width_px: int = Field(8192, ge=64, le=1_000_000, description="level-0 width")
    height_px: int = Field(8192, ge=64, le=1_000_000, description="level-0 height")
    mpp: float = Field(0.243, gt=0, le=100, description="level-0 µm per pixel")
    tile_px: int = Field(256, ge=16, le=4096, multiple_of=16, description="TIFF tile size")
    jpeg_quality: int = Field(80, ge=1, le=100)
    stain_jitter: float = Field(0.08, ge=0, le=0.5, description="slide-to-slide stain variation")
    camelyon: HardCohortConfig = HardCohortConfig()


class SlidesConfig(_Section):
    """Where the slides come from."""

    root: Path | None = Field(None, description="a CAMELYON16-layout folder; None: generate one")
    synthetic: SyntheticConfig = SyntheticConfig()
    extra: tuple[Path, ...] = Field((), description="more slides or folders to run inference on")


class TilingConfig(_Section):
    """Patch grid, tissue and label rules, and the patch store codec."""

    target_mpp: float | None = Field(0.5, gt=0, description="patch resolution in µm/px")
    level: int | None = Field(None, ge=0, description="a pyramid level instead of target_mpp")
    max_upsample: float = Field(
        2.0, ge=1, description="a slide whose level 0 is coarser than target_mpp by more fails"
    )
    slide_mpp: float | None = Field(
        None, gt=0, le=100, description="level-0 µm/px for slides that record none (warned)"
    )
    patch_px: int = Field(96, ge=8, le=2048)
    stride_px: int | None = Field(None, ge=1, description="None: equal to patch_px")
    tissue_mpp: float = Field(8.0, gt=0, description="resolution of tissue detection")
    min_tissue_fraction: float = Field(0.5, ge=0, le=1)
    label_rule: Literal["fraction", "center"] = "fraction"
    # CAMELYON16's _0/_1/Tumor and _2, CAMELYON17's metastases and normal (its masks paint
    # normal over metastases), re-published copies' metastasis and negative.
    tumor_groups: tuple[str, ...] = Field(
        ("_0", "_1", "Tumor", "metastases", "metastasis"),
        description="annotation groups (any case) that outline tumor; also for evaluate",
    )
    exclusion_groups: tuple[str, ...] = Field(
        ("_2", "Exclusion", "normal", "negative"),
        description="annotation groups (any case) carved out of tumor; also for evaluate",
    )
    tumor_threshold: float = Field(0.5, gt=0, le=1)
    codec: Literal["jpeg", "jpegxl", "avif", "zstd", "lz4", "none"] = "jpeg"
    codec_quality: int = Field(90, ge=1, le=100)
    chunk_patches: int = Field(64, ge=1, le=4096)
    passthrough: bool = Field(
        True, description="copy aligned source JPEG tiles into a jpeg store without re-encoding"
    )
    verify_copied_tiles: bool = Field(
        True, description="decode each copied tile once, so corrupt JPEG data fails its slide"
    )

    @model_validator(mode="after")
    def _one_resolution(self) -> TilingConfig:
        if self.level is not None and self.target_mpp is not None:
            raise ValueError(
                "Expected either target_mpp or level. Got both: set target_mpp: null to use level"
            )
        if self.level is None and self.target_mpp is None:
            raise ValueError("Expected target_mpp or level. Got neither")
        return self


class TrainingConfig(_Section):
    """Patch classifier and its two-phase fine-tuning."""

    backbone: Literal[BACKBONES] = "mobilenetv2"  # type: ignore[valid-type]
    weights: str = Field("none", description="imagenet, none, or a weights/model file path")
    replicas: int = Field(1, ge=1, le=64)
    batch_per_replica: int = Field(32, ge=1, le=4096)
    head_epochs: int = Field(2, ge=0)
    fine_tune_epochs: int = Field(3, ge=0)
    fine_tune_layers: int | Literal["all"] = Field(
        20, description="the top layers of the base the fine-tune phase opens; all: every one"
    )
    learning_rate: float = Field(1e-3, gt=0)
    fine_tune_learning_rate: float = Field(1e-4, gt=0)
    validation_fraction: float = Field(0.25, gt=0, lt=1)
    steps_per_epoch: int | None = Field(
        None, ge=1, description="None: each training tumor patch once and as many normal (>= 25)"
    )
    validation_max_patches: int | None = Field(
        20000, ge=1, description="a fixed seeded subset of validation chunks; None: all"
    )
    early_stopping_patience: int = Field(3, ge=1, description="epochs without a better val AUC")
    reduce_lr_patience: int = Field(2, ge=1, description="epochs before the rate is cut 5x")
    lr_schedule: Literal["plateau", "cosine"] = Field(
        "plateau",
        description="plateau: the rate cut 5x after reduce_lr_patience epochs without a better "
        "val AUC, early stopping; cosine: each phase's rate decays to ~0 over all its epochs",
    )
    mixed_precision: bool = Field(
        False, description="float16 compute on GPUs (bfloat16 on CPUs), float32 weights"
    )
    seed: int = Field(0, ge=0)
    exclude_slides: tuple[str, ...] = Field(
        (), description="slides of the stores left out of training and validation"
    )
    hard_negative_share: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="of the normal patches in each epoch, the share drawn from the stores' "
        "mined hard negatives (wsiflow mine); 0: none",
    )
    hard_negatives_from: str | None = Field(
        None, description="the model directory whose mining to use; None: the stores' only one"
    )
    stain_normalization: Literal["none", "reinhard", "macenko"] = Field(
        "none",
        description="map each slide's stain onto a target in training and inference alike",
    )
    stain_reference: str | None = Field(
        None,
        description="a slide or image the target stain is fitted to; None: the training "
        "slides' patches pooled",
    )
    stain_jitter: float = Field(
        1.0,
        ge=0,
        le=5,
        description="H&E jitter strength (1: each stain's OD x 0.95-1.05 +/- 0.02); 0: none",
    )
    mlflow: bool = False
    mlflow_tracking_uri: str | None = None

    @field_validator("fine_tune_layers", mode="before")
    @classmethod
    def _layers(cls, value: Any) -> Any:
        if value == "all" or (type(value) is int and value >= 0):
            return value
        raise ValueError(f"Expected a number of layers >= 0 or 'all'. Received: {value!r}")


class InferenceConfig(_Section):
    """Whole-slide prediction, heatmaps and lesion detection."""

    stride_px: int | None = Field(None, ge=1, description="None: the model's patch size")
    slide_mpp: float | None = Field(
        None, gt=0, le=100, description="level-0 µm/px for slides that record none (warned)"
    )
    batch_size: int = Field(64, ge=1, le=8192)
    queue_batches: int = Field(4, ge=1, le=256)
    reader_threads: int = Field(
        1, ge=1, le=64, description="threads reading patches per worker (2-4 to feed a GPU)"
    )
    detection_threshold: float = Field(0.5, gt=0, lt=1)
    detection: Literal["regions", "maxima"] = Field(
        "regions",
        description="regions: one detection per connected region above the threshold; "
        "maxima: local maxima at least detection_min_distance_um apart (non-maximum "
        "suppression, as the CAMELYON16 winners)",
    )
    detection_min_distance_um: float = Field(
        200.0, gt=0, description="maxima: the closest two detections may be, in µm"
    )
    min_tissue_fraction: float | None = Field(
        None, ge=0, le=1, description="None: the value the model's patches were tiled with"
    )
    slide_score: Literal["max", "classifier"] = Field(
        "max",
        description="scores.csv: the heatmap's maximum, or the model's slide classifier "
        "on heatmap features (wsiflow slide-classifier)",
    )
    tta: bool = Field(
        False,
        description="test-time augmentation: each patch's probability is the mean over its "
        "8 flips and rotations (8x the model's time)",
    )
    color_map: Literal["tumor", "redgreen"] = Field(
        "tumor",
        description="heatmap PNGs and overlays: tumor (clear, then amber to red) or redgreen "
        "(green normal to red tumor); the viewer's --color-map should match",
    )
    workers: int | None = Field(
        None, ge=1, description="None: one (TensorFlow uses every core); N GPUs: N, one each"
    )


class MiningConfig(_Section):
    """Hard-negative mining (Wang et al. 2016): normal patches a first model calls tumor."""

    enabled: bool = Field(False, description="the camelyon flow mines and trains again")
    threshold: float = Field(
        0.5, gt=0, lt=1, description="normal patches the model calls at least this are mined"
    )
    margin_um: float = Field(
        100.0, ge=0, description="no part of a mined patch within this of a tumor outline"
    )
    share: float = Field(
        0.3, gt=0, lt=1, description="the second training's training.hard_negative_share"
    )
    retrain: Literal["fine_tune", "continue", "scratch"] = Field(
        "fine_tune",
        description="from the first model: fine_tune (head, then the top layers) or continue "
        "(every layer); scratch: anew",
    )
    batch_size: int = Field(64, ge=1, le=8192)


class SlideClassifierConfig(_Section):
    """The slide-level classifier on heatmap features (Wang et al. 2016, HMS-MIT)."""

    enabled: bool = Field(False, description="the camelyon flow fits one and scores with it")
    kind: Literal["random_forest", "gradient_boosting"] = "random_forest"
    thresholds: tuple[float, ...] = Field(
        (0.5, 0.9), min_length=1, description="heatmap probabilities the features are taken at"
    )
    trees: int = Field(500, ge=1, le=100000)
    folds: int = Field(
        3,
        ge=1,
        le=20,
        description="camelyon flow: K patch models, each trained without 1/K of the training "
        "slides, give out-of-fold heatmaps; 1: the model's own (in-sample) heatmaps",
    )
    seed: int = Field(0, ge=0)

    @field_validator("thresholds")
    @classmethod
    def _probabilities(cls, thresholds: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < t < 1 for t in thresholds) or len(set(thresholds)) < len(thresholds):
            raise ValueError(
                f"Expected distinct probabilities between 0 and 1. Got {list(thresholds)} instead."
            )
        return tuple(sorted(thresholds))


class EvaluationConfig(_Section):
    """CAMELYON16 evaluation constants (the official script's values) and rules."""

    rules: Literal["official", "corrected"] = Field(
        "official",
        description="official: the organisers' script bit for bit; corrected: per-slide mpp, "
        "one threshold per printed confidence, no dropped detection",
    )
    exclude: tuple[str, ...] = Field(
        (), description="slides left out (any case), e.g. Test_049 and Test_114"
    )
    mask_level: int = Field(5, ge=0, description="evaluation mask level (downsample 2**level)")
    tumor_growth_um: float = Field(75.0, ge=0, description="distance the script grows tumor")
    itc_major_axis_um: float = Field(275.0, gt=0)
    fp_rates: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


class OrchestrationConfig(_Section):
    """Dask and Prefect execution."""

    scheduler: str | None = Field(None, description="existing Dask scheduler address")
    workers: int | None = Field(None, ge=1, description="None: one per core")
    threads_per_worker: int = Field(1, ge=1)
    retries: int = Field(2, ge=0)
    retry_delay_s: float = Field(5.0, ge=0)
    cache: bool = True
    training_workers: int = Field(
        1, ge=1, description="training processes of the train flow, one per Dask worker"
    )

    @field_validator("scheduler")
    @classmethod
    def _dask_address(cls, address: str | None) -> str | None:
        """A malformed address fails here, not after Dask's connection attempts."""
        if address is None:
            return None
        from distributed.comm import parse_address
        from distributed.comm.addressing import parse_host_port
        from distributed.comm.registry import get_backend

        try:
            scheme, where = parse_address(address)
            get_backend(scheme)  # "unknown address scheme" for http:// and the like
            if scheme in ("tcp", "tls", "ws", "wss"):
                parse_host_port(where)
        except ValueError as exc:
            raise ValueError(
                "Expected a Dask scheduler address such as tcp://host:8786. "
                f"Got {address!r} instead ({exc})"
            ) from exc
        return address


class WsiflowConfig(_Section):
    """The whole configuration, one attribute per YAML section."""

    slides: SlidesConfig = SlidesConfig()
    tiling: TilingConfig = TilingConfig()
    training: TrainingConfig = TrainingConfig()
    inference: InferenceConfig = InferenceConfig()
    mining: MiningConfig = MiningConfig()
    slide_classifier: SlideClassifierConfig = SlideClassifierConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()


def load_config(path: Path | str | None) -> WsiflowConfig:
    """Read and validate a YAML config; ``None`` gives the defaults."""
    if path is None:
        return WsiflowConfig()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            path, [("<file>", f"cannot read the file: {exc.strerror or exc}", None)]
        ) from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = None if mark is None else mark.line + 1
        column = "" if mark is None else f" (column {mark.column + 1})"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(path, [("<yaml>", f"malformed YAML{column}: {problem}", line)]) from exc
    duplicates = _duplicate_keys(node)
    if duplicates:
        raise ConfigError(path, duplicates)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            path,
            [("<root>", f"Expected a mapping of sections. Got {type(data).__name__} instead.", 1)],
        )
    try:
        return WsiflowConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(path, _problems(exc, WsiflowConfig, node)) from exc


#: An override value that sets a key to null (``None`` itself means "not given").
CLEAR = object()


def with_overrides(config: WsiflowConfig, overrides: dict[str, Any]) -> WsiflowConfig:
    """Return ``config`` with dotted keys replaced (``{"tiling.patch_px": 128}``); ``None`` skips.

    :data:`CLEAR` sets a key to null. Overrides are validated like a file;
    errors name the dotted key.
    """
    data = config.model_dump()
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        target = data
        for key in parents:
            target = target[key]
        if leaf not in target:
            raise KeyError(f"no configuration key {dotted!r}")
        target[leaf] = None if value is CLEAR else value
    try:
        return WsiflowConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("command-line options", _problems(exc, WsiflowConfig, None)) from exc


def _problems(
    exc: ValidationError, model: type[BaseModel], node: yaml.Node | None
) -> list[tuple[str, str, int | None]]:
    problems = []
    for error in exc.errors():
        loc = tuple(str(part) for part in error["loc"])
        key = ".".join(loc) or "<root>"
        line = _line_of(node, loc)
        if error["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1])
            message = f"unknown key. Expected one of: {', '.join(allowed)}"
        else:
            message = f"{error['msg']}. Got {error['input']!r} instead."
            if error["type"] == "value_error":
                message = error["msg"].removeprefix("Value error, ")
        problems.append((key, message, line))
    return problems


def _allowed_keys(model: type[BaseModel], loc: tuple[str, ...]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def _duplicate_keys(
    node: yaml.Node | None, prefix: tuple[str, ...] = ()
) -> list[tuple[str, str, int | None]]:
    """Every key given twice in one mapping (YAML keeps the last silently), with both lines."""
    if isinstance(node, yaml.SequenceNode):
        return [p for item in node.value for p in _duplicate_keys(item, prefix)]
    if not isinstance(node, yaml.MappingNode):
        return []
    problems: list[tuple[str, str, int | None]] = []
    first: dict[str, int] = {}
    for key_node, value_node in node.value:
        key, line = str(key_node.value), key_node.start_mark.line + 1
        if key in first:
            problems.append(
                (".".join((*prefix, key)), f"given twice (lines {first[key]} and {line})", line)
            )
        else:
            first[key] = line
        problems.extend(_duplicate_keys(value_node, (*prefix, key)))
    return problems


def _line_of(node: yaml.Node | None, loc: tuple[str, ...]) -> int | None:
    """1-based line of the YAML key at ``loc`` (the deepest one that exists)."""
    line = None
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        for key_node, value_node in node.value:
            if key_node.value == part:
                line = key_node.start_mark.line + 1
                node = value_node
                break
        else:
            break
    return line


def annotation_groups(tiling: TilingConfig):
    """The :class:`~pipeline.slides.annotations.Groups` of ``tiling``'s group names."""
    from pipeline.slides.annotations import Groups

    return Groups.of(tiling.tumor_groups, tiling.exclusion_groups)
