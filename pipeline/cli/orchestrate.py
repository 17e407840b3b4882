"""Commands that run the Prefect flows: ``flow STAGE`` and ``deploy STAGE``.

Each stage's options are written once, in its parameter builder below (a
function of the options that returns the flow's parameters); both command
groups are made from the same builders, with their own common options.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from pipeline.cli._common import (
    ConfigOption,
    JsonOption,
    RedoOption,
    Reporter,
    SchedulerOption,
    _fail_data,
    _fail_usage,
    _load,
    app,
)
from pipeline.errors import ConfigError, WsiflowError

FLOWS_HELP = "tile, train, infer, evaluate, camelyon (end to end) or mnist."

# Text, not Path: a patch store may be a URL (s3://bucket/x.zarr), which Path would mangle.
SlideInputs = Annotated[
    list[str] | None, typer.Argument(metavar="SLIDES", help="Slides or folders.")
]
StoreInputs = Annotated[
    list[str] | None,
    typer.Argument(metavar="STORES", help="Patch stores (paths or fsspec URLs)."),
]
ResultsInput = Annotated[
    str | None,
    typer.Argument(metavar="RESULTS", help="An inference output folder (`wsiflow infer --out`)."),
]
RootInput = Annotated[
    str | None,
    typer.Argument(metavar="ROOT", help="The CAMELYON16-layout root (default: slides.root)."),
]
StoreOut = Annotated[
    str | None,
    typer.Option("--out", "-o", help="The patch store: a path or an fsspec URL."),
]
ModelOut = Annotated[str | None, typer.Option("--out", "-o", help="The model directory.")]
FolderOut = Annotated[str | None, typer.Option("--out", "-o", help="The output folder.")]
ReportOut = Annotated[
    str | None, typer.Option("--out", "-o", help="The report folder (default: RESULTS).")
]
KerasOut = Annotated[str | None, typer.Option("--out", "-o", help="Where to save the .keras file.")]
ModelOption = Annotated[Path | None, typer.Option("--model", help="A model directory.")]
AnnotationsOption = Annotated[
    Path | None, typer.Option("--annotations", "-a", help="Folder of lesion annotations.")
]
ReferenceOption = Annotated[Path | None, typer.Option("--reference", "-r", help="reference.csv.")]
SlidesDirOption = Annotated[
    Path | None, typer.Option("--slides", "-s", help="Folder of the slides (size and µm/px).")
]
MasksOption = Annotated[
    Path | None,
    typer.Option("--masks", help="Folder of <slide>_Mask.tif (instead of annotations)."),
]
RulesOption = Annotated[
    str | None,
    typer.Option("--rules", help="official (the organisers' script, bit for bit) or corrected."),
]
ExcludeOption = Annotated[
    list[str] | None,
    typer.Option("--exclude", help="Leave a slide out (any case); repeat."),
]
ExtraOption = Annotated[
    list[Path] | None,
    typer.Option("--extra", help="More slides to infer (default: slides.extra)."),
]
StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store", help="The patch store, a path or an fsspec URL (default: OUT/patches.zarr)."
    ),
]
DataOption = Annotated[
    Path | None, typer.Option("--data", help="Folder of mnist.npz or IDX files.")
]
EpochsOption = Annotated[int, typer.Option("--epochs", min=1, help="Epochs.")]
TrainingWorkersOption = Annotated[
    int | None,
    typer.Option(
        "--training-workers",
        min=1,
        help="Training processes, one per Dask worker (MultiWorkerMirroredStrategy).",
    ),
]
WorkersOption = Annotated[
    int | None, typer.Option("--workers", "-w", min=1, help="Local Dask worker processes.")
]


@dataclass(frozen=True)
class Common:
    """The options every flow takes: the config file and the settings that override it."""

    config: Path | None
    settings: dict[str, Any]

    def parameters(self) -> dict[str, Any]:
        return {"config": _text(self.config), "settings": self.settings or None}

    def with_settings(self, extra: dict[str, Any]) -> Common:
        """These options with ``extra`` settings too; ``ConfigError`` for bad values."""
        settings = {**self.settings, **extra}
        _load(self.config, settings)
        return Common(self.config, settings)


def _text(path: Path | str | None) -> str | None:
    """An absolute path, or a URL as given: deployments run elsewhere."""
    from pipeline.store.patch_store import canonical

    return None if path is None else canonical(path)


def _need(stage: str, option: str, value: Any) -> Any:
    if value is None or value == []:
        raise ConfigError(option, [(f"flow {stage}", f"needs {option}", None)])
    return value


# One builder per flow: its options, once, for both `flow STAGE` and `deploy STAGE`.
# The first argument is the Common options; ConfigError names a missing one.


def tile_parameters(
    common: Common,
    slides: SlideInputs = None,
    out: StoreOut = None,
    annotations: AnnotationsOption = None,
    overwrite: RedoOption = False,
) -> dict[str, Any]:
    """Tile slides into a patch store: one task per slide."""
    return {
        "slides": [_text(p) for p in _need("tile", "SLIDES", slides)],
        "store": _text(_need("tile", "--out", out)),
        "annotations": _text(annotations),
        "overwrite": overwrite,
        **common.parameters(),
    }


def train_parameters(
    common: Common,
    stores: StoreInputs = None,
    out: ModelOut = None,
    training_workers: TrainingWorkersOption = None,
) -> dict[str, Any]:
    """Train a patch classifier on patch stores (on several Dask workers: --training-workers)."""
    if training_workers is not None:
        common = common.with_settings({"orchestration.training_workers": training_workers})
    return {
        "stores": [_text(p) for p in _need("train", "STORES", stores)],
        "model_dir": _text(_need("train", "--out", out)),
        **common.parameters(),
    }


def infer_parameters(
    common: Common,
    slides: SlideInputs = None,
    model: ModelOption = None,
    out: FolderOut = None,
    overwrite: RedoOption = False,
) -> dict[str, Any]:
    """Predict heatmaps, detections and slide scores: one task per slide."""
    return {
        "model_dir": _text(_need("infer", "--model", model)),
        "slides": [_text(p) for p in _need("infer", "SLIDES", slides)],
        "out_dir": _text(_need("infer", "--out", out)),
        "overwrite": overwrite,
        **common.parameters(),
    }


def evaluate_parameters(
    common: Common,
    results: ResultsInput = None,
    reference: ReferenceOption = None,
    annotations: AnnotationsOption = None,
    slides_dir: SlidesDirOption = None,
    masks: MasksOption = None,
    out: ReportOut = None,
    rules: RulesOption = None,
    exclude: ExcludeOption = None,
) -> dict[str, Any]:
    """CAMELYON16 slide AUC and lesion FROC of an inference output folder."""
    extra: dict[str, Any] = {} if rules is None else {"evaluation.rules": rules}
    if exclude:  # added to evaluation.exclude, as `wsiflow evaluate` does
        configured = _load(common.config, common.settings).evaluation.exclude
        extra["evaluation.exclude"] = [*configured, *exclude]
    common = common.with_settings(extra)
    return {
        "results_dir": _text(_need("evaluate", "RESULTS", results)),
        "reference": _text(_need("evaluate", "--reference", reference)),
        "annotations_dir": _text(
            annotations if masks else _need("evaluate", "--annotations", annotations)
        ),
        "slides_dir": _text(slides_dir),
        "out_dir": _text(out),
        "masks_dir": _text(masks),
        **common.parameters(),
    }


def camelyon_parameters(
    common: Common,
    root: RootInput = None,
    out: FolderOut = None,
    extra: ExtraOption = None,
    store: StoreOption = None,
) -> dict[str, Any]:
    """End to end on a CAMELYON16-layout folder: tile, train, infer, evaluate."""
    cfg = _load(common.config, common.settings)
    root = root if root is not None else cfg.slides.root
    extras = list(extra) if extra else list(cfg.slides.extra)
    return {
        "root": _text(_need("camelyon", "ROOT (or slides.root)", root)),
        "out_dir": _text(_need("camelyon", "--out", out)),
        "extra_slides": [_text(p) for p in extras if p.exists()] or None,
        "store": _text(store),
        **common.parameters(),
    }


def mnist_parameters(
    common: Common, data: DataOption = None, epochs: EpochsOption = 6, out: KerasOut = None
) -> dict[str, Any]:
    """Train and evaluate the MNIST CNN."""
    return {"data_dir": _text(data), "epochs": epochs, "model_path": _text(out)}


BUILDERS: dict[str, Callable[..., dict[str, Any]]] = {
    "tile": tile_parameters,
    "train": train_parameters,
    "infer": infer_parameters,
    "evaluate": evaluate_parameters,
    "camelyon": camelyon_parameters,
    "mnist": mnist_parameters,
}


def _parameters(
    builder: Callable[..., dict[str, Any]], stage: dict[str, Any], options: dict[str, Any]
) -> dict[str, Any]:
    """The flow's parameters from a command's stage options and common options."""
    settings: dict[str, Any] = {}
    if options["scheduler"] is not None:
        settings["orchestration.scheduler"] = options["scheduler"]
    if options["workers"] is not None:
        settings["orchestration.workers"] = options["workers"]
    common = Common(options["config"], {}).with_settings(settings)
    return builder(common, **stage)


class _StageGroup(TyperGroup):
    """A command group that names the stages when given one it does not have."""

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            ctx.fail(f"{args[0]}: unknown flow; expected {FLOWS_HELP}")
        return super().resolve_command(ctx, args)


flow_app = typer.Typer(
    cls=_StageGroup,
    no_args_is_help=True,
    help="Run a Prefect flow (Dask task runner, retries, caching, artifacts).\n\n"
    "Uses the Prefect server in PREFECT_API_URL, or a temporary local one. One failing "
    "slide does not fail the flow: it is listed, and the exit code is 1. A second run is "
    "served from Prefect's cache.",
)
deploy_app = typer.Typer(
    cls=_StageGroup,
    no_args_is_help=True,
    help="Serve a flow as a Prefect deployment with a schedule, until interrupted.\n\n"
    "Needs a Prefect server (PREFECT_API_URL, e.g. `prefect server start`). Every "
    "scheduled or manual run (`prefect deployment run NAME/DEPLOYMENT`) uses these "
    "parameters; e.g. nightly inference over a watched folder, which predicts only the "
    "slides not done yet:\n\n\b\nwsiflow deploy infer /data/incoming --model models/best "
    '--out results --cron "0 2 * * *"',
)
app.add_typer(flow_app, name="flow")
app.add_typer(deploy_app, name="deploy")


def _flow_options(
    scheduler: SchedulerOption = None,
    workers: WorkersOption = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """The options `flow STAGE` adds to the stage's own."""


