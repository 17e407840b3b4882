"""Commands that run the Prefect flows: flow, deploy."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import ConfigError, WsiflowError
from ._common import (
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

FLOWS_HELP = "tile, train, infer, evaluate, camelyon (end to end) or mnist."
# Text, not Path: a patch store may be a URL (s3://bucket/x.zarr), which Path would mangle.
Inputs = Annotated[
    list[str] | None,
    typer.Argument(
        help="tile/infer: slides or folders; train: patch stores; evaluate: the inference "
        "folder; camelyon: the CAMELYON16-layout root (default: slides.root)."
    ),
]
OutOption = Annotated[
    str | None,
    typer.Option(
        "--out",
        "-o",
        help="tile: store (a path or an fsspec URL); train: model directory; "
        "infer/camelyon: output folder; evaluate: report folder; mnist: .keras file.",
    ),
]
ModelOption = Annotated[Path | None, typer.Option("--model", help="infer: a model directory.")]
AnnotationsOption = Annotated[
    Path | None, typer.Option("--annotations", "-a", help="tile/evaluate: annotation folder.")
]
ReferenceOption = Annotated[
    Path | None, typer.Option("--reference", "-r", help="evaluate: reference.csv.")
]
SlidesDirOption = Annotated[
    Path | None, typer.Option("--slides", "-s", help="evaluate: folder of the slides.")
]
MasksOption = Annotated[
    Path | None, typer.Option("--masks", help="evaluate: folder of <slide>_Mask.tif.")
]
ExtraOption = Annotated[
    list[Path] | None,
    typer.Option("--extra", help="camelyon: more slides to infer (default: slides.extra)."),
]
StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="camelyon: the patch store, a path or an fsspec URL (default: OUT/patches.zarr).",
    ),
]
DataOption = Annotated[
    Path | None, typer.Option("--data", help="mnist: folder of mnist.npz or IDX files.")
]
EpochsOption = Annotated[int, typer.Option("--epochs", min=1, help="mnist: epochs.")]
RulesOption = Annotated[
    str | None,
    typer.Option("--rules", help="evaluate: official (the organisers' script) or corrected."),
]
ExcludeOption = Annotated[
    list[str] | None,
    typer.Option("--exclude", help="evaluate: leave a slide out (any case); repeat."),
]
WorkersOption = Annotated[
    int | None, typer.Option("--workers", "-w", min=1, help="Local Dask worker processes.")
]


def flow_parameters(
    name: str,
    inputs: list[str],
    *,
    out: str | None,
    model: Path | None,
    annotations: Path | None,
    reference: Path | None,
    slides_dir: Path | None,
    masks: Path | None,
    extra: list[Path] | None,
    store: str | None = None,
    data: Path | None,
    epochs: int,
    overwrite: bool,
    config: Path | None,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """The flow's parameters from the command line (absolute paths: deployments run elsewhere).

    Raises ``ConfigError`` naming the missing option.
    """

    def need(option: str, value: Any) -> Any:
        if value is None or value == []:
            raise ConfigError(option, [(f"flow {name}", f"needs {option}", None)])
        return value

    from ..store import canonical

    def text(path: Path | str | None) -> str | None:
        return None if path is None else canonical(path)

    common = {"config": text(config), "settings": settings or None}
    if name == "tile":
        return {
            "slides": [text(p) for p in need("SLIDES", inputs)],
            "store": text(need("--out", out)),
            "annotations": text(annotations),
            "overwrite": overwrite,
            **common,
        }
    if name == "train":
        return {
            "stores": [text(p) for p in need("STORES", inputs)],
            "model_dir": text(need("--out", out)),
            **common,
        }
    if name == "infer":
        return {
            "model_dir": text(need("--model", model)),
            "slides": [text(p) for p in need("SLIDES", inputs)],
            "out_dir": text(need("--out", out)),
            "overwrite": overwrite,
            **common,
        }
    if name == "evaluate":
        return {
            "results_dir": text(need("RESULTS", inputs)[0]),
            "reference": text(need("--reference", reference)),
            "annotations_dir": text(annotations if masks else need("--annotations", annotations)),
            "slides_dir": text(slides_dir),
            "out_dir": text(out),
            "masks_dir": text(masks),
            **common,
        }
    if name == "camelyon":
        cfg = _load(config, settings)
        root = inputs[0] if inputs else cfg.slides.root
        extras = list(extra) if extra else list(cfg.slides.extra)
        return {
            "root": text(need("ROOT (or slides.root)", root)),
            "out_dir": text(need("--out", out)),
            "extra_slides": [text(p) for p in extras if p.exists()] or None,
            "store": text(store),
            **common,
        }
    if name == "mnist":
        return {"data_dir": text(data), "epochs": epochs, "model_path": text(out)}
    raise ConfigError("NAME", [(name, f"unknown flow; expected {FLOWS_HELP}", None)])


@app.command(name="flow")
def flow_command(
    name: Annotated[str, typer.Argument(help=f"The flow: {FLOWS_HELP}")],
    inputs: Inputs = None,
    out: OutOption = None,
    model: ModelOption = None,
    annotations: AnnotationsOption = None,
    reference: ReferenceOption = None,
    slides_dir: SlidesDirOption = None,
    masks: MasksOption = None,
    extra: ExtraOption = None,
    store: StoreOption = None,
    data: DataOption = None,
    epochs: EpochsOption = 6,
    rules: RulesOption = None,
    exclude: ExcludeOption = None,
    scheduler: SchedulerOption = None,
    workers: WorkersOption = None,
    overwrite: RedoOption = False,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run a Prefect flow (Dask task runner, retries, caching, artifacts).

    Uses the Prefect server in PREFECT_API_URL, or a temporary local one.
    One failing slide does not fail the flow: it is listed, and the exit
    code is 1. A second run is served from Prefect's cache.

    \b
    wsiflow flow tile SLIDES... --out STORE.zarr [--annotations DIR]
    wsiflow flow train STORE.zarr... --out MODEL_DIR
    wsiflow flow infer SLIDES... --model MODEL_DIR --out OUT_DIR
    wsiflow flow evaluate OUT_DIR --reference CSV --annotations DIR --slides DIR
        [--rules official|corrected] [--exclude SLIDE]...
    wsiflow flow camelyon [ROOT] --out OUT_DIR [--extra SLIDE...] [--store URL]
    wsiflow flow mnist [--data DIR] [--epochs N] [--out model.keras]
    """
    from flows.runtime import run_flow

    reporter = Reporter(as_json)
    try:
        settings = _settings(scheduler, workers, rules, exclude, config)
        parameters = flow_parameters(
            name,
            list(inputs or []),
            out=out,
            model=model,
            annotations=annotations,
            reference=reference,
            slides_dir=slides_dir,
            masks=masks,
            extra=extra,
            store=store,
            data=data,
            epochs=epochs,
            overwrite=overwrite,
            config=config,
            settings=settings,
        )
    except ConfigError as exc:
        _fail_usage(reporter, exc, "flow")
    try:
        summary = run_flow(name, parameters)
    except (WsiflowError, ValueError, FileNotFoundError) as exc:
        _fail_data(reporter, exc, f"flow {name}")
    _print_summary(reporter, summary)
    failures = summary.get("failures", [])
    reporter.finish({"command": "flow", "ok": not failures, **summary}, 1 if failures else 0)


