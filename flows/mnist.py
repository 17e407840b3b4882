"""``mnist_flow``: the general CNN on MNIST, the smallest end-to-end check of training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task

from flows import artifacts
from flows.runtime import CACHE_EXPIRATION, cache_key, folder_identity, task_options
from pipeline.config import OrchestrationConfig

#: The held-out split when only MNIST's 10,000 test digits are available (as the CLI).
TEST_ONLY_TRAIN, TEST_ONLY_HOLDOUT = 8000, 2000


def _mnist_key(context: Any, parameters: dict[str, Any]) -> str:
    data = parameters["data_dir"]
    return cache_key(
        "mnist",
        folder_identity(data) if data else "keras download",
        parameters["epochs"],
        parameters["batch_size"],
        parameters["seed"],
        str(Path(parameters["model_path"]).resolve()) if parameters["model_path"] else None,
    )


@task(cache_key_fn=_mnist_key, cache_expiration=CACHE_EXPIRATION, persist_result=True)
def mnist_task(
    data_dir: str | None, epochs: int, batch_size: int, seed: int, model_path: str | None
) -> dict[str, Any]:
    """Load MNIST, train the CNN, return held-out metrics (and save the model if asked)."""
    from models.mnist import holdout_split, load_mnist, train_mnist

    dataset = load_mnist(Path(data_dir) if data_dir else None)
    if dataset.train is not None:
        train, held_out = dataset.train, dataset.test
    else:
        train, held_out = holdout_split(
            *dataset.test, n_train=TEST_ONLY_TRAIN, n_holdout=TEST_ONLY_HOLDOUT, seed=seed
        )
    result = train_mnist(train, held_out, epochs=epochs, batch_size=batch_size, seed=seed)
    if model_path:
        Path(model_path).parent.mkdir(parents=True, exist_ok=True)
        result.model.save(model_path)
    return {
        "source": dataset.source,
        "train_samples": len(train[0]),
        "held_out_samples": len(held_out[0]),
        "held_out_accuracy": round(result.held_out_accuracy, 4),
        "held_out_loss": round(result.held_out_loss, 4),
        "seconds": round(result.seconds, 1),
        "model": model_path,
    }


@flow(name="mnist", log_prints=True)
def mnist_flow(
    data_dir: str | None = None,
    epochs: int = 6,
    batch_size: int = 64,
    seed: int = 0,
    model_path: str | None = None,
) -> dict[str, Any]:
    """Train the MNIST CNN on ``data_dir`` (mnist.npz or IDX files; none: Keras download).

    With only the 10,000 test digits (the t10k files) it trains
    on 8,000 and holds out 2,000. Served from cache for the same data and
    settings while the saved model (if any) is still there.
    """
    refresh = bool(model_path) and not Path(model_path).is_file()
    options = task_options(OrchestrationConfig(), io=False, refresh=refresh)
    summary = mnist_task.with_options(**options)(data_dir, epochs, batch_size, seed, model_path)
    artifacts.summary_markdown(
        "mnist-summary",
        "MNIST CNN",
        [
            ("data", summary["source"]),
            (
                "samples",
                f"{summary['train_samples']:,} train, {summary['held_out_samples']:,} held out",
            ),
            ("held-out accuracy", f"{summary['held_out_accuracy']:.4f}"),
            ("model", summary["model"] or "not saved"),
        ],
    )
    return {"flow": "mnist", "epochs": epochs, **summary}
