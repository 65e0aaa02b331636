"""The trainer with real processes: one process, 2-process DDP (gloo), exact resume after SIGKILL,
SIGTERM stop-and-resume, non-finite losses, a changed world size, and every model family."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from tests.helpers import (ProcessGroups, base_args, env_for, image_steps, launch_cmd, run_tool, same_weights, train,
                           wait_until)

pytestmark = pytest.mark.slow


def mlflow_client(tmp_path):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")


def test_one_process_run_learns_checkpoints_and_logs_to_mlflow(tmp_path, shard_dir):
    """Also: with a sqlite store, artifacts go beside it (mlartifacts/), never to ./mlruns of the launch directory."""
    os.umask(0o022)
    run_dir = tmp_path / "run"
    proc = train(tmp_path, shard_dir, run_dir, "train.epochs=2", "checkpoint.every_steps=20",  # 20 steps per epoch
                 "log.image_every_steps=20", "train.val_every_steps=20")
    summary = json.loads((run_dir / "COMPLETED.json").read_text())
    assert summary["step"] == 40 and summary["feature_weights"] == "random(seed=0)"
    ckpt = run_dir / "checkpoints" / "step-00000040"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert summary["config_digest"] == state["config_digest"] and 0 < state["wall_time_s"] <= summary["wall_time_s"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == ckpt.name
    assert {"weights.safetensors", "trainer_state.json", "config.yaml"} <= {p.name for p in ckpt.iterdir()}
    from dfcvae_dist.models import VAE

    assert load_file(ckpt / "weights.safetensors").keys() == VAE(32).state_dict().keys()  # the VGG is never saved
    with safe_open(ckpt / "weights.safetensors", "pt") as f:  # the file alone says which model it holds
        assert f.metadata()["format"] == "pt"
        assert json.loads(f.metadata()["model"]) == {"name": "dfcvae", "image_size": 32, "latent_dim": 100,
                                                     "base_channels": 32, "init": "normal"}
    assert (ckpt / "weights.safetensors").stat().st_mode & 0o777 == 0o644  # readable by a colleague (umask 022)
    assert (run_dir / "config.yaml").exists()
    client = mlflow_client(tmp_path)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["loss.layers"] == "['relu1_2', 'relu2_1', 'relu3_1']"
    assert run.data.tags["feature_network_random"] == "True" and run.data.tags["world_size"] == "1"
    history = [m.value for m in client.get_metric_history(run.info.run_id, "train/total")]
    assert len(history) == 40 and sum(history[-5:]) / 5 < 0.8 * sum(history[:5]) / 5  # the loss falls
    for name in ("train/kl", "train/rec_perceptual", "train/rec_perceptual/relu1_2", "train/lr", "train/img_per_s",
                 "train/grad_norm", "val/total"):
        assert client.get_metric_history(run.info.run_id, name), name
    assert image_steps(client, run.info.run_id) == {"reconstructions": [0, 20, 40], "samples": [0, 20, 40]}
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert not (tmp_path / "mlruns").exists()  # the launch directory
    assert run.info.artifact_uri == (tmp_path / "mlartifacts").as_uri() + f"/{run.info.run_id}/artifacts"
    last = proc.stderr.strip().splitlines()[-4:]  # the run's summary: 2 epochs done, not "epoch 3"
    assert last[0].startswith("finished step 40 of 40 (2 epochs), ") and " img/s, wall time 0:" in last[0], last
    assert last[1] == (f"final losses: train/total {history[-1]:.4g} (step 40), val/total "
                       f"{client.get_metric_history(run.info.run_id, 'val/total')[-1].value:.4g} (step 40)")
    assert last[2] == f"checkpoint: {ckpt}"
    assert last[3] == (f"MLflow run page: http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/"
                       f"{run.info.run_id} (serve it: {Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri "
                       f"sqlite:///{tmp_path}/mlflow.db)")


def test_a_run_with_tracking_off_trains_where_mlflow_is_not_installed(tmp_path, shard_dir):
    # as on a GPU node's image without MLflow: an `mlflow` first on the path that fails to import, as it would there
    (tmp_path / "no-mlflow" / "mlflow").mkdir(parents=True)
    (tmp_path / "no-mlflow" / "mlflow" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'mlflow'\")")
    path = os.pathsep.join(filter(None, [str(tmp_path / "no-mlflow"), os.environ.get("PYTHONPATH")]))
    train(tmp_path, shard_dir, tmp_path / "run", "train.max_steps=2", "log.enabled=false", env={"PYTHONPATH": path})
    assert json.loads((tmp_path / "run" / "COMPLETED.json").read_text())["step"] == 2


def test_two_process_ddp_ranks_agree_and_read_disjoint_shards(tmp_path, shard_dir):
    run_dir = tmp_path / "run"
    proc = train(tmp_path, shard_dir, run_dir, "train.max_steps=8", "log.trackers=[mlflow, tensorboard]", nproc=2)
    assert "world size 2, global batch 32 = 16 per rank x 2 ranks x 1 accumulation" in proc.stderr
    console = proc.stdout + proc.stderr  # a quiet console: each warning once per run, the libraries' chatter filtered
    assert console.count("RANDOM weights") == 1
    for chatter in ("Setting accelerator to CPU", "system metrics monitoring", "Skip logging GPU metrics",
                    "Validating input example"):
        assert chatter not in console, chatter
    ranks = [json.loads((run_dir / "ranks" / f"rank-{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    first_epoch_shards = [set(rank["first_epoch_shards"]) for rank in ranks]
    assert first_epoch_shards[0] and not first_epoch_shards[0] & first_epoch_shards[1]
    run = mlflow_client(tmp_path).get_run(json.loads((run_dir / "COMPLETED.json").read_text())["mlflow_run_id"])
    assert run.data.tags["world_size"] == "2" and run.data.tags["distributed_type"] == "DistributedType.MULTI_CPU"
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1  # written by the main process only


def resume_settings(every: int, total: int, workers: int = 1, accum: int = 1, cache: str = "none") -> list[str]:
    return [f"train.max_steps={total}", f"checkpoint.every_steps={every}", f"data.num_workers={workers}",
            f"train.grad_accum={accum}", "log.image_every_steps=2",  # the image panels draw on no training stream
            f"data.cache={cache}"]


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, shard_dir, processes):
    """Mid-epoch, with 2 loader workers per rank and 2 accumulated micro-batches a step: 2 ranks x 16 x 2, so 5
    steps an epoch and the checkpoint at step 3 is mid-epoch."""
    every, total = 3, 8
    steps = resume_settings(every, total, workers=2, accum=2)
    train(tmp_path, shard_dir, tmp_path / "straight", *steps, nproc=2)
    run_dir = tmp_path / "killed"
    cmd = [*launch_cmd(2), *base_args(shard_dir, run_dir, *steps)]
    proc = processes.popen(cmd, cwd=tmp_path, env=env_for(tmp_path), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    wait_until((run_dir / "checkpoints" / f"step-{every:08d}").exists, 300, "the first checkpoint", interval=0.02)
    processes.kill(proc)  # SIGKILL to the launcher and every rank
    assert not (run_dir / "checkpoints" / f"step-{total:08d}").exists()
    resumed = train(tmp_path, shard_dir, run_dir, *steps, nproc=2)  # train.resume=auto by default
    assert f"resumed from {run_dir / 'checkpoints'}/step-" in resumed.stderr
    assert same_weights(tmp_path / "straight", run_dir, total)
    client = mlflow_client(tmp_path)
    summary = json.loads((run_dir / "COMPLETED.json").read_text())
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id],
                              filter_string="attributes.run_name = 'killed'")
    assert len(runs) == 1 and runs[0].info.run_id == summary["mlflow_run_id"]
    logged = [m.step for m in client.get_metric_history(summary["mlflow_run_id"], "train/total")]
    assert sorted(logged) == list(range(1, total + 1))  # each step exactly once
    state = json.loads((run_dir / "checkpoints" / f"step-{total:08d}" / "trainer_state.json").read_text())
    assert state["mlflow_run_id"] == summary["mlflow_run_id"] and state["world_size"] == 2
    assert state["grad_accum"] == 2 and state["step"] == total


@pytest.mark.parametrize("nproc,every,total,cache", [(1, 20, 22, "none"), (2, 3, 8, "memory")],
                         ids=["epoch-boundary", "mid-epoch-cached"])
def test_a_resume_from_a_checkpoint_matches_the_uninterrupted_run(tmp_path, shard_dir, nproc, every, total, cache):
    """At an epoch's boundary (one process: 20 steps an epoch), and mid-epoch from each rank's memory cache (2 ranks
    x 16: 10 steps an epoch): the uninterrupted run's own checkpoint, resumed in another directory (the SIGKILL
    above shows that a killed run resumes from its checkpoint)."""
    steps = [*resume_settings(every, total, cache=cache), "checkpoint.keep=3"]
    straight = train(tmp_path, shard_dir, tmp_path / "straight", *steps, nproc=nproc)
    assert ("data.cache=memory: " in straight.stderr) == (cache == "memory")
    checkpoint = tmp_path / "straight" / "checkpoints" / f"step-{every:08d}"
    resumed = train(tmp_path, shard_dir, tmp_path / "resumed", *steps, f"train.resume={checkpoint}", nproc=nproc)
    assert f"resumed from {checkpoint} at step {every}" in resumed.stderr
    assert same_weights(tmp_path / "straight", tmp_path / "resumed", total)


def test_a_resume_keeps_the_recorded_worker_count_under_auto_and_refuses_another_explicit_one(tmp_path, shard_dir):
    """Each worker reads its own shards, so the count decides the sample order."""
    run_dir, small = tmp_path / "run", ["model.name=pvae", "model.base_channels=8", "model.latent_dim=16"]
    train(tmp_path, shard_dir, run_dir, "train.max_steps=1", "data.num_workers=2", *small)
    one_cpu = min(os.sched_getaffinity(0))  # where auto picks 0 workers: no CPU to spare
    proc = train(tmp_path, shard_dir, run_dir, "train.max_steps=2", "data.num_workers=auto", *small,
                 preexec_fn=lambda: os.sched_setaffinity(0, {one_cpu}))
    assert "resume: data.num_workers=auto keeps the checkpoint's 2 worker(s) (it would pick 0 here)" in proc.stderr
    assert "data: 2 loader worker(s) per rank (data.num_workers=auto)" in proc.stderr
    state = json.loads((run_dir / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["num_workers"] == 2
    proc = train(tmp_path, shard_dir, run_dir, "train.max_steps=3", "data.num_workers=1", *small, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: [rank 0] {run_dir / 'checkpoints' / 'step-00000002'}: trained with 2 loader worker(s) per rank, this "
        "launch asks for 1 (data.num_workers=1): the count decides the sample order; resume with "
        "data.num_workers=auto or =2, or take responsibility with train.resume_allow_changes=[data.num_workers]")
    # the kept count is checked against the shards like a chosen one: one shard (said to hold the same 320
    # training images, so the data position carries over) cannot feed 2 workers
    proc = train(tmp_path, shard_dir, run_dir, "train.max_steps=3", "data.num_workers=auto", *small,
                 f"data.shards={shard_dir}/train-{{000000..000000}}.tar", "data.num_samples=320",
                 "train.resume_allow_changes=[data.shards,data.num_samples]",
                 check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "error: [rank 0] 1 training shard(s) for 1 rank(s) x 2 worker(s): need at least 2 (write smaller shards "
        "with --shard-size, or use fewer workers)"), proc.stderr[-3000:]


def test_sigterm_checkpoints_at_an_agreed_step_and_leaves_resume_marker(tmp_path, shard_dir, processes):
    run_dir = tmp_path / "run"
    cmd = [*launch_cmd(2), *base_args(shard_dir, run_dir, "train.max_steps=400", "checkpoint.every_steps=0",
                                      "log.progress_every_s=0")]
    proc = processes.popen(cmd, cwd=tmp_path, env=env_for(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    for line in proc.stderr:  # log.progress_every_s=0: a line at every log step once the loop runs
        if line.startswith("step 3/400"):
            break
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


def test_resume_refuses_a_changed_learning_rate_before_writing_anything(tmp_path, shard_dir):
    run_dir = tmp_path / "run"
    train(tmp_path, shard_dir, run_dir, "train.max_steps=2")
    saved_config = (run_dir / "config.yaml").read_text()
    proc = train(tmp_path, shard_dir, run_dir, "train.max_steps=4", "optim.lr=0.05", check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: [rank 0] {run_dir / 'checkpoints' / 'step-00000002'}: this launch changes")
    assert "optim.lr: 0.0005 -> 0.05" in last and "train.resume_allow_changes" in last
    assert (run_dir / "config.yaml").read_text() == saved_config
    assert not (run_dir / "checkpoints" / "step-00000004").exists()
    proc = train(tmp_path, shard_dir, run_dir, "train.max_steps=4", "optim.lr=0.05",
                 "train.resume_allow_changes=[optim.lr]")
    assert "resume: train.max_steps changed from 2 to 4" in proc.stderr and "resumed from" in proc.stderr
    run = mlflow_client(tmp_path).get_run(json.loads((run_dir / "COMPLETED.json").read_text())["mlflow_run_id"])
    assert run.data.tags["resume.step2.optim.lr"] == "0.0005 -> 0.05"


@pytest.mark.parametrize("model", ["pvae", "dcgan"])
def test_baselines_train_in_the_same_loop(tmp_path, shard_dir, model):
    import torch

    from dfcvae_dist.config import load_config
    from dfcvae_dist.families import get_family

    run_dir = tmp_path / model
    extra = ["optim.lr=2e-4", "optim.beta1=0.5", "model.base_channels=16"] if model == "dcgan" else ["loss.beta=1.0"]
    train(tmp_path, shard_dir, run_dir, f"model.name={model}", "train.max_steps=6", "log.image_every_steps=3",
          "train.deterministic=true", *extra)  # deterministic kernels exist for every op of both families
    summary = json.loads((run_dir / "COMPLETED.json").read_text())
    assert summary["step"] == 6 and summary["feature_weights"] == "none"
    client = mlflow_client(tmp_path)
    assert len(client.get_metric_history(summary["mlflow_run_id"], "train/total")) == 6
    run = client.get_run(summary["mlflow_run_id"])
    assert not {"loss.layers", "loss.network_weights", "loss.feature_scale"} & set(run.data.params)  # no VGG in either
    if model == "pvae":
        assert len(client.get_metric_history(run.info.run_id, "train/rec_pixel")) == 6
        assert image_steps(client, run.info.run_id) == {"reconstructions": [0, 3, 6], "samples": [0, 3, 6]}
    else:
        assert not any(k.startswith("loss.") for k in run.data.params)
        assert image_steps(client, run.info.run_id) == {"samples": [0, 3, 6]}  # a GAN reconstructs nothing
    torch.manual_seed(0)  # train.seed: the weights the run started from
    start = get_family(model).build_model(load_config(run_dir / "config.yaml").model).state_dict()
    trained = load_file(run_dir / "checkpoints" / "step-00000006" / "weights.safetensors")
    parts = ["generator.", "discriminator."] if model == "dcgan" else ["encoder.", "decoder."]
    for part in parts:  # every network was optimized
        weights = [k for k in trained if k.startswith(part) and k.endswith(".weight")]
        assert weights and any(not torch.equal(trained[k], start[k]) for k in weights), part
    if model == "dcgan":
        for name in ("train/loss_d", "train/loss_g"):
            assert len(client.get_metric_history(summary["mlflow_run_id"], name)) == 6, name


def test_resume_from_a_path_or_none_and_pruning_to_keep(tmp_path, shard_dir):
    run_dir = tmp_path / "run"
    train(tmp_path, shard_dir, run_dir, "train.max_steps=4", "checkpoint.every_steps=1", "checkpoint.keep=2")
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000003", "step-00000004"]
    # A checkpoint written before TrainerState existed still resumes (its position read from micro_batches; its
    # precision, resolved, in its config).
    state = json.loads((checkpoints / "step-00000003" / "trainer_state.json").read_text())
    config = checkpoints / "step-00000003" / "config.yaml"
    config.write_text(config.read_text().replace("mixed_precision: auto", "mixed_precision: 'no'"))
    old = {k: state[k] for k in ("step", "world_size", "batches_per_epoch", "mlflow_run_id", "config_digest", "model",
                                 "skipped_steps", "feature_weights")}
    old.update(epoch=0, samples_seen=48, micro_batches=3)
    (checkpoints / "step-00000003" / "trainer_state.json").write_text(json.dumps(old))
    other = tmp_path / "other"
    proc = train(tmp_path, shard_dir, other, "train.max_steps=5", f"train.resume={checkpoints / 'step-00000003'}")
    assert f"resumed from {checkpoints / 'step-00000003'} at step 3" in proc.stderr
    assert json.loads((other / "COMPLETED.json").read_text())["step"] == 5
    # another run's last checkpoint, nothing left to train: the new run directory still gets a checkpoint of its own
    copy = tmp_path / "copy"
    train(tmp_path, shard_dir, copy, "train.max_steps=4", "checkpoint.every_steps=1", "checkpoint.keep=2",
          f"train.resume={checkpoints / 'step-00000004'}")
    completed = json.loads((copy / "COMPLETED.json").read_text())
    assert completed["checkpoint"] == str(copy / "checkpoints" / "step-00000004")
    proc = train(tmp_path, shard_dir, run_dir, "train.max_steps=1", "train.resume=none")
    assert "resumed" not in proc.stderr and json.loads((run_dir / "COMPLETED.json").read_text())["step"] == 1
    proc = train(tmp_path, shard_dir, tmp_path / "third", "train.max_steps=1", f"train.resume={tmp_path / 'nothing'}",
                 check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == \
        f"error: [rank 0] train.resume: {tmp_path / 'nothing'} is not a complete checkpoint (no trainer_state.json)"


def test_precision_comes_from_the_launcher_is_recorded_and_a_resume_in_another_is_refused(tmp_path, shard_dir):
    """`accelerate launch --mixed_precision bf16` exports ACCELERATE_MIXED_PRECISION=bf16; the default
    train.mixed_precision=auto takes it (a small pixel VAE: bf16 is slow on this CPU). The trainer leaves the
    config as given (auto) and records the precision it resolved in the checkpoint."""
    run_dir = tmp_path / "run"
    proc = train(tmp_path, shard_dir, run_dir, "model.name=pvae", "train.max_steps=1",
                 env={"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert "precision bf16" in proc.stderr and "mixed_precision: auto" in (run_dir / "config.yaml").read_text()
    summary = json.loads((run_dir / "COMPLETED.json").read_text())
    assert json.loads((Path(summary["checkpoint"]) / "trainer_state.json").read_text())["precision"] == "bf16"
    run = mlflow_client(tmp_path).get_run(summary["mlflow_run_id"])
    assert run.data.tags["precision"] == "bf16"
    proc = train(tmp_path, shard_dir, run_dir, "model.name=pvae", "train.max_steps=2", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: [rank 0] {summary['checkpoint']}: trained in precision bf16, this launch resolves no: resume with "
        "--mixed_precision bf16 (or train.mixed_precision=bf16), or start a new run")


def test_shards_of_another_image_size_are_named_before_any_step(tmp_path, shard_dir):
    proc = train(tmp_path, shard_dir, tmp_path / "run", "model.image_size=64", "train.max_steps=1", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: [rank 0] {shard_dir / 'manifest.json'}: the shards hold 32x32 images, but model.image_size=64: set "
        "model.image_size=32, or write shards with --image-size 64")


def test_a_quiet_step_issues_no_host_sync_and_no_collective(tmp_path, shard_dir):
    """2 processes: a step that neither logs nor checkpoints waits for nothing of ours and makes no tensor from host
    data (on a GPU, a blocking copy); the counter does see the agreement on stop/non-finite state (every
    train.sync_every_steps), the logging, and the tensors the end of the run makes from host counters."""
    from dfcvae_dist.bench.step_overhead import measure

    profile = measure(shard_dir, tmp_path)
    assert profile["world_size"] == 2 and profile["quiet_steps"] == [2, 3, 4, 7, 8, 9]
    assert profile["host_syncs"] == 0 and profile["collectives"] == 0 and profile["host_to_device_copies"] == 0
    steps = profile["per_step"]
    assert steps[6]["collectives"] == 1 and steps[6]["host_syncs"] == 1  # the agreement: one all-reduce, one read
    assert steps[5]["collectives"] == 1 and steps[5]["host_syncs"] == 1  # the metrics of a log step
    assert steps[10]["host_to_device_copies"] > 0  # the end: tensors of the damaged-sample counters, summed
    assert all(steps[s]["ddp_buffer_broadcasts"] == 1 for s in steps)  # DDP's own, counted apart


def test_a_compiled_step_run_resumes_bit_exactly_and_keeps_its_graphs_across_the_epoch(tmp_path, shard_dir):
    """train.compile=step on CPU (inductor, no CUDA graphs): a run resumed in a new process from the step-6
    checkpoint of an uninterrupted one ends with the same parameters, bit for bit; the learning rate halves after
    step 10 (10 steps per epoch) without a recompile, since it is a tensor the compiled optimizer step reads."""
    small = ["train.compile=step", "model.base_channels=8", "model.latent_dim=16", "train.batch_size=32",
             "train.max_steps=12", "checkpoint.every_steps=6", "log.every_steps=4", "log.enabled=false"]
    logs = {"TORCH_LOGS": "recompiles"}
    straight = train(tmp_path, shard_dir, tmp_path / "straight", *small, env=logs)
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-00000006"
    resumed = train(tmp_path, shard_dir, tmp_path / "resumed", *small, f"train.resume={checkpoint}", env=logs)
    assert f"resumed from {checkpoint} at step 6" in resumed.stderr and "10 steps per epoch" in straight.stderr
    for proc in (straight, resumed):
        assert "train.compile=step: the first step took" in proc.stderr and "Recompiling" not in proc.stderr
    digests = [json.loads((tmp_path / run / "ranks" / "rank-0.json").read_text())["params_sha256"]
               for run in ("straight", "resumed")]
    assert digests[0] == digests[1]
    assert same_weights(tmp_path / "straight", tmp_path / "resumed", 12)  # BatchNorm's running statistics too


def test_torchrun_with_a_webdataset_url_pattern(tmp_path, shard_dir):
    """The same module under plain torchrun, streaming shards named by a brace pattern instead of a manifest."""
    n = len(list(shard_dir.glob("train-*.tar")))
    pattern = f"{shard_dir}/train-{{000000..{n - 1:06d}}}.tar"
    run_dir = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m",
           "dfcvae_dist.train", *base_args(shard_dir, run_dir, "train.max_steps=3", "data.num_samples=321")]
    cmd[cmd.index(f"data.shards={shard_dir}")] = f"data.shards={pattern}"
    with ProcessGroups() as groups:
        proc = groups.run(cmd, 600, cwd=tmp_path, env=env_for(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "world size 2" in proc.stderr and "10 steps per epoch" in proc.stderr  # 321 // 32
    assert json.loads((run_dir / "COMPLETED.json").read_text())["step"] == 3


def test_resume_refuses_the_same_shards_path_with_other_contents(tmp_path, shard_dir, trained_run, celeba_dir):
    """The run directory and its shards moved together (their paths rewritten), then the shards written again in
    place from other images: the path is unchanged, so only the manifest's digest, kept in the checkpoint, tells."""
    shards, run_dir = tmp_path / "shards", tmp_path / "run"
    shutil.copytree(shard_dir, shards)
    shutil.copytree(trained_run, run_dir)
    for config in [run_dir / "config.yaml", *run_dir.glob("checkpoints/step-*/config.yaml")]:
        config.write_text(config.read_text().replace(str(shard_dir), str(shards)))
    shutil.rmtree(shards)
    run_tool("make_shards.py", "--celeba-root", celeba_dir, "--out", shards, "--image-size", "32", "--shard-size", "50")
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    with ProcessGroups() as groups:
        args = base_args(shards, run_dir, "train.max_steps=8", "log.enabled=false")
        proc = groups.run([sys.executable, "-m", "dfcvae_dist.train", *args], 600, cwd=tmp_path)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: [rank 0] {run_dir / 'checkpoints' / 'step-00000006'}: {shards} holds other shards "
                           "than the checkpoint trained on (manifest digest "), proc.stderr[-2000:]
    assert "train.resume_allow_changes=[data.shards]" in last
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == checkpoints
