"""Tracking through a real `mlflow server` on loopback, and an unreachable server both ways."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import (base_args, env_for, free_port, image_steps, launch_cmd, start_server, train,
                           wait_until)
from dfcvae_dist.data.shards import manifest_digest, read_manifest

pytestmark = pytest.mark.slow


def two_node_launch(machine_rank: int, port: int) -> list[str]:
    """One `accelerate launch` per node, as slurm/train.sbatch starts them: here two nodes of one process on
    loopback."""
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_machines", "2", "--num_processes", "2",
            "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            "--rdzv_backend", "static", "--same_network", "--multi_gpu", "--mixed_precision", "no",
            "-m", "dfcvae_dist.train"]


def test_a_two_node_run_fills_its_run_page_on_a_real_server(tmp_path, shard_dir, mlflow_server, processes):
    """Metrics, a description, the data's lineage, images over time, and system metrics from every node."""
    import mlflow

    run_dir, port = tmp_path / "run", free_port()
    args = base_args(shard_dir, run_dir, "train.max_steps=6", f"log.tracking_uri={mlflow_server}",
                     "log.image_every_steps=3", "log.system_metrics_interval_s=0.5")
    logs = [tmp_path / f"node{rank}.err" for rank in (0, 1)]
    nodes = [processes.popen([*two_node_launch(rank, port), *args], cwd=tmp_path, env=env_for(tmp_path),
                             stdout=subprocess.DEVNULL, stderr=log.open("w")) for rank, log in enumerate(logs)]
    for node, log in zip(nodes, logs, strict=True):
        assert node.wait(timeout=600) == 0, log.read_text()[-3000:]
    run_id = json.loads((run_dir / "COMPLETED.json").read_text())["mlflow_run_id"]
    assert f"MLflow: run {run_id} in {mlflow_server}; artifacts in " in logs[0].read_text()  # the startup line
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.batch_size"] == "16"
    assert run.data.tags["world_size"] == "2"
    assert [m.step for m in client.get_metric_history(run_id, "train/total")] == list(range(1, 7))
    description = run.data.tags["mlflow.note.content"]
    assert "DFC-VAE" in description and "RANDOM weights" in description and "synthetic" in description
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert set(inputs) == {f"{shard_dir.name}/{split}" for split in ("train", "val", "test")}
    training = inputs[f"{shard_dir.name}/train"]
    assert training.dataset.digest == manifest_digest(read_manifest(shard_dir))
    assert training.dataset.source == str(shard_dir.resolve()) and [t.value for t in training.tags] == ["training"]
    profile = json.loads(training.dataset.profile)
    assert profile["num_samples"] == 321 and profile["synthetic"]
    # one entry per image step, from the untrained model at step 0 (the UI's image cards open on step 0)
    assert image_steps(client, run_id) == {"reconstructions": [0, 3, 6], "samples": [0, 3, 6]}
    for node in ("node0", "node1"):  # one monitor per node, each under its node id
        for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
            assert client.get_metric_history(run_id, f"system/{node}/{name}"), (node, name)


def test_unreachable_server_fails_fast_naming_the_uri(tmp_path, shard_dir, processes):
    uri = f"http://127.0.0.1:{free_port()}"
    # Fast: within 60 s, not after MLflow's minutes of retries (a run still going then is killed and fails the test).
    proc = processes.run([*launch_cmd(1), *base_args(shard_dir, tmp_path / "run", "train.max_steps=2",
                                                     f"log.tracking_uri={uri}")],
                         60, cwd=tmp_path, env=env_for(tmp_path))
    assert proc.returncode == 2
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


