"""slurm/*.sbatch on a real two-node Slurm cluster (two slurmd on this host), in CPU mode."""

import json

import numpy as np
import pytest
import yaml

from tests.helpers import ROOT, log_tail, preempt_after_first_checkpoint, run_tool, wait_ended
from tests.slurm_cluster import unavailable_reason

pytestmark = [pytest.mark.slow, pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))]


@pytest.fixture(autouse=True)
def no_job_left_behind(cluster):
    """A failed test's job would hold both nodes (one CPU each) and leave the next test's job pending."""
    yield
    cluster.cancel_all_jobs()


def submit(cluster, tmp_path, script, *args, nodes=2, **env):
    env = {"GPUS_PER_NODE": "0", "PROJECT_DIR": str(ROOT), "CONFIG": "configs/quickstart.yaml",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", **env}
    out = tmp_path / f"{script}.out"
    proc = cluster.run("sbatch", "--parsable", "-N", str(nodes), "-o", str(out), str(ROOT / "slurm" / script),
                       *map(str, args), env=env)
    return proc.stdout.strip(), out


def wait_done(cluster, job, out, timeout=300):
    state = wait_ended(cluster, job, out, timeout)
    assert state == "COMPLETED", f"job {job} ended {state}:\n{log_tail(out)}"


def train_args(shard_dir, run_dir, *extra):
    return [f"data.shards={shard_dir}", f"train.run_dir={run_dir}", "train.batch_size=16", "train.val_every_steps=0",
            "data.num_workers=1", "log.every_steps=1", "log.image_every_steps=0", *extra]


def run_of(tmp_path, run_dir):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    return client, client.get_run(json.loads((run_dir / "COMPLETED.json").read_text())["mlflow_run_id"])


def test_train_sbatch_two_nodes_form_one_process_group_and_get_overrides_whole(cluster, tmp_path, shard_dir):
    run_dir = tmp_path / "run"
    job, out = submit(cluster, tmp_path, "train.sbatch",
                      *train_args(shard_dir, run_dir, "train.max_steps=6", "loss.layers=[relu1_2, relu2_1]"))
    wait_done(cluster, job, out)
    log = out.read_text()
    assert "2 node(s) x 1 process(es), head n1 (127.0.0.1:" in log and "world size 2" in log
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["loss"]["layers"] == ["relu1_2", "relu2_1"]
    ranks = [json.loads((run_dir / "ranks" / f"rank-{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    assert (run_dir / "checkpoints" / "step-00000006" / "weights.safetensors").exists()
    _, run = run_of(tmp_path, run_dir)
    assert run.data.tags["slurm.job_id"] == job and run.data.tags["slurm.nodelist"] == "n[1-2]"
    assert run.data.tags["world_size"] == "2"


def test_preemption_checkpoints_requeues_and_resumes_into_the_same_run(cluster, tmp_path, shard_dir):
    run_dir = tmp_path / "run"
    job, out = submit(cluster, tmp_path, "train.sbatch",
                      *train_args(shard_dir, run_dir, "train.max_steps=24", "checkpoint.every_steps=5"))
    sent = preempt_after_first_checkpoint(cluster, job, run_dir, out)
    wait_done(cluster, job, out, timeout=400)
    log = out.read_text()
    assert "requeueing (restart 1" in log and "restart 1:" in log, sent.stderr
    assert log.count("preemption signal") == 1  # the requeue's own SIGTERM is no second preemption
    summary = json.loads((run_dir / "COMPLETED.json").read_text())
    assert summary["step"] == 24 and not (run_dir / "RESUME_ME.json").exists()
    client, run = run_of(tmp_path, run_dir)
    assert run.data.tags["slurm.restart_count"] == "1"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/total")]
    assert sorted(steps) == list(range(1, 25))  # every step once, in one MLflow run


def test_preemption_past_max_requeues_fails_the_job_with_its_message_and_no_requeue(cluster, tmp_path, shard_dir):
    run_dir = tmp_path / "run"
    job, out = submit(cluster, tmp_path, "train.sbatch",
                      *train_args(shard_dir, run_dir, "train.max_steps=400", "checkpoint.every_steps=2"),
                      MAX_REQUEUES="0")
    sent = preempt_after_first_checkpoint(cluster, job, run_dir, out)
    assert wait_ended(cluster, job, out, timeout=300) == "FAILED", sent.stderr
    log = out.read_text()
    assert f"stopped early, but MAX_REQUEUES=0 is reached: resubmit to continue from {run_dir}" in log
    assert "requeueing" not in log and "restart 1:" not in log
    job_info = cluster.run("scontrol", "show", "job", job).stdout.split()
    assert "ExitCode=1:0" in job_info and "Restarts=0" in job_info
    assert (run_dir / "RESUME_ME.json").exists() and not (run_dir / "COMPLETED.json").exists()


def test_train_sbatch_with_a_deepspeed_accelerate_config_trains_two_nodes_to_the_last_step(cluster, tmp_path,
                                                                                            shard_dir):
    run_dir = tmp_path / "run"
    job, out = submit(cluster, tmp_path, "train.sbatch", *train_args(shard_dir, run_dir, "train.max_steps=4"),
                      ACCELERATE_CONFIG="configs/accelerate/deepspeed-zero2.yaml")
    wait_done(cluster, job, out, timeout=400)  # the first DeepSpeed run compiles a CPU extension (~50 s)
    assert "accelerate config configs/accelerate/deepspeed-zero2.yaml" in out.read_text()
    assert json.loads((run_dir / "COMPLETED.json").read_text())["step"] == 4
    _, run = run_of(tmp_path, run_dir)
    assert run.data.tags["distributed_type"] == "DistributedType.DEEPSPEED" and run.data.tags["world_size"] == "2"


def test_a_missing_accelerate_config_fails_the_job_with_one_line_naming_it(cluster, tmp_path, shard_dir):
    job, out = submit(cluster, tmp_path, "train.sbatch", *train_args(shard_dir, tmp_path / "run"),
                      ACCELERATE_CONFIG="configs/accelerate/zero9.yaml")
    assert wait_ended(cluster, job, out, timeout=60) == "FAILED"
    assert (f"error: ACCELERATE_CONFIG=configs/accelerate/zero9.yaml: no such file (relative to {ROOT})"
            in out.read_text())
    assert "ExitCode=2:0" in cluster.run("scontrol", "show", "job", job).stdout.split()


def test_extract_sbatch_two_nodes_matches_one_process(cluster, tmp_path, shard_dir, trained_run):
    two = tmp_path / "two nodes"  # a space in an argument reaches the tool as one argument
    job, out = submit(cluster, tmp_path, "extract.sbatch", "--checkpoint", trained_run, "--shards", shard_dir,
                      "--out", two, "--batch-size", "32")
    wait_done(cluster, job, out)
    run_tool("extract_latents.py", "--checkpoint", trained_run, "--shards", shard_dir, "--out", tmp_path / "one",
             "--batch-size", "32")
    a, b = (np.load(d / "latents.npz") for d in (tmp_path / "one", two))
    assert (a["keys"] == b["keys"]).all() and np.abs(a["mu"] - b["mu"]).max() < 1e-5
    assert "2 node(s) x 1 process(es)" in out.read_text() and "2 rank(s)" in out.read_text()
