"""MLflow access for training, evaluation, sweeps and inference: one way to build a client (whose requests
time out in seconds), to get or create an experiment, to name a run and to check a server.

- MLflow reads its HTTP timeouts only from the environment, so the short ones are this process's defaults
  (set where the first client is built; a value already in the environment wins).
- With a sqlite store a new experiment keeps its artifacts beside the store (`mlartifacts/`), not in
  `./mlruns` of whatever directory the job was launched from.
- Building a client of a sqlite store creates or migrates its schema: processes that start together (sweep tasks,
  array tasks) take turns on a lock beside the database (`.NAME.lock`), or one dies in the migration. A path that
  cannot be a store (below a file, a directory, not a database, a new one in a read-only folder) is one line at
  once, not MLflow's two minutes of retries.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from dfcvae_dist.errors import UserError, one_line
from dfcvae_dist.rundir import exclusive_lock

if TYPE_CHECKING:
    from mlflow import MlflowClient

SQLITE_HEADER = b"SQLite format 3\x00"
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
SHORT_TIMEOUTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def use_short_timeouts() -> None:
    """Seconds per request and one retry, not MLflow's minutes of retries, for every MLflow request of this
    process (system metrics' and model uploads' too), unless the environment sets them."""
    for name, value in SHORT_TIMEOUTS.items():
        os.environ.setdefault(name, value)


def mlflow_client(uri: str | None = None, read_only: bool = False) -> MlflowClient:
    """A client of the store at `uri` (None: MLflow's default, MLFLOW_TRACKING_URI else sqlite:///mlflow.db)
    with the short timeouts; a store MLflow cannot open, or a read-only sqlite store unless `read_only`, is a
    UserError naming it."""
    import mlflow

    use_short_timeouts()
    uri = uri or mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return _client(uri)
    path = Path(uri[len("sqlite:///"):].partition("?")[0])
    check_sqlite_store(uri, path, read_only)
    if not os.access(path.parent, os.W_OK):  # an existing store, read only: nothing to create, nowhere to lock
        return _client(uri)
    with exclusive_lock(path.with_name(f".{path.name}.lock")):  # the client creates or migrates the schema
        return _client(uri)


def _client(uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    try:
        return MlflowClient(tracking_uri=uri)
    except Exception as err:  # noqa: BLE001 - MLflow raises its own, SQLAlchemy's and the OS's errors
        raise UserError(f"MLflow tracking store {uri}: cannot open it ({one_line(err, 300)})") from None


def check_sqlite_store(uri: str, path: Path, read_only: bool = False) -> None:
    """Refuse at once a sqlite path that cannot be a store (MLflow would retry for two minutes, then raise)."""
    where = f"MLflow tracking store {uri}"
    below = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if below is not None:
        raise UserError(f"{where}: {below} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{where}: cannot create its folder {path.parent} ({err.strerror})") from None
    if path.is_dir():
        raise UserError(f"{where}: {path} is a folder, not a database file")
    if not path.exists():
        if not os.access(path.parent, os.W_OK):
            raise UserError(f"{where}: cannot create {path.name}, {path.parent} is read-only")
        return
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except OSError as err:
        raise UserError(f"{where}: cannot read {path} ({err.strerror})") from None
    if head and head != SQLITE_HEADER:
        raise UserError(f"{where}: {path} is not an SQLite database")
    unwritable = next((p for p in (path, path.parent) if not os.access(p, os.W_OK)), None)
    if unwritable is not None and not read_only:
        raise UserError(f"{where}: {unwritable} is read-only (sqlite writes the database and a journal beside it)")


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created if the store has none (its artifacts beside a sqlite store)."""
    experiment = client.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(client.tracking_uri))
    except Exception:  # noqa: BLE001 - a process starting at the same moment may have created it first
        experiment = client.get_experiment_by_name(name)
        if experiment:
            return experiment.experiment_id
        raise


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
