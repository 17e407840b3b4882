"""What a training run reports besides its directory: TensorBoard and MLflow."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import keras

from pipeline.config import TrainingConfig
from pipeline.errors import WsiflowError


def tensorboard(out_dir: Path) -> keras.callbacks.TensorBoard:
    """TensorBoard event files in ``out_dir/logs`` (no graph, no profiler)."""
    return keras.callbacks.TensorBoard(
        log_dir=str(out_dir / "logs"), write_graph=False, profile_batch=0
    )


class MlflowRun:
    """An MLflow run with Keras autologging, into ``./mlruns`` unless a URI is configured.

    Made before anything is written (:class:`WsiflowError` when MLflow cannot
    be imported); :meth:`start` opens the run, :meth:`end` closes it.
    """

    def __init__(self, cfg: TrainingConfig):
        try:
            import mlflow
            import mlflow.tensorflow  # its import needs pandas
        except ImportError as exc:
            raise WsiflowError(
                f"MLflow tracking was asked for (training.mlflow) but cannot be used: {exc}; "
                "pip install 'wsiflow[mlflow]'"
            ) from exc
        self.mlflow, self.cfg, self.run = mlflow, cfg, None

    def start(self, out_dir: Path) -> None:
        mlflow, cfg = self.mlflow, self.cfg
        uri = cfg.mlflow_tracking_uri
        if uri is None:
            # MLflow 3 keeps the file store in maintenance mode behind this switch.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (Path.cwd() / "mlruns").as_uri()
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("wsiflow")
        # No dataset logging: MLflow would iterate the endless training stream to hash it.
        mlflow.tensorflow.autolog(
            log_models=False, log_datasets=False, checkpoint=False, silent=True
        )
        self.run = mlflow.start_run(run_name=out_dir.name)
        mlflow.log_params({f"wsiflow.{k}": v for k, v in cfg.model_dump(mode="json").items()})

    def failed(self) -> None:
        if self.run is not None:
            self.mlflow.end_run(status="FAILED")

    def end(self, metrics: dict[str, Any], metadata_file: Path) -> None:
        """Log the best epoch's metrics and the model metadata, and close the run."""
        if self.run is None:
            return
        best = {f"wsiflow_{k}": v for k, v in metrics.items() if v is not None}
        self.mlflow.log_metrics(best)
        self.mlflow.log_artifact(str(metadata_file))
        self.mlflow.end_run()
