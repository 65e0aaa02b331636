"""DeepSpeed ZeRO-2 through accelerate with two CPU processes: trains, checkpoints, resumes exactly."""

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, base_args, env_for, same_weights

pytestmark = pytest.mark.slow


def deepspeed_train(processes, tmp_path, shard_dir, run_dir, *overrides, check=True):
    """One two-process DeepSpeed run (the first one in a new environment also compiles DeepSpeed's CPU extension,
    15-50 s)."""
    cmd = [Path(sys.executable).parent / "accelerate", "launch", "--config_file",
           ROOT / "configs" / "accelerate" / "deepspeed-zero2.yaml", "--num_processes", "2",
           "-m", "dfcvae_dist.train", *base_args(shard_dir, run_dir, *overrides)]
    proc = processes.run(cmd, 280, cwd=tmp_path, env=env_for(tmp_path))
    if check and proc.returncode != 0:
        raise AssertionError(f"deepspeed run failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def test_zero2_trains_checkpoints_and_resumes_exactly(tmp_path, shard_dir, processes):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    deepspeed_train(processes, tmp_path, shard_dir, straight, "train.max_steps=8", "checkpoint.every_steps=4")
    halfway = straight / "checkpoints" / "step-00000004"
    proc = deepspeed_train(processes, tmp_path, shard_dir, resumed, "train.max_steps=8", "checkpoint.every_steps=4",
                           f"train.resume={halfway}")
    assert f"resumed from {halfway} at step 4" in proc.stderr
    run = mlflow_tags(tmp_path, straight)
    assert run["distributed_type"] == "DistributedType.DEEPSPEED" and run["world_size"] == "2"
    assert same_weights(straight, resumed, 8)


def test_dcgan_under_deepspeed_stops_with_a_clear_message(tmp_path, shard_dir, processes):
    proc = deepspeed_train(processes, tmp_path, shard_dir, tmp_path / "gan", "model.name=dcgan", "train.max_steps=2",
                           check=False)
    assert proc.returncode != 0
    assert "model.name=dcgan is not supported under DeepSpeed" in proc.stderr


def test_gradient_accumulation_that_contradicts_the_deepspeed_config_is_refused(tmp_path, shard_dir, processes):
    """DeepSpeed accumulates by its own config (gradient_accumulation_steps: 1 in ours) and would only warn."""
    proc = deepspeed_train(processes, tmp_path, shard_dir, tmp_path / "run", "train.grad_accum=2", "train.max_steps=2",
                           check=False)
    assert proc.returncode != 0
    assert "train.grad_accum=2, but the DeepSpeed config accumulates 1 micro-batches: make them agree" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def mlflow_tags(tmp_path, run_dir):
    import mlflow

    run_id = json.loads((run_dir / "COMPLETED.json").read_text())["mlflow_run_id"]
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id).data.tags