def test_server_killed_mid_run_training_goes_on_and_buffered_metrics_arrive(tmp_path, shard_dir, processes):
    """The run outlasts the outage and its reconnection (it is stopped a few steps after), whenever they come. One
    process: the sender is rank 0's."""
    import mlflow

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(processes, tmp_path, port)
    run_dir, stderr = tmp_path / "run", tmp_path / "trainer.err"
    cmd = [*launch_cmd(1), *base_args(shard_dir, run_dir, "train.max_steps=20000", f"log.tracking_uri={uri}",
                                      "checkpoint.every_steps=0", "log.progress_every_s=0", "model.base_channels=8")]
    with stderr.open("w") as err_file:
        trainer = processes.popen(cmd, cwd=tmp_path, env=env_for(tmp_path), stdout=subprocess.DEVNULL, stderr=err_file)
    client = mlflow.MlflowClient(tracking_uri=uri)

    def logging_steps():
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        return runs and client.get_metric_history(runs[0].info.run_id, "train/total")

    wait_until(logging_steps, 240, "the run to log its first steps", interval=0.5)
    processes.kill(server)
    # The outage lasts until the trainer has noticed it, mid-run.
    wait_until(lambda: "MLflow unreachable" in stderr.read_text(), 120, "the trainer to notice the outage")
    start_server(processes, tmp_path, port)
    wait_until(lambda: "MLflow reachable again" in stderr.read_text(), 120, "the trainer to reach the server again")
    seen = stderr.read_text().count("\nstep ")
    wait_until(lambda: stderr.read_text().count("\nstep ") >= seen + 3, 120, "steps after the outage")
    trainer.send_signal(signal.SIGTERM)
    assert trainer.wait(timeout=120) == 0, stderr.read_text()[-3000:]
    stopped = json.loads((run_dir / "RESUME_ME.json").read_text())
    steps = [m.step for m in mlflow.MlflowClient(tracking_uri=uri).get_metric_history(stopped["mlflow_run_id"],
                                                                                      "train/total")]
    assert sorted(steps) == list(range(1, stopped["step"] + 1))  # outage metrics were buffered and sent, none twice


@pytest.mark.parametrize("ending", ["finishes", "sigterm"])
def test_a_hung_server_never_stalls_the_loop_and_costs_at_most_the_flush_deadline(tmp_path, shard_dir, processes,
                                                                                  ending):
    """A real server under SIGSTOP accepts connections and never answers. Each MLflow call then blocks ~10 s:
    had the loop made them, these runs would take minutes (past the wait below). The run that finishes is one
    process; the one stopped is two ranks, which agree on the step to stop at."""
    import signal

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(processes, tmp_path, port)
    run_dir, stderr = tmp_path / "run", tmp_path / "trainer.err"
    nproc, steps = (1, "train.max_steps=20") if ending == "finishes" else (2, "train.max_steps=400")
    cmd = [*launch_cmd(nproc), *base_args(shard_dir, run_dir, steps, f"log.tracking_uri={uri}", "log.flush_timeout_s=3",
                                          "checkpoint.every_steps=0", "log.progress_every_s=0",
                                          "log.system_metrics_interval_s=0.5")]
    with stderr.open("w") as err_file:
        trainer = processes.popen(cmd, cwd=tmp_path, env=env_for(tmp_path), stdout=subprocess.DEVNULL, stderr=err_file)
    wait_until(lambda: "step 2/" in stderr.read_text(), 240, "the loop to start", interval=0.2)
    os.killpg(server.pid, signal.SIGSTOP)
    if ending == "sigterm":  # 10 steps: at ~10 s a call, a loop waiting on MLflow would not make them in time
        seen = stderr.read_text().count("\nstep ")
        wait_until(lambda: stderr.read_text().count("\nstep ") >= seen + 10, 60, "steps after the server hung")
        trainer.send_signal(signal.SIGTERM)
    trainer.wait(timeout=90)  # the 17 or so steps left, had each waited ~10 s on MLflow, would take longer
    err = stderr.read_text()
    unsent = next((line for line in err.splitlines() if "were not sent within log.flush_timeout_s=3" in line), None)
    assert unsent and "system metrics" in unsent, err[-3000:]  # MLflow's monitor, stopped without waiting on it
    marker = run_dir / ("COMPLETED.json" if ending == "finishes" else "RESUME_ME.json")
    assert json.loads(marker.read_text())["step"] > 2
    if ending == "finishes":
        assert trainer.returncode == 0