def _deploy_options(
    cron: Annotated[
        str | None, typer.Option("--cron", help='A cron schedule, e.g. "0 2 * * *" (nightly).')
    ] = None,
    interval: Annotated[
        float | None, typer.Option("--interval", min=1, help="Or run every this many seconds.")
    ] = None,
    deployment: Annotated[
        str | None, typer.Option("--name", help="Deployment name (default: wsiflow-NAME).")
    ] = None,
    scheduler: SchedulerOption = None,
    workers: WorkersOption = None,
    config: ConfigOption = None,
) -> None:
    """The options `deploy STAGE` adds to the stage's own."""


def _command(
    builder: Callable[..., dict[str, Any]],
    options: Callable[..., None],
    body: Callable[[dict[str, Any], dict[str, Any]], None],
    *,
    drop: tuple[str, ...] = (),
) -> Callable[..., None]:
    """A command whose options are ``builder``'s (less ``drop``) followed by ``options``'.

    ``body(stage_kwargs, option_kwargs)`` runs it. Typer reads the signature.
    """
    stage = [
        p
        for p in list(inspect.signature(builder, eval_str=True).parameters.values())[1:]
        if p.name not in drop
    ]
    shared = list(inspect.signature(options, eval_str=True).parameters.values())
    names = {p.name for p in stage}

    def command(**kwargs: Any) -> None:
        body(
            {k: v for k, v in kwargs.items() if k in names},
            {k: v for k, v in kwargs.items() if k not in names},
        )

    command.__signature__ = inspect.Signature([*stage, *shared])  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in (*stage, *shared)}
    command.__doc__ = builder.__doc__
    return command


