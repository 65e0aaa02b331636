"""The trainer with real processes: one process, 2-process DDP (gloo), exact resume after SIGKILL,
SIGTERM stop-and-resume, non-finite losses, a changed world size, and every model family."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def base_args(shard_dir, run_dir, *overrides):
    return ["--config", str(ROOT / "configs" / "quickstart.yaml"), f"data.shards={shard_dir}", f"train.run_dir={run_dir}",
            "train.batch_size=16", "train.val_every_steps=0", "log.every_steps=1", "log.image_every_steps=0",
            "data.num_workers=1", *overrides]


def env_for(tmp_path):
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "MLFLOW_DISABLE_TELEMETRY": "true"}


def launch_cmd(nproc):
    if nproc == 1:
        return [sys.executable, "-m", "dfcvae_dist.train"]
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(nproc),
            "--num_machines", "1", "--mixed_precision", "no", "-m", "dfcvae_dist.train"]


def train(tmp_path, shard_dir, run_dir, *overrides, nproc=1, check=True):
    proc = subprocess.run([*launch_cmd(nproc), *base_args(shard_dir, run_dir, *overrides)], cwd=tmp_path,
                          env=env_for(tmp_path), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def mlflow_client(tmp_path):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")


def test_one_process_run_learns_checkpoints_and_logs_to_mlflow(tmp_path, shard_dir):
    run_dir = tmp_path / "run"
    train(tmp_path, shard_dir, run_dir, "train.max_steps=40", "checkpoint.every_steps=20", "log.image_every_steps=20",
          "train.val_every_steps=20")
    summary = json.loads((run_dir / "COMPLETED.json").read_text())
    assert summary["step"] == 40 and summary["vgg_weights"] == "random(seed=0)"
    ckpt = run_dir / "checkpoints" / "step-00000040"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == ckpt.name
    assert {"weights.safetensors", "trainer_state.json", "config.yaml"} <= {p.name for p in ckpt.iterdir()}
    from dfcvae_dist.models import VAE

    assert load_file(ckpt / "weights.safetensors").keys() == VAE(32).state_dict().keys()  # the VGG is never saved
    assert (run_dir / "config.yaml").exists()
    client = mlflow_client(tmp_path)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["loss.layers"] == "['relu1_2', 'relu2_1', 'relu3_1']"
    assert run.data.tags["vgg_weights_random"] == "True" and run.data.tags["world_size"] == "1"
    history = [m.value for m in client.get_metric_history(run.info.run_id, "train/total")]
    assert len(history) == 40 and sum(history[-5:]) / 5 < 0.8 * sum(history[:5]) / 5  # the loss falls
    for name in ("train/kl", "train/rec_relu1_2", "train/lr", "train/img_per_s", "train/grad_norm", "val/total"):
        assert client.get_metric_history(run.info.run_id, name), name
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "images")}
    assert "images/reconstructions_step00000020.png" in artifacts and "images/samples_step00000040.png" in artifacts
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_two_process_ddp_ranks_agree_and_read_disjoint_shards(tmp_path, shard_dir):
    run_dir = tmp_path / "run"
    proc = train(tmp_path, shard_dir, run_dir, "train.max_steps=8", nproc=2)
    assert "world size 2, global batch 32 = 16 per rank x 2 ranks x 1 accumulation" in proc.stderr
    ranks = [json.loads((run_dir / "ranks" / f"rank-{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    assert ranks[0]["first_epoch_shards"] and not set(ranks[0]["first_epoch_shards"]) & set(ranks[1]["first_epoch_shards"])
    run = mlflow_client(tmp_path).get_run(json.loads((run_dir / "COMPLETED.json").read_text())["mlflow_run_id"])
    assert run.data.tags["world_size"] == "2" and run.data.tags["distributed_type"] == "DistributedType.MULTI_CPU"


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, shard_dir):
    steps = ["train.max_steps=40", "checkpoint.every_steps=10"]
    train(tmp_path, shard_dir, tmp_path / "straight", *steps, nproc=2)
    run_dir = tmp_path / "killed"
    cmd = [*launch_cmd(2), *base_args(shard_dir, run_dir, *steps)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env_for(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "step-00000010").exists() and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and, through PR_SET_PDEATHSIG, every rank
    proc.wait()
    assert not (run_dir / "checkpoints" / "step-00000040").exists()
    train(tmp_path, shard_dir, run_dir, *steps, nproc=2)  # train.resume=auto by default
    a = load_file(tmp_path / "straight" / "checkpoints" / "step-00000040" / "weights.safetensors")
    b = load_file(run_dir / "checkpoints" / "step-00000040" / "weights.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bit for bit
    client = mlflow_client(tmp_path)
    summary = json.loads((run_dir / "COMPLETED.json").read_text())
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id],
                              filter_string="attributes.run_name = 'killed'")
    assert len(runs) == 1 and runs[0].info.run_id == summary["mlflow_run_id"]
    logged = [m.step for m in client.get_metric_history(summary["mlflow_run_id"], "train/total")]
    assert sorted(logged) == list(range(1, 41))  # each step exactly once
    state = json.loads((run_dir / "checkpoints" / "step-00000040" / "trainer_state.json").read_text())
    assert state["mlflow_run_id"] == summary["mlflow_run_id"] and state["world_size"] == 2


def test_sigterm_checkpoints_at_an_agreed_step_and_leaves_resume_marker(tmp_path, shard_dir):
    run_dir = tmp_path / "run"
    cmd = [*launch_cmd(2), *base_args(shard_dir, run_dir, "train.max_steps=400", "checkpoint.every_steps=0")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env_for(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while not (run_dir / "config.yaml").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(8)  # start-up done, well inside the loop
    proc.send_signal(signal.SIGTERM)  # the launcher forwards it to every rank
    proc.communicate(timeout=120)
    # The launcher itself exits 1 after a SIGTERM whatever the ranks did: the marker is the contract.
    marker = json.loads((run_dir / "RESUME_ME.json").read_text())
    assert marker["stopped_early"] and 0 < marker["step"] < 400
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert ckpts == [f"step-{marker['step']:08d}"]  # exactly one checkpoint, at the agreed step
    train(tmp_path, shard_dir, run_dir, f"train.max_steps={marker['step'] + 5}", "checkpoint.every_steps=0", nproc=2)
    assert not (run_dir / "RESUME_ME.json").exists()
    assert json.loads((run_dir / "COMPLETED.json").read_text())["step"] == marker["step"] + 5


def test_nonfinite_loss_stops_naming_step_and_ranks_before_any_checkpoint(tmp_path, shard_dir):
    run_dir = tmp_path / "run"
    proc = train(tmp_path, shard_dir, run_dir, "train.max_steps=5", "loss.feature_scale=1e30", nproc=2, check=False)
    assert proc.returncode != 0
    assert "non-finite loss at step 1 on rank(s) 0, 1" in proc.stderr
    assert not (run_dir / "checkpoints").exists() or not list((run_dir / "checkpoints").glob("step-*"))


def test_nonfinite_loss_skip_policy_counts_skipped_steps(tmp_path, shard_dir):
    run_dir = tmp_path / "run"
    train(tmp_path, shard_dir, run_dir, "train.max_steps=3", "loss.feature_scale=1e30", "train.on_nonfinite=skip")
    assert json.loads((run_dir / "COMPLETED.json").read_text())["skipped_steps"] == 3


def test_resume_with_another_world_size_is_refused(tmp_path, shard_dir):
    run_dir = tmp_path / "run"
    train(tmp_path, shard_dir, run_dir, "train.max_steps=2")
    proc = train(tmp_path, shard_dir, run_dir, "train.max_steps=4", nproc=2, check=False)
    assert proc.returncode != 0
    assert "saved with world size 1, now 2" in proc.stderr


@pytest.mark.parametrize("model", ["pvae", "dcgan"])
def test_baselines_train_in_the_same_loop(tmp_path, shard_dir, model):
    run_dir = tmp_path / model
    extra = ["optim.lr=2e-4", "optim.beta1=0.5", "model.base_channels=16"] if model == "dcgan" else ["loss.beta=1.0"]
    train(tmp_path, shard_dir, run_dir, f"model.name={model}", "train.max_steps=6", "log.image_every_steps=3", *extra)
    summary = json.loads((run_dir / "COMPLETED.json").read_text())
    assert summary["step"] == 6 and summary["vgg_weights"] == "none"
    history = mlflow_client(tmp_path).get_metric_history(summary["mlflow_run_id"], "train/total")
    assert len(history) == 6


def test_torchrun_with_a_webdataset_url_pattern(tmp_path, shard_dir):
    """The same module under plain torchrun, streaming shards named by a brace pattern instead of a manifest."""
    n = len(list(shard_dir.glob("train-*.tar")))
    pattern = f"{shard_dir}/train-{{000000..{n - 1:06d}}}.tar"
    run_dir = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m",
           "dfcvae_dist.train", *base_args(shard_dir, run_dir, "train.max_steps=3", "data.num_samples=321")]
    cmd[cmd.index(f"data.shards={shard_dir}")] = f"data.shards={pattern}"
    proc = subprocess.run(cmd, cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "world size 2" in proc.stderr and "10 steps per epoch" in proc.stderr  # 321 // 32
    assert json.loads((run_dir / "COMPLETED.json").read_text())["step"] == 3
