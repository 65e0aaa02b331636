"""A checkpoint as an MLflow 3 LoggedModel of its run: the "Logged models" page lists it with the run, its
step and the run's metrics at that step.

MLflow's pytorch flavour would save a pickle or a `torch.export` of `forward` alone; this logs a "models
from code" pyfunc (`dfcvae_dist/pyfunc_model.py`) whose artifacts are the checkpoint's `weights.safetensors`
and `config.yaml`, with our package as its code. It is done with `MlflowClient` calls on an explicit run
id, never through MLflow's active run (see `Tracker`), inside one call of the background sender.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from dfcvae_dist.rundir import CONFIG_FILE, WEIGHTS_FILE

FINAL_MODEL = "model"  # the name of the final model: `runs:/<run_id>/model`
CODE_FILE = Path(__file__).with_name("pyfunc_model.py")
PACKAGE_DIR = Path(__file__).parent
REQUIREMENTS = ("mlflow", "torch", "safetensors", "pyyaml", "numpy")


def model_signature():
    """One float32 4-D input (images, or latents as (N, latent_dim, 1, 1)) and the `mode` parameter."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, -1))]),
                          params=ParamSchema([ParamSpec("mode", "string", "reconstruct")]))


def pinned_requirements() -> list[str]:
    """Pinned from this environment: MLflow would otherwise infer them by loading the model in a subprocess."""
    pinned = []
    for name in REQUIREMENTS:
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pinned.append(name)
    return pinned


def save_pyfunc(checkpoint: Path, local_dir: Path, mlflow_model=None) -> None:
    """The MLflow model folder of a checkpoint folder (weights.safetensors + config.yaml)."""
    import mlflow.pyfunc

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example")  # the signature says more than one would
        mlflow.pyfunc.save_model(str(local_dir), python_model=str(CODE_FILE), mlflow_model=mlflow_model,
                                 artifacts={"weights": str(checkpoint / WEIGHTS_FILE),
                                            "config": str(checkpoint / CONFIG_FILE)},
                                 code_paths=[str(PACKAGE_DIR)], signature=model_signature(),
                                 pip_requirements=pinned_requirements())


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or no hard links
        shutil.copy2(source, target)


class ModelUpload:
    """One checkpoint's upload as a LoggedModel, run by the background sender. The checkpoint's files are
    hard-linked aside at once, so pruning the checkpoint before the upload runs loses nothing. The sender
    retries a failed call: a retry goes on from the stage that failed, never creating a second model."""

    def __init__(self, client, run_id: str, checkpoint: Path, step: int, name: str):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in a job log
        self.client, self.run_id, self.step, self.name = client, run_id, step, name
        # beside the checkpoints (one filesystem, so hard links work); removed when this object goes
        self.staged = tempfile.TemporaryDirectory(prefix=".mlflow-model-", dir=Path(checkpoint).parent)
        for file in (WEIGHTS_FILE, CONFIG_FILE):
            link_or_copy(Path(checkpoint) / file, Path(self.staged.name) / file)
        self.model = None
        self.stages = [self.create, self.upload, self.link_to_run, self.link_metrics, self.finalize]

    def __call__(self) -> str:
        while self.stages:
            self.stages[0]()
            self.stages.pop(0)
        self.staged.cleanup()
        return self.model.model_id

    def create(self) -> None:
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        self.model = self.client.create_logged_model(experiment_id, name=self.name, source_run_id=self.run_id,
                                                     model_type="dfcvae_dist")

    def upload(self) -> None:
        from mlflow.models import Model

        meta = Model(artifact_path=self.model.artifact_location, run_id=self.run_id, model_id=self.model.model_id,
                     model_uuid=self.model.model_id)
        with tempfile.TemporaryDirectory(prefix="dfcvae-pyfunc-") as local:
            save_pyfunc(Path(self.staged.name), Path(local) / "model", meta)
            for pycache in (Path(local) / "model").rglob("__pycache__"):  # saving imports the code file once
                shutil.rmtree(pycache, ignore_errors=True)
            self.client.log_model_artifacts(self.model.model_id, str(Path(local) / "model"))

    def link_to_run(self) -> None:
        from mlflow.entities import LoggedModelOutput

        self.client.log_outputs(self.run_id, [LoggedModelOutput(self.model.model_id, self.step)])

    def link_metrics(self) -> None:
        """The run's metrics at the model's step, linked to the model (as MLflow's own `log_model` does: the
        same points again with the model id, which the run's history keeps once)."""
        from mlflow.entities import Metric

        client, points = self.client, []
        for key in client.get_run(self.run_id).data.metrics:
            if key.startswith("system/"):  # their step counts samples, not training steps
                continue
            points += [Metric(m.key, m.value, m.timestamp, m.step, model_id=self.model.model_id, run_id=self.run_id)
                       for m in client.get_metric_history(self.run_id, key) if m.step == self.step]
        for start in range(0, len(points), 1000):  # MLflow's limit per batch
            client.log_batch(self.run_id, metrics=points[start:start + 1000])

    def finalize(self) -> None:
        from mlflow.entities import LoggedModelStatus

        self.client.finalize_logged_model(self.model.model_id, LoggedModelStatus.READY)


def logged_model_id(client, run_id: str, name: str = FINAL_MODEL) -> str | None:
    """The id of the run's newest logged model called `name` (the final one by default), for linking
    evaluation metrics to it (`client.log_metric(..., model_id=...)`)."""
    experiment_id = client.get_run(run_id).info.experiment_id
    models = client.search_logged_models([experiment_id], max_results=1,
                                         filter_string=f"name = '{name}' AND source_run_id = '{run_id}'")
    return models[0].model_id if models else None