def test_a_run_that_fails_ends_failed_in_mlflow(tmp_path, shard_dir, mlflow_server):
    import mlflow

    proc = train(tmp_path, shard_dir, tmp_path / "nan-run", "train.max_steps=2", "loss.feature_scale=1e30",
                 f"log.tracking_uri={mlflow_server}", check=False)
    assert proc.returncode == 2 and "non-finite loss" in proc.stderr
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="attributes.run_name = 'nan-run'")
    assert [r.info.status for r in runs] == ["FAILED"]


def test_every_exit_after_the_run_was_created_ends_it_failed_or_killed(tmp_path, shard_dir, mlflow_server, processes):
    """Setup goes on after the MLflow run exists: it reads the fixed image batch from the val split. Here from a
    damaged shard (an error), and from a shard on a hung filesystem (a FIFO nobody writes), left by SIGTERM."""
    import mlflow

    damaged, hung = tmp_path / "damaged", tmp_path / "hung"
    for copy in (damaged, hung):
        shutil.copytree(shard_dir, copy)
    val = damaged / "val-000000.tar"
    val.write_bytes(val.read_bytes()[: val.stat().st_size // 3])
    (hung / "val-000000.tar").unlink()
    os.mkfifo(hung / "val-000000.tar")
    tracked = ["train.max_steps=2", f"log.tracking_uri={mlflow_server}", "model.base_channels=8"]
    failed = train(tmp_path, damaged, tmp_path / "setup-error", *tracked, check=False)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1].startswith(f"error: [rank 0] {damaged}/val-000000.tar: ")
    log = tmp_path / "stopped.err"
    stopped = processes.popen([*launch_cmd(1), *base_args(hung, tmp_path / "setup-stop", *tracked)], cwd=tmp_path,
                              env=env_for(tmp_path), stdout=subprocess.DEVNULL, stderr=log.open("w"))
    wait_until(lambda: "MLflow: run " in log.read_text(), 300, "the MLflow run to be created")
    time.sleep(1)  # blocked opening the FIFO by now
    stopped.send_signal(signal.SIGTERM)
    assert stopped.wait(timeout=60) == 2, log.read_text()[-3000:]
    assert log.read_text().strip().splitlines()[-1] == (
        f"error: [rank 0] stopped by SIGTERM while setting up, before the first step of this launch; "
        f"{tmp_path / 'setup-stop' / 'RESUME_ME.json'} says where to resume")
    marker = json.loads((tmp_path / "setup-stop" / "RESUME_ME.json").read_text())
    assert marker["step"] == 0 and marker["checkpoint"] == "None"  # a Slurm job would be requeued, to start afresh
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    assert client.get_run(re.search(r"MLflow: run (\w+) in", failed.stderr).group(1)).info.status == "FAILED"
    assert client.get_run(marker["mlflow_run_id"]).info.status == "KILLED"


def test_a_run_started_from_another_run_directorys_checkpoint_is_a_new_mlflow_run(tmp_path, shard_dir, mlflow_server):
    import mlflow

    source, resumed = tmp_path / "resume-source", tmp_path / "resumed-elsewhere"
    tracked = [f"log.tracking_uri={mlflow_server}", "model.base_channels=8"]
    train(tmp_path, shard_dir, source, "train.max_steps=2", *tracked)
    train(tmp_path, shard_dir, resumed, "train.max_steps=4", f"train.resume={source}", *tracked)
    source_id = json.loads((source / "COMPLETED.json").read_text())["mlflow_run_id"]
    run_id = json.loads((resumed / "COMPLETED.json").read_text())["mlflow_run_id"]
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(run_id)
    assert run_id != source_id and run.info.run_name == "resumed-elsewhere" and run.info.status == "FINISHED"
    assert run.data.tags["resumed_from"] == str(source / "checkpoints" / "step-00000002")
    assert run.data.tags["resumed_from_run_id"] == source_id  # train.resume is bookkeeping, not a param
    assert [m.step for m in client.get_metric_history(run_id, "train/total")] == [3, 4]
    assert [m.step for m in client.get_metric_history(source_id, "train/total")] == [1, 2]  # the source's, untouched
    assert "resumed_from" not in client.get_run(source_id).data.tags
