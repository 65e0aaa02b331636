"""MLflow access for training, evaluation, sweeps and inference: one way to build a client (whose requests
time out in seconds), to get or create an experiment, to name a run and to check a server.

- MLflow reads its HTTP timeouts only from the environment, so the short ones are this process's defaults
  (set where the first client is built; a value already in the environment wins).
- With a sqlite store a new experiment keeps its artifacts beside the store (`mlartifacts/`), not in
  `./mlruns` of whatever directory the job was launched from.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from dfcvae_dist.errors import UserError

if TYPE_CHECKING:
    from mlflow import MlflowClient

LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
SHORT_TIMEOUTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def use_short_timeouts() -> None:
    """Seconds per request and one retry, not MLflow's minutes of retries, for every MLflow request of this
    process (system metrics' and model uploads' too), unless the environment sets them."""
    for name, value in SHORT_TIMEOUTS.items():
        os.environ.setdefault(name, value)


def mlflow_client(uri: str | None = None) -> MlflowClient:
    """A client of the store at `uri` (None: MLflow's default, MLFLOW_TRACKING_URI else sqlite:///mlflow.db)
    with the short timeouts."""
    from mlflow import MlflowClient

    use_short_timeouts()
    return MlflowClient(tracking_uri=uri)


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created if the store has none (its artifacts beside a sqlite store)."""
    experiment = client.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root(client.tracking_uri))


def artifact_root(uri: str) -> str | None:
    """Beside a sqlite store (`sqlite:///PATH/x.db` -> PATH/mlartifacts); None elsewhere: a server has its
    own artifact root, and a file store keeps artifacts inside itself."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()


def server_reachable(uri: str, timeout: float = 5.0) -> str | None:
    """None if reachable (or not a server), else the reason."""
    if not is_server(uri):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except OSError as err:
        return str(getattr(err, "reason", err))


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def ui_address(uri: str) -> str:
    """Where a store's pages are: the server's own address, else `mlflow ui`'s default on this machine."""
    return uri.rstrip("/") if is_server(uri) else LOCAL_UI


def ui_command(uri: str) -> str | None:
    """The command that serves a local store's pages (sqlite, files); None for a server, which serves its own."""
    if is_server(uri):
        return None
    mlflow = Path(sys.executable).parent / "mlflow"  # this environment's, e.g. .venv/bin/mlflow
    program = (os.path.relpath(mlflow) if mlflow.is_relative_to(Path.cwd()) else str(mlflow)) if mlflow.is_file() \
        else "mlflow"
    return f"{program} ui --backend-store-uri {uri}"


def run_page_url(uri: str, experiment_id: str, run_id: str) -> str:
    return f"{ui_address(uri)}/#/experiments/{experiment_id}/runs/{run_id}"


def experiment_url(uri: str, experiment_id: str) -> str:
    """The experiment's runs in MLflow's model-training view (MLflow 3 opens an experiment in its GenAI view)."""
    return f"{ui_address(uri)}/#/experiments/{experiment_id}?workflowType=machine_learning"


def resolve_run_id(value: str) -> str:
    """An MLflow run id, or a training run directory (its COMPLETED.json / RESUME_ME.json names the run)."""
    directory = Path(value)
    if not directory.is_dir():
        if os.sep in value:
            raise UserError(f"--mlflow-run {value}: neither a run directory nor an MLflow run id")
        return value
    for marker in ("COMPLETED.json", "RESUME_ME.json"):
        path = directory / marker
        if path.is_file():
            run_id = json.loads(path.read_text()).get("mlflow_run_id")
            if not run_id:
                raise UserError(f"{path}: the run was not tracked in MLflow")
            return run_id
    raise UserError(f"{directory}: no COMPLETED.json or RESUME_ME.json, so no MLflow run to log into (a run killed "
                    "before its first marker, or not a training run directory); pass the MLflow run id instead")