@app.command()
def deploy(
    name: Annotated[str, typer.Argument(help=f"The flow: {FLOWS_HELP}")],
    inputs: Inputs = None,
    cron: Annotated[
        str | None, typer.Option("--cron", help='A cron schedule, e.g. "0 2 * * *" (nightly).')
    ] = None,
    interval: Annotated[
        float | None, typer.Option("--interval", min=1, help="Or run every this many seconds.")
    ] = None,
    deployment: Annotated[
        str | None, typer.Option("--name", help="Deployment name (default: wsiflow-NAME).")
    ] = None,
    out: OutOption = None,
    model: ModelOption = None,
    annotations: AnnotationsOption = None,
    reference: ReferenceOption = None,
    slides_dir: SlidesDirOption = None,
    masks: MasksOption = None,
    extra: ExtraOption = None,
    store: StoreOption = None,
    data: DataOption = None,
    epochs: EpochsOption = 6,
    rules: RulesOption = None,
    exclude: ExcludeOption = None,
    scheduler: SchedulerOption = None,
    workers: WorkersOption = None,
    config: ConfigOption = None,
) -> None:
    """Serve a flow as a Prefect deployment with a schedule, until interrupted.

    Needs a Prefect server (PREFECT_API_URL, e.g. `prefect server start`).
    Every scheduled or manual run (`prefect deployment run NAME/DEPLOYMENT`)
    uses these parameters; e.g. nightly inference over a watched folder,
    which predicts only the slides not done yet:

    \b
    wsiflow deploy infer /data/incoming --model models/best --out results --cron "0 2 * * *"
    """
    from prefect import serve
    from prefect.deployments.runner import EntrypointType
    from prefect.settings import get_current_settings

    from flows import get_flow

    reporter = Reporter(False)
    try:
        settings = _settings(scheduler, workers, rules, exclude, config)
        if not get_current_settings().api.url:
            raise ConfigError(
                "PREFECT_API_URL",
                [("unset", "start a server (`prefect server start`) and export "
                  "PREFECT_API_URL=http://127.0.0.1:4200/api", None)],
            )  # fmt: skip
        if cron is not None and interval is not None:
            raise ConfigError("--cron/--interval", [("both", "give one schedule", None)])
        parameters = flow_parameters(
            name,
            list(inputs or []),
            out=out,
            model=model,
            annotations=annotations,
            reference=reference,
            slides_dir=slides_dir,
            masks=masks,
            extra=extra,
            store=store,
            data=data,
            epochs=epochs,
            overwrite=False,
            config=config,
            settings=settings,
        )
        flow = get_flow(name)
    except ConfigError as exc:
        _fail_usage(reporter, exc, "deploy")
    # By module path: the runner imports flows.NAME (a file path would load it as a script).
    target = flow.to_deployment(
        name=deployment or f"wsiflow-{name}",
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


def _settings(
    scheduler: str | None,
    workers: int | None,
    rules: str | None,
    exclude: list[str] | None,
    config: Path | None,
) -> dict[str, Any]:
    """The config overrides the options give; ``ConfigError`` for bad values.

    ``--exclude`` adds to ``evaluation.exclude``, as `wsiflow evaluate` does.
    """
    settings: dict[str, Any] = {}
    if scheduler is not None:
        settings["orchestration.scheduler"] = scheduler
    if workers is not None:
        settings["orchestration.workers"] = workers
    if rules is not None:
        settings["evaluation.rules"] = rules
    if exclude:
        configured = _load(config, settings).evaluation.exclude
        settings["evaluation.exclude"] = [*configured, *exclude]
    _load(config, settings)
    return settings


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
