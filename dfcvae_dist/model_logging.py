"""A checkpoint as an MLflow 3 LoggedModel of its run: the "Logged models" page lists it as
`<family>-<run name>` with the run, its step, a description, the run's params, and the run's metrics at that
step with the dataset each was measured on; evaluations link their `eval/*` metrics to it (`model_link`).

MLflow's pytorch flavour would save a pickle or a `torch.export` of `forward` alone; this logs a "models
from code" pyfunc (`dfcvae_dist/pyfunc_model.py`) whose artifacts are the checkpoint's `weights.safetensors`
and `config.yaml`, with our package as its code. It is done with `MlflowClient` calls on an explicit run
id, never through MLflow's active run (see `Tracker`), inside one call of the background sender.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from dfcvae_dist.rundir import CONFIG_FILE, STATE_FILE, WEIGHTS_FILE

FINAL_MODEL = "model"  # `runs:/<run_id>/model` names the run's final model, whatever its name (our inference API)
FINAL_TAG = "dfcvae_dist.final"  # "true" on the model of a run's last step
DESCRIPTION_TAG = "mlflow.note.content"  # the description on MLflow's pages (runs' and logged models')
CODE_FILE = Path(__file__).with_name("pyfunc_model.py")
PACKAGE_DIR = Path(__file__).parent
REQUIREMENTS = ("mlflow", "torch", "safetensors", "pyyaml", "numpy")


@dataclass
class ModelCard:
    """What a logged model's page shows besides its files: `name` (`<family>-<run name>`; a checkpoint that is
    not the run's last adds its folder's name), a markdown `description`, the run's `params`, and by metric
    prefix ("train/", "val/") the MLflow dataset (name, digest) those metrics were measured on."""

    name: str
    description: str = ""
    params: dict[str, str] = field(default_factory=dict)
    datasets: dict[str, tuple[str, str]] = field(default_factory=dict)

    def dataset_of(self, metric: str) -> dict[str, str]:
        prefix = metric.split("/", 1)[0] + "/"
        name, digest = self.datasets.get(prefix, (None, None))
        return {"dataset_name": name, "dataset_digest": digest} if name else {}


def input_shapes(latent_dim: int, image_size: int) -> str:
    """What `predict` takes, in words (the model's description and its MLmodel metadata)."""
    return (f"float32 arrays: `decode` latents (N, {latent_dim}) or (N, {latent_dim}, 1, 1); `reconstruct` "
            f"(default) and `encode` images (N, 3, {image_size}, {image_size}) in [0, 1]")


def model_signature():
    """The `mode` parameter only. MLflow 3.17 checks a tensor input against one shape of fixed rank (and a
    TensorSpec cannot be optional), so an input schema could not accept latents both as (N, latent_dim) and
    as (N, latent_dim, 1, 1), nor images beside them: the model checks its input itself, naming the shapes it
    takes (`pyfunc_model.py`), and the shapes are in the MLmodel's metadata and its input example."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec

    return ModelSignature(inputs=None, params=ParamSchema([ParamSpec("mode", "string", "reconstruct")]))


def input_example(latent_dim: int):
    """Two latents as (N, latent_dim), decoded: an example that every family runs (a DCGAN only decodes)."""
    import numpy as np

    return np.random.default_rng(0).standard_normal((2, latent_dim)).astype(np.float32), {"mode": "decode"}


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

    from dfcvae_dist.config import load_config

    model = load_config(checkpoint / CONFIG_FILE).model
    mlflow.pyfunc.save_model(str(local_dir), python_model=str(CODE_FILE), mlflow_model=mlflow_model,
                             artifacts={"weights": str(checkpoint / WEIGHTS_FILE),
                                        "config": str(checkpoint / CONFIG_FILE)},
                             code_paths=[str(PACKAGE_DIR)], signature=model_signature(),
                             input_example=input_example(model.latent_dim),
                             metadata={"inputs": input_shapes(model.latent_dim, model.image_size)},
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

    def __init__(self, client, run_id: str, checkpoint: Path, step: int, card: ModelCard, final: bool):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in a job log
        self.client, self.run_id, self.step, self.card, self.final = client, run_id, step, card, final
        self.name = card.name if final else f"{card.name}-{Path(checkpoint).name}"
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
        which = "the run's last step" if self.final else "a checkpoint"
        tags = {DESCRIPTION_TAG: f"{self.card.description}\n\nLogged at step {self.step} ({which}).",
                FINAL_TAG: str(self.final).lower()}
        self.model = self.client.create_logged_model(experiment_id, name=self.name, source_run_id=self.run_id,
                                                     tags=tags, params=self.card.params, model_type="dfcvae_dist")

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
        """The run's metrics at the model's step, linked to the model with the dataset each was measured on (as
        MLflow's own `log_model` does: the same points again with the model id, which the run's history keeps
        once). The model page's "Datasets used" lists the datasets of its metrics."""
        from mlflow.entities import Metric

        client, points = self.client, []
        for key in client.get_run(self.run_id).data.metrics:
            if key.startswith("system/"):  # their step counts samples, not training steps
                continue
            points += [Metric(m.key, m.value, m.timestamp, m.step, model_id=self.model.model_id, run_id=self.run_id,
                              **self.card.dataset_of(m.key))
                       for m in client.get_metric_history(self.run_id, key) if m.step == self.step]
        for start in range(0, len(points), 1000):  # MLflow's limit per batch
            client.log_batch(self.run_id, metrics=points[start:start + 1000])

    def finalize(self) -> None:
        from mlflow.entities import LoggedModelStatus

        self.client.finalize_logged_model(self.model.model_id, LoggedModelStatus.READY)


def logged_model_id(client, run_id: str, name: str = FINAL_MODEL) -> str | None:
    """The id of the run's newest logged model called `name`; FINAL_MODEL: its newest final model (tagged
    FINAL_TAG; before models were named `<family>-<run name>`, the final one was named `model`)."""
    experiment_id = client.get_run(run_id).info.experiment_id
    names = ([f"tags.`{FINAL_TAG}` = 'true'"] if name == FINAL_MODEL else []) + [f"name = '{name}'"]
    for condition in names:
        models = client.search_logged_models([experiment_id], max_results=1,
                                             filter_string=f"{condition} AND source_run_id = '{run_id}'",
                                             order_by=[{"field_name": "creation_timestamp", "ascending": False}])
        if models:
            return models[0].model_id
    return None


def model_link(client, run_id: str, checkpoint: str | Path | None) -> dict[str, str]:
    """`model_id=` for an evaluation's metrics of `checkpoint` (a checkpoint folder) logged into `run_id`: the
    run's logged model of that checkpoint's step, so the model's page lists them; {} where the run logged no
    model of that step (log.model=final and an earlier checkpoint, log.model=none, or not a checkpoint)."""
    state = Path(checkpoint or "") / STATE_FILE
    if not checkpoint or not state.is_file():
        return {}
    from dfcvae_dist.training.state import TrainerState

    step = TrainerState.read(state.parent).step
    outputs = client.get_run(run_id).outputs
    model_ids = [o.model_id for o in (outputs.model_outputs if outputs else []) if o.step == step]
    return {"model_id": model_ids[-1]} if model_ids else {}
