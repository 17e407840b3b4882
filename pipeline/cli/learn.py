"""Commands that train models: mnist, train, mine, slide-classifier."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from pipeline.cli._common import (
    ConfigOption,
    JsonOption,
    Reporter,
    _fail_data,
    _fail_usage,
    _load,
    app,
    output_lock,
)
from pipeline.errors import ConfigError, DatasetError, WsiflowError

#: The held-out split used when only MNIST's 10,000 test digits are available.
TEST_ONLY_TRAIN, TEST_ONLY_HOLDOUT = 8000, 2000


@app.command()
def mnist(
    data: Annotated[
        Path | None,
        typer.Option(
            "--data", help="Folder with mnist.npz or the IDX files; none: Keras download."
        ),
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Training epochs.")] = 6,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Batch size.")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Split and training seed.")] = 0,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Save the trained model here (.keras).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Train the CNN on MNIST and report its held-out accuracy.

    With the full dataset it trains on the 60,000 training digits and holds
    out the 10,000 test digits; with only the test split (the 10,000
    t10k digits) it trains on 8,000 of them and holds out 2,000,
    split with a fixed seed.
    """
    from models.mnist import holdout_split, load_mnist, train_mnist

    reporter = Reporter(as_json)
    try:
        dataset = load_mnist(data)
    except DatasetError as exc:
        _fail_usage(reporter, exc, "mnist")
    if dataset.train is not None:
        train, held_out = dataset.train, dataset.test
    else:
        train, held_out = holdout_split(
            *dataset.test, n_train=TEST_ONLY_TRAIN, n_holdout=TEST_ONLY_HOLDOUT, seed=seed
        )
    reporter.console.print(
        f"MNIST from {dataset.source}: training on {len(train[0]):,} digits, "
        f"holding out {len(held_out[0]):,}; {epochs} epochs on {os.cpu_count()} CPU cores"
    )
    result = train_mnist(train, held_out, epochs=epochs, batch_size=batch_size, seed=seed)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        result.model.save(out)
    reporter.console.print(
        f"held-out accuracy {result.held_out_accuracy:.4f} (loss {result.held_out_loss:.4f}) "
        f"after {result.seconds:.0f} s"
    )
    reporter.finish(
        {
            "command": "mnist",
            "ok": True,
            "source": dataset.source,
            "train_samples": len(train[0]),
            "held_out_samples": len(held_out[0]),
            "epochs": epochs,
            "held_out_accuracy": round(result.held_out_accuracy, 4),
            "held_out_loss": round(result.held_out_loss, 4),
            "train_accuracy": [round(a, 4) for a in result.history.get("accuracy", [])],
            "seconds": round(result.seconds, 1),
            "model": None if out is None else str(out),
        }
    )