def _run_flow(name: str, builder: Callable[..., dict[str, Any]]) -> Callable[..., None]:
    def body(stage: dict[str, Any], options: dict[str, Any]) -> None:
        from flows.runtime import run_flow

        reporter = Reporter(options["as_json"])
        try:
            parameters = _parameters(builder, stage, options)
        except ConfigError as exc:
            _fail_usage(reporter, exc, "flow")
        try:
            summary = run_flow(name, parameters)
        except (WsiflowError, ValueError, FileNotFoundError) as exc:
            _fail_data(reporter, exc, f"flow {name}")
        _print_summary(reporter, summary)
        failures = summary.get("failures", [])
        reporter.finish({"command": "flow", "ok": not failures, **summary}, 1 if failures else 0)

    return _command(builder, _flow_options, body)


def _serve_deployment(name: str, builder: Callable[..., dict[str, Any]]) -> Callable[..., None]:
    def body(stage: dict[str, Any], options: dict[str, Any]) -> None:
        from prefect import serve
        from prefect.deployments.runner import EntrypointType
        from prefect.settings import get_current_settings

        from flows import get_flow

        reporter = Reporter(False)
        cron, interval = options["cron"], options["interval"]
        try:
            if not get_current_settings().api.url:
                raise ConfigError(
                    "PREFECT_API_URL",
                    [("unset", "start a server (`prefect server start`) and export "
                      "PREFECT_API_URL=http://127.0.0.1:4200/api", None)],
                )  # fmt: skip
            if cron is not None and interval is not None:
                raise ConfigError("--cron/--interval", [("both", "give one schedule", None)])
            parameters = _parameters(builder, stage, options)
            flow = get_flow(name)
        except ConfigError as exc:
            _fail_usage(reporter, exc, "deploy")
        # By module path: the runner imports flows.NAME (a file path would load it as a script).
        target = flow.to_deployment(
            name=options["deployment"] or f"wsiflow-{name}",
            parameters=parameters,
            cron=cron,
            interval=None if interval is None else timedelta(seconds=interval),
            tags=["wsiflow"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        reporter.console.print(
            f"serving {flow.name}/{target.name}"
            + (f" on schedule {cron or f'every {interval:g} s'}" if cron or interval else "")
            + "; Ctrl+C stops"
        )
        serve(target, print_starting_message=False)

    # A schedule never redoes finished slides: deployments take no --overwrite.
    return _command(builder, _deploy_options, body, drop=("overwrite",))


for _name, _builder in BUILDERS.items():
    flow_app.command(name=_name)(_run_flow(_name, _builder))
    deploy_app.command(name=_name)(_serve_deployment(_name, _builder))


def _print_summary(reporter: Reporter, summary: dict[str, Any]) -> None:
    """The flow's headline numbers, then one line per failure."""
    from flows.camelyon import summary_rows

    table = Table(title=f"flow {summary.get('flow')}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    if summary.get("flow") == "camelyon":
        rows = summary_rows(summary)
    else:
        rows = [
            (key, str(value))
            for key, value in summary.items()
            if key not in ("flow", "failures") and not isinstance(value, dict | list)
        ]
    for what, value in rows:
        table.add_row(what, escape(value))
    reporter.console.print(table)
    for failure in summary.get("failures", []):
        reporter.errors.print(f"[red]failed:[/red] {escape(str(failure.get('reason')))}")
