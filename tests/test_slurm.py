"""slurm/*.sbatch on a real two-node Slurm cluster (two slurmd on this host), in CPU mode."""

import json
import time

import numpy as np
import pytest

from tests.conftest import ROOT, run_tool
from tests.slurm_cluster import SlurmCluster, unavailable_reason

pytestmark = [pytest.mark.slow, pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))]
RUNNING = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


def submit(cluster, tmp_path, script, *args, nodes=2):
    cluster.env.update(GPUS_PER_NODE="0", PROJECT_DIR=str(ROOT), CONFIG="configs/quickstart.yaml",
                       MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db")
    out = tmp_path / f"{script}.out"
    proc = cluster.run("sbatch", "--parsable", "-N", str(nodes), "-o", str(out), str(ROOT / "slurm" / script), *map(str, args))
    return proc.stdout.strip(), out


def wait_done(cluster, job, out, timeout=400):
    deadline = time.time() + timeout
    while cluster.job_state(job) in RUNNING and time.time() < deadline:
        time.sleep(1)
    state = cluster.job_state(job)
    assert state == "COMPLETED", f"job {job} ended {state}:\n{out.read_text()[-4000:] if out.exists() else ''}"


def train_args(shard_dir, run_dir, *extra):
    return [f"data.shards={shard_dir}", f"train.run_dir={run_dir}", "train.batch_size=16", "train.val_every_steps=0",
            "data.num_workers=1", "log.every_steps=1", "log.image_every_steps=0", *extra]


def run_of(tmp_path, run_dir):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    return client, client.get_run(json.loads((run_dir / "COMPLETED.json").read_text())["mlflow_run_id"])


def test_train_sbatch_two_nodes_form_one_process_group(cluster, tmp_path, shard_dir):
    run_dir = tmp_path / "run"
    job, out = submit(cluster, tmp_path, "train.sbatch", *train_args(shard_dir, run_dir, "train.max_steps=6"))
    wait_done(cluster, job, out)
    log = out.read_text()
    assert "2 node(s) x 1 process(es), head n1 (127.0.0.1:" in log and "world size 2" in log
    ranks = [json.loads((run_dir / "ranks" / f"rank-{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    assert (run_dir / "checkpoints" / "step-00000006" / "weights.safetensors").exists()
    _, run = run_of(tmp_path, run_dir)
    assert run.data.tags["slurm.job_id"] == job and run.data.tags["slurm.nodelist"] == "n[1-2]"
    assert run.data.tags["world_size"] == "2"


def test_preemption_checkpoints_requeues_and_resumes_into_the_same_run(cluster, tmp_path, shard_dir):
    run_dir = tmp_path / "run"
    job, out = submit(cluster, tmp_path, "train.sbatch",
                      *train_args(shard_dir, run_dir, "train.max_steps=60", "checkpoint.every_steps=10"))
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "step-00000010").exists() and time.time() < deadline:
        time.sleep(0.2)
    # What --signal=B:USR1@N sends before the limit. scancel's own exit status is not the contract (it was
    # seen to return 1 once although the signal had been delivered): the job's log and state are.
    sent = cluster.run("scancel", "--batch", "--signal=USR1", job, check=False)
    wait_done(cluster, job, out, timeout=600)
    log = out.read_text()
    assert "preemption signal" in log and "requeueing (restart 1" in log and "restart 1:" in log, sent.stderr
    summary = json.loads((run_dir / "COMPLETED.json").read_text())
    assert summary["step"] == 60 and not (run_dir / "RESUME_ME.json").exists()
    client, run = run_of(tmp_path, run_dir)
    assert run.data.tags["slurm.restart_count"] == "1"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/total")]
    assert sorted(steps) == list(range(1, 61))  # every step once, in one MLflow run


def test_extract_sbatch_two_nodes_matches_one_process(cluster, tmp_path, shard_dir, trained_run):
    job, out = submit(cluster, tmp_path, "extract.sbatch", "--checkpoint", trained_run, "--shards", shard_dir,
                      "--out", tmp_path / "two", "--batch-size", "32")
    wait_done(cluster, job, out)
    run_tool("extract_latents.py", "--checkpoint", trained_run, "--shards", shard_dir, "--out", tmp_path / "one",
             "--batch-size", "32")
    a, b = (np.load(tmp_path / d / "latents.npz") for d in ("one", "two"))
    assert (a["keys"] == b["keys"]).all() and np.abs(a["mu"] - b["mu"]).max() < 1e-5
    assert "2 node(s) x 1 process(es)" in out.read_text() and "2 rank(s)" in out.read_text()
