"""The sweep's MLflow parent run: created once, whoever asks first, and reused by every task and every re-run.

Concurrent array tasks serialise on an fcntl lock of SWEEP_DIR/parent.json.lock; the first creates the run and
writes SWEEP_DIR/parent.json ({run_id, experiment_id, tracking_uri}) atomically, the others read it. The
parent is RUNNING while some task is not finished and FINISHED once all are: the MLflow UI then shows a sweep
in progress as running and a done one as done (a failed task leaves it RUNNING: the sweep is not done).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from typing import Iterator

from dfcvae_dist.errors import UserError, one_line
from dfcvae_dist.rundir import atomic_write
from dfcvae_dist.sweeps.plan import Sweep
from dfcvae_dist.tracking import get_or_create_experiment, mlflow_client

PARENT_FILE = "parent.json"


@contextlib.contextmanager
def parent_lock(sweep: Sweep) -> Iterator[None]:
    sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep.sweep_dir / f"{PARENT_FILE}.lock"
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, also when this process dies
        except OSError as err:
            raise UserError(f"{path}: cannot lock ({err}); this filesystem has no flock (e.g. Lustre without "
                            "-o flock): put sweep_dir on one that has") from None
        yield


def tracking_uri_of(sweep: Sweep) -> str | None:
    from dfcvae_dist.training.tracking import tracking_uri

    return tracking_uri(sweep.tasks[0].config)


def ensure_parent(sweep: Sweep) -> dict | None:
    """The parent run's record, created if this sweep has none in this tracking store; None when tracking is off."""
    if not sweep.tasks[0].config.log.uses("mlflow"):
        return None
    client = mlflow_client(tracking_uri_of(sweep))
    path = sweep.sweep_dir / PARENT_FILE
    with parent_lock(sweep):
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("tracking_uri") == client.tracking_uri:
                return record
        try:
            record = _create_parent(client, sweep)
        except Exception as err:  # noqa: BLE001 - any store error is the user's to fix
            raise UserError(f"MLflow at {client.tracking_uri}: cannot create the parent run of sweep {sweep.name} "
                            f"({one_line(err, 300)})") from None
        atomic_write(path, json.dumps(record, indent=1))
        print(f"sweep {sweep.name}: MLflow parent run {record['run_id']} ({client.tracking_uri})")
        return record


def _create_parent(client, sweep: Sweep) -> dict:
    experiment_id = get_or_create_experiment(client, sweep.tasks[0].config.log.experiment)
    run = client.create_run(experiment_id, run_name=sweep.name,
                            tags={"sweep": sweep.name, "sweep.file": str(sweep.path.resolve()),
                                  "sweep.tasks": str(len(sweep.tasks))})
    return {"run_id": run.info.run_id, "experiment_id": experiment_id, "tracking_uri": client.tracking_uri}


def set_parent_status(record: dict | None, finished: bool) -> None:
    """FINISHED (with an end time) once every task has finished; RUNNING again when a task starts."""
    if record is None:
        return
    client = mlflow_client(record["tracking_uri"])
    status = "FINISHED" if finished else "RUNNING"
    if client.get_run(record["run_id"]).info.status == status:
        return
    if finished:
        client.set_terminated(record["run_id"], status)  # with an end time: the UI shows the sweep's duration
    else:
        client.update_run(record["run_id"], status=status)


def child_overrides(sweep: Sweep, index: int, record: dict | None) -> list[str]:
    """What makes a task's run a child of the parent, tagged with the sweep, its index and its name."""
    task = sweep.tasks[index]
    tags = f"log.run_tags=[sweep={sweep.name}, sweep.task_index={index}, sweep.task_name={task.name}]"
    return [tags] + ([f"log.parent_run_id={record['run_id']}", f"log.tracking_uri={record['tracking_uri']}"]
                     if record else [])
