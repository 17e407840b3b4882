"""Commands that train models: mnist."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ..errors import DatasetError
from ._common import JsonOption, Reporter, _fail_usage, app

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
    out the 10,000 test digits; with only the test split (as in
    ../shared/data/mnist) it trains on 8,000 of them and holds out 2,000,
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
