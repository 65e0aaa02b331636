"""Tracking through a real `mlflow server` on loopback, and an unreachable server both ways."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_train import train

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root, port):
    return subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                             str(port), "--backend-store-uri", f"sqlite:///{root}/store.db",
                             "--default-artifact-root", str(root / "artifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root, start_new_session=True,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})


def kill_server(proc):
    """`mlflow server` serves from worker children: end the whole process group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def wait_healthy(uri, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(uri + "/health", timeout=1)
            return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{uri} did not come up")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    port = free_port()
    proc = start_server(tmp_path_factory.mktemp("mlflow-server"), port)
    try:
        wait_healthy(f"http://127.0.0.1:{port}")
        yield f"http://127.0.0.1:{port}"
    finally:
        kill_server(proc)


def test_two_process_run_logs_to_a_real_server(tmp_path, shard_dir, mlflow_server):
    import mlflow

    run_dir = tmp_path / "run"
    train(tmp_path, shard_dir, run_dir, "train.max_steps=6", f"log.tracking_uri={mlflow_server}",
          "log.image_every_steps=3", nproc=2)
    run_id = json.loads((run_dir / "COMPLETED.json").read_text())["mlflow_run_id"]
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.batch_size"] == "16"
    assert [m.step for m in client.get_metric_history(run_id, "train/total")] == list(range(1, 7))


def test_unreachable_server_fails_fast_naming_the_uri(tmp_path, shard_dir):
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.time()
    proc = train(tmp_path, shard_dir, tmp_path / "run", "train.max_steps=2", f"log.tracking_uri={uri}", check=False)
    assert proc.returncode == 2
    assert time.time() - start < 60
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: [rank 0] MLflow tracking server " + uri + " is unreachable")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unreachable_server_with_warn_trains_untracked(tmp_path, shard_dir):
    uri = f"http://127.0.0.1:{free_port()}"
    proc = train(tmp_path, shard_dir, tmp_path / "run", "train.max_steps=2", f"log.tracking_uri={uri}",
                 "log.on_unavailable=warn", nproc=2)
    assert "training continues UNTRACKED" in proc.stderr
    summary = json.loads((tmp_path / "run" / "COMPLETED.json").read_text())
    assert summary["step"] == 2 and summary["mlflow_run_id"] is None


def test_server_killed_mid_run_training_goes_on_and_buffered_metrics_arrive(tmp_path, shard_dir):
    import mlflow

    from tests.test_train import base_args, env_for, launch_cmd

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    wait_healthy(uri)
    run_dir = tmp_path / "run"
    cmd = [*launch_cmd(2), *base_args(shard_dir, run_dir, "train.max_steps=300", f"log.tracking_uri={uri}",
                                      "checkpoint.every_steps=0")]
    trainer = subprocess.Popen(cmd, cwd=tmp_path, env=env_for(tmp_path), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    client = mlflow.MlflowClient(tracking_uri=uri)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until the run is logging
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        if runs and client.get_metric_history(runs[0].info.run_id, "train/total"):
            break
        time.sleep(0.5)
    kill_server(server)
    time.sleep(4)  # an outage of a few seconds, mid-run
    server = start_server(tmp_path, port)
    try:
        wait_healthy(uri)
        _, err = trainer.communicate(timeout=600)
        assert trainer.returncode == 0, err[-3000:]
        assert "MLflow unreachable" in err and "MLflow reachable again" in err  # noticed, not fatal
        run_id = json.loads((run_dir / "COMPLETED.json").read_text())["mlflow_run_id"]
        steps = [m.step for m in mlflow.MlflowClient(tracking_uri=uri).get_metric_history(run_id, "train/total")]
        assert sorted(steps) == list(range(1, 301))  # outage metrics were buffered and sent, none twice
    finally:
        kill_server(server)