@app.command()
def train(
    stores: Annotated[
        list[str],
        typer.Argument(help="Patch stores written by `wsiflow tile` (paths or fsspec URLs)."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model directory to write.")],
    backbone: Annotated[
        str | None,
        typer.Option(
            "--backbone",
            help="mobilenetv2, resnet50, inceptionv3, efficientnetb0 or small_cnn.",
        ),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights",
            help="imagenet, none, a backbone weights file, or a wsiflow model directory "
            "(fine-tune it).",
        ),
    ] = None,
    replicas: Annotated[
        int | None,
        typer.Option(
            "--replicas", min=1, help="Logical CPU devices for MirroredStrategy (no GPUs)."
        ),
    ] = None,
    cluster: Annotated[
        str | None,
        typer.Option(
            "--cluster",
            help="HOST:PORT,HOST:PORT,...: train as one worker of a multi-worker run "
            "(MultiWorkerMirroredStrategy), with --worker-index; TF_CONFIG works too.",
        ),
    ] = None,
    worker_index: Annotated[
        int | None,
        typer.Option(
            "--worker-index", min=0, help="This process's worker in --cluster (0: the chief)."
        ),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(
            "--epochs", min=1, help="Total epochs (head epochs as configured, the rest fine-tune)."
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Batch per replica.")
    ] = None,
    steps_per_epoch: Annotated[
        int | None, typer.Option("--steps-per-epoch", min=1, help="Training steps per epoch.")
    ] = None,
    mixed_precision: Annotated[
        bool | None,
        typer.Option(
            "--mixed-precision/--no-mixed-precision",
            help="float16 (GPU) / bfloat16 (CPU) compute.",
        ),
    ] = None,
    mlflow: Annotated[
        bool | None,
        typer.Option("--mlflow/--no-mlflow", help="Log to MLflow (pip install 'wsiflow[mlflow]')."),
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Split and training seed.")] = None,
    hard_negative_share: Annotated[
        float | None,
        typer.Option(
            "--hard-negative-share",
            help="Share of each epoch's normal patches drawn from the stores' mined hard "
            "negatives (`wsiflow mine`).",
        ),
    ] = None,
    hard_negatives_from: Annotated[
        str | None,
        typer.Option(
            "--hard-negatives-from",
            help="The model whose mining to use, when several models mined the stores.",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Discard a finished or interrupted run in --out.")
    ] = False,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Train a patch classifier (transfer learning, MirroredStrategy) on patch stores.

    A finished run with the same stores and settings is reused; an interrupted
    one resumes from its last epoch; --overwrite starts afresh. With
    --cluster, run the same command on every worker: worker 0 writes --out.
    """
    from models.distribute import training_cluster
    from pipeline.config import with_overrides

    reporter = Reporter(as_json)
    try:
        overrides: dict[str, Any] = {
            "training.backbone": backbone,
            "training.weights": weights,
            "training.replicas": replicas,
            "training.batch_per_replica": batch_size,
            "training.steps_per_epoch": steps_per_epoch,
            "training.mixed_precision": mixed_precision,
            "training.mlflow": mlflow,
            "training.seed": seed,
            "training.hard_negative_share": hard_negative_share,
            "training.hard_negatives_from": hard_negatives_from,
        }
        cfg = _load(config, overrides)
        if epochs is not None:
            head = min(cfg.training.head_epochs, epochs)
            cfg = with_overrides(
                cfg, {"training.head_epochs": head, "training.fine_tune_epochs": epochs - head}
            )
        workers = training_cluster(cluster, worker_index)
    except ConfigError as exc:
        _fail_usage(reporter, exc, "train")
    try:
        summary = run_train(reporter, stores, out, cfg, overwrite=overwrite, cluster=workers)
    except WsiflowError as exc:  # a store, model directory or weights file: named
        _fail_data(reporter, exc, "train")
    except ValueError as exc:  # unknown backbone, patch too small, no epochs, ...
        _fail_usage(reporter, exc, "train")
    reporter.finish(summary)


def run_train(
    reporter: Reporter,
    stores: list[Path | str],
    out: Path,
    cfg,
    *,
    overwrite: bool,
    replace_different: bool = False,
    cluster=None,
) -> dict:
    """Train with a per-step progress bar and one line per epoch; return the summary.

    ``cluster``: a :class:`models.distribute.TrainingCluster` this process is a worker of.

    Bad inputs raise (:class:`WsiflowError` naming the file, ``ValueError``)
    before ``out`` is made or locked, and before the first step.
    """
    from models.distribute import check_cluster_replicas
    from models.inputs import check_training_inputs

    training = cfg.training
    # Bad inputs fail here, in about a second: models.train imports Keras (~3 s).
    check_cluster_replicas(cluster, training.replicas)
    inputs = check_training_inputs(stores, training, workers=len(cluster.workers) if cluster else 1)
    from models.train import train_classifier

    with reporter.progress() as progress:
        steps_task = progress.add_task("epoch", total=None, rate="")

        def on_batch(epoch: int, step: int, steps: int) -> None:
            progress.update(steps_task, completed=step, total=steps, description=f"epoch {epoch}")

        def on_epoch(record) -> None:
            logs = record.logs
            mark = "  [green]best[/green]" if record.improved else ""
            stop = "  [yellow]early stop[/yellow]" if record.stopped else ""
            progress.console.print(
                f"epoch {record.epoch}/{record.total_epochs} {record.phase:<9} "
                f"loss {logs['loss']:.4f} auc {logs['auc']:.4f}  "
                f"val_loss {logs['val_loss']:.4f} val_auc {logs['val_auc']:.4f}  "
                f"{logs['seconds']:.0f} s, {logs['patches_per_s']:,.0f} patches/s{mark}{stop}"
            )

        result = train_classifier(
            stores,
            out,
            training,
            config=cfg.model_dump(mode="json"),
            overwrite=overwrite,
            replace_different=replace_different,
            on_epoch=on_epoch,
            on_batch=on_batch,
            hold=lambda: output_lock(reporter, out, "model"),
            cluster=cluster,
            inputs=inputs,
        )
        progress.remove_task(steps_task)
    meta = result.metadata
    metrics = meta["metrics"]
    train_slides, val_slides = meta["slides"]["train"], meta["slides"]["validation"]
    if result.reused:
        reporter.console.print(f"{out}: already trained on these stores with these settings")
    elif result.resumed_at_epoch:
        reporter.console.print(f"resumed after epoch {result.resumed_at_epoch}")
    reporter.console.print(
        f"{meta['backbone']} on {meta['patch_px']} px patches; "
        f"{len(train_slides)} training / {len(val_slides)} validation slides; "
        f"{meta['replicas']} replica(s)"
        + (f" on {meta['workers']} workers" if meta.get("workers", 1) > 1 else "")
        + f", global batch {meta['global_batch']}"
    )
    if cluster is not None and not cluster.is_chief:
        reporter.console.print(f"worker {cluster.index}: worker 0 writes the model to {out}")
    for row in meta.get("stain", {}).get("fallback", []):
        reporter.warn(f"{row['store']} slide {row['slide_id']}: {row['reason']}")
    reporter.console.print(
        f"best validation AUC {metrics['val_auc']:.4f} at epoch {metrics['best_epoch']} "
        f"of {metrics['epochs_run']}; model in {out / 'model.keras'}"
    )
    if metrics.get("test_auc") is not None:
        test = meta["slides"]["test"]
        reporter.console.print(
            f"held-out test split ({', '.join(s['slide_id'] for s in test)}, "
            f"{sum(s['patches'] for s in test):,} patches): AUC {metrics['test_auc']:.4f}, "
            f"accuracy {metrics['test_accuracy']:.4f}"
        )
    return {"command": "train", "ok": True, **result.summary()}


@app.command()
def mine(
    store: Annotated[str, typer.Argument(help="A patch store written by `wsiflow tile`.")],
    model: Annotated[
        Path, typer.Option("--model", "-m", help="The first model (`wsiflow train` on STORE).")
    ],
    threshold: Annotated[
        float | None,
        typer.Option("--threshold", help="Normal patches the model calls at least this are mined."),
    ] = None,
    margin_um: Annotated[
        float | None,
        typer.Option("--margin-um", help="No part of a mined patch this close to a tumor outline."),
    ] = None,
    slides: Annotated[
        list[str] | None,
        typer.Option(
            "--slide",
            help="Mine this slide of STORE; repeat (default: the model's training slides).",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Mine slides already mined with these settings.")
    ] = False,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Mine hard negatives: normal patches of STORE that a first model calls tumor.

    They are recorded in the store beside each slide's patches (rows, the
    model's probabilities, the model and settings); `wsiflow train
    --hard-negative-share S` then trains again on them.
    """
    from pipeline.mining.driver import mine_store, summarize

    reporter = Reporter(as_json)
    try:
        cfg = _load(config, {"mining.threshold": threshold, "mining.margin_um": margin_um})
    except ConfigError as exc:
        _fail_usage(reporter, exc, "mine")

    def report(result) -> None:
        if result.status == "failed":
            reporter.errors.print(f"[red]failed:[/red] {escape(result.reason)}")

    try:
        with output_lock(reporter, store):
            results = mine_store(
                store, model, cfg.mining, slides=slides, overwrite=overwrite, on_slide=report
            )
    except WsiflowError as exc:
        _fail_data(reporter, exc, "mine")
    summary = summarize(results, store, model)
    table = Table(title=f"hard negatives in {store} (threshold {cfg.mining.threshold:g})")
    for column in ("slide", "status", "candidates", "mined"):
        table.add_column(column, no_wrap=column == "slide")
    for r in results:
        table.add_row(r.slide_id, r.status, f"{r.candidates:,}", f"{r.mined:,}")
    reporter.console.print(table)
    reporter.finish(
        {"command": "mine", "ok": not summary["failed"], **summary},
        exit_code=1 if summary["failed"] else 0,
    )


@app.command("slide-classifier")
def slide_classifier(
    model: Annotated[Path, typer.Argument(help="A model directory written by `wsiflow train`.")],
    results: Annotated[
        list[Path],
        typer.Argument(
            help="`wsiflow infer` output folders whose heatmaps it learns from (not the "
            "slides you will evaluate it on)."
        ),
    ],
    labels: Annotated[
        Path,
        typer.Option(
            "--labels", "-l", help="CSV of name,Tumor|Normal per slide (reference.csv's format)."
        ),
    ],
    kind: Annotated[
        str | None,
        typer.Option("--kind", help="random_forest (default, as HMS-MIT) or gradient_boosting."),
    ] = None,
    trees: Annotated[
        int | None, typer.Option("--trees", help="Trees (or boosting rounds).")
    ] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Fit a slide classifier on heatmap features and keep it with the model.

    `wsiflow infer --slide-score classifier` then scores slides with it. Fit
    it on heatmaps of slides the patch model did not train on: those it
    trained on are counted and warned about.
    """
    from pipeline.evaluation.reference import read_reference
    from pipeline.inference.slide_classifier import describe, fit_from_results

    reporter = Reporter(as_json)
    try:
        cfg = _load(config, {"slide_classifier.kind": kind, "slide_classifier.trees": trees})
        missing = [(str(p), "no such folder", None) for p in results if not p.is_dir()]
        if missing:
            raise ConfigError("RESULTS", missing)
        if not labels.is_file():
            raise ConfigError("--labels", [(str(labels), "no such file", None)])
    except ConfigError as exc:
        _fail_usage(reporter, exc, "slide-classifier")
    try:
        summary = fit_from_results(model, results, read_reference(labels), cfg.slide_classifier)
    except (WsiflowError, ValueError) as exc:
        _fail_data(reporter, exc, "slide-classifier")
    if summary["in_sample"]:
        reporter.warn(
            f"{summary['in_sample']} of {summary['slides']} heatmaps are of slides the patch "
            "model trained or validated on: they are more confident than a new slide's, and "
            "the classifier learns from that (recorded in slide_classifier.json)"
        )
    if summary["unlabelled"]:
        reporter.warn("not in --labels, so not used: " + ", ".join(summary["unlabelled"]))
    if summary["reused"]:
        reporter.console.print(
            f"{summary['classifier']}: already fitted on these heatmaps with these settings"
        )
    reporter.console.print(f"{describe(summary)}; in {summary['classifier']}")
    reporter.finish({"command": "slide-classifier", "ok": True, **summary})
