"""Sweeps (dfcvae-sweep, slurm/sweep.sbatch): tasks checked and named before anything runs, trained and evaluated
on a workstation and as a Slurm job array with a preempted task, under one MLflow parent run."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from dfcvae_dist.errors import UserError
from dfcvae_dist.rundir import RunLock
from tests.helpers import (ROOT, ProcessGroups, log_tail, preempt_after_first_checkpoint, run_tool, wait_ended,
                           wait_until)
from tests.slurm_cluster import unavailable_reason

TINY_TASKS = ["dfcvae-123-seed0", "dfcvae-123-seed1", "pvae-seed0", "pvae-seed1"]


def write_sweep(tmp_path, shard_dir, tracking_uri=None, steps=3, name="tiny", **extra_overrides):
    """The tiny sweep: DFC-VAE 123 and PVAE x seeds 0, 1 (tasks 0-3), 32x32, a few steps, a few test images."""
    overrides = {"data.shards": str(shard_dir), "train.max_steps": steps, "train.batch_size": 16,
                 "train.val_every_steps": 0, "log.every_steps": 1, "log.image_every_steps": 0,
                 **({"log.tracking_uri": tracking_uri} if tracking_uri else {"log.enabled": False}), **extra_overrides}
    sweep = {"name": name, "base": "quickstart", "overrides": overrides,
             "runs": {"dfcvae-123": {}, "pvae": {"model.name": "pvae", "loss.beta": 1.0}},
             "grid": {"train.seed": [0, 1]}, "sweep_dir": str(tmp_path / "runs"),
             "evaluate": {"shards": str(shard_dir), "vgg_weights": "random", "max_images": 40, "batch_size": 100,
                          "svm_subsample": 200}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def sweep_cli(*args, check=True, **kw):
    return run_tool("sweep.py", *map(str, args), check=check, **kw)


def assert_finished_with_evaluations(run_dir, family="vae"):
    summary = json.loads((run_dir / "COMPLETED.json").read_text())
    assert summary["step"] == summary["total_steps"]
    quality = json.loads((run_dir / "eval" / "quality" / "quality.json").read_text())
    assert list(quality["models"]) == [run_dir.name]
    if family != "dcgan":
        assert (run_dir / "eval" / "latents" / "latents.npz").is_file()
        assert json.loads((run_dir / "eval" / "svm" / "svm_report.json").read_text())["mean_accuracy"] > 0


def sweep_runs(tracking_uri, sweep_dir, name):
    """(parent run, child runs) of the sweep in MLflow; the parent is the one parent.json names."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    parent = json.loads((sweep_dir / "parent.json").read_text())
    runs = client.search_runs([parent["experiment_id"]], f"tags.sweep = '{name}'")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent["run_id"]]
    assert [r.info.run_id for r in runs if r not in children] == [parent["run_id"]]  # one parent, no stray run
    return client.get_run(parent["run_id"]), children


def assert_report(path, sweep_dir, out, tasks, parent_client=None):
    """dfcvae-report --sweep on a sweep that ran `tasks`: a column per run name that finished one (its seeds pooled),
    the tasks not run listed, both figures, and the report in the sweep's parent run."""
    proc = run_tool("report.py", "--sweep", str(path), "--out", str(out))
    report = json.loads((out / "report.json").read_text())
    seeds = {run: n for run in ("dfcvae-123", "pvae") if (n := sum(TINY_TASKS[i].startswith(f"{run}-") for i in tasks))}
    assert list(report["runs"]) == list(seeds), proc.stdout
    assert {run: r["svm"]["mean_accuracy"]["n"] for run, r in report["runs"].items()} == seeds
    not_run = [name for i, name in enumerate(TINY_TASKS) if i not in tasks]
    assert [t["name"] for t in report["tasks"] if t["status"] == "not started"] == not_run
    assert (out / "samples.png").is_file() and (out / "reconstructions.png").is_file()
    if parent_client is not None:
        parent = json.loads((sweep_dir / "parent.json").read_text())["run_id"]
        assert "report/report.md" in {a.path for a in parent_client.list_artifacts(parent, "report")}


def test_plan_prints_every_task_in_order_with_its_name_overrides_and_the_sbatch_line(tmp_path, shard_dir):
    path = write_sweep(tmp_path, shard_dir)
    text = yaml.safe_load(path.read_text())
    text["grid"]["loss.layers"] = ["[relu1_2, relu2_1]", "[relu3_1]"]  # a second key: it varies fastest
    path.write_text(yaml.safe_dump(text, sort_keys=False))
    lines = sweep_cli("plan", path).stdout.splitlines()
    names = [line.split()[1] for line in lines[:-1]]
    assert names == [f"{run}-seed{seed}-layers_{layers}" for run in ("dfcvae-123", "pvae") for seed in (0, 1)
                     for layers in ("relu1_2_relu2_1", "relu3_1")]
    assert [int(line.split()[0]) for line in lines[:-1]] == list(range(8))
    assert "model.name=pvae" in lines[4] and "train.seed=1" in lines[6] and "'loss.layers=[relu3_1]'" in lines[7]
    assert f"train.run_dir={tmp_path / 'runs' / names[5]}" in lines[5]
    assert lines[-1] == f"SWEEP={path} sbatch --array=0-7 slurm/sweep.sbatch"


@pytest.mark.parametrize("key, value, message", [
    ("train.seeed", 1, "unknown key 'train.seeed' (did you mean 'train.seed'?)"),
    ("loss.beta", -1, "'loss.beta' must be between 0.0 and 1000000.0, got -1.0"),
])
def test_plan_refuses_a_bad_task_in_one_line_naming_the_file_and_the_task(tmp_path, shard_dir, key, value, message):
    path = write_sweep(tmp_path, shard_dir)
    text = yaml.safe_load(path.read_text())
    text["runs"]["pvae"][key] = value
    path.write_text(yaml.safe_dump(text, sort_keys=False))
    proc = sweep_cli("plan", path, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(f"error: {path}: task 2 pvae-seed0: ") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_sweep_refuses_a_task_override_of_the_run_directory(tmp_path, shard_dir):
    path = write_sweep(tmp_path, shard_dir, **{"train.run_dir": str(tmp_path / "elsewhere")})
    proc = sweep_cli("plan", path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {path}: overrides: 'train.run_dir' is set by the sweep for every task "
                                   "(train.run_dir, log.parent_run_id, log.run_tags)")


def test_a_task_whose_run_directory_has_a_live_owner_stops_with_one_line(tmp_path, shard_dir):
    path = write_sweep(tmp_path, shard_dir)
    lock = RunLock(tmp_path / "runs" / "pvae-seed1")
    lock.acquire()  # this test process: alive
    try:
        proc = sweep_cli("task", path, 3)
    finally:
        lock.release()
    assert proc.stdout.strip().startswith(f"task 3 pvae-seed1: running elsewhere ({tmp_path / 'runs' / 'pvae-seed1'} "
                                          "is in use by host ") and f"pid {os.getpid()}" in proc.stdout
    assert not (tmp_path / "runs" / "pvae-seed1" / "config.yaml").exists()


@pytest.mark.parametrize("key, value, message", [
    ("svm_class_weight", "balancd", "'evaluate.svm_class_weight' must be one of ['none', 'balanced'], got 'balancd'"),
    ("vgg_weights", "randm", "'evaluate.network_weights' must be imagenet, random or a weights file; 'randm' is "
                             "none"),
    ("max_images", 0, "'evaluate.max_images' must be between 1 and 10000000, got 0"),
    ("fid_samples", "many", "'evaluate.fid_samples' must be of type int, got 'many'"),
    ("fid_samples", -1, "'evaluate.fid_samples' must be between 0 and 10000000, got -1"),
    ("svm_subsample", [1, 2], "'evaluate.svm_subsample' must be of type int, got a sequence"),
    ("splt", "val", "unknown key 'evaluate.splt' (did you mean 'evaluate.split'?)"),
])
def test_plan_refuses_a_bad_evaluation_setting_before_anything_trains(tmp_path, shard_dir, key, value, message):
    path = write_sweep(tmp_path, shard_dir)
    text = yaml.safe_load(path.read_text())
    text["evaluate"][key] = value
    path.write_text(yaml.safe_dump(text, sort_keys=False))
    proc = sweep_cli("plan", path, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {path}: {message}")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_evaluation_settings_are_read_by_their_types_with_null_for_none(tmp_path, shard_dir):
    from dfcvae_dist.sweeps.plan import load_sweep

    path = write_sweep(tmp_path, shard_dir)
    text = yaml.safe_load(path.read_text())
    text["evaluate"].update({"fid_samples": None, "fid_weights": None, "svm_focus": "synthetic", "split": "val",
                             "quality_shards": "null"})
    path.write_text(yaml.safe_dump(text, sort_keys=False))
    ev = load_sweep(path).evaluate
    assert (ev.fid_samples, ev.fid_weights, ev.svm_focus, ev.split, ev.quality_shards, ev.max_images) == \
        (None, None, "synthetic", "val", None, 40)


def test_a_task_stops_before_training_when_its_evaluation_shards_are_missing(tmp_path, shard_dir):
    path = write_sweep(tmp_path, shard_dir)
    text = yaml.safe_load(path.read_text())
    text["evaluate"]["shards"] = str(tmp_path / "no-shards")
    path.write_text(yaml.safe_dump(text, sort_keys=False))
    proc = sweep_cli("task", path, 0, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: {path}: 'evaluate.shards': {tmp_path / 'no-shards' / 'manifest.json'}: no manifest (write shards "
        "with tools/make_shards.py) (relative paths are read from the working directory)")
    assert not (tmp_path / "runs" / TINY_TASKS[0]).exists()  # nothing trained


def test_a_task_is_finished_only_with_a_fresh_completion_and_its_evaluations_marked_done(tmp_path, shard_dir):
    from dfcvae_dist.sweeps.plan import load_sweep
    from dfcvae_dist.sweeps.status import EVALUATED, evaluation_files, task_status

    task = load_sweep(write_sweep(tmp_path, shard_dir)).tasks[0]
    task.run_dir.mkdir(parents=True)
    config, done = task.run_dir / "config.yaml", task.run_dir / "COMPLETED.json"
    config.write_text(task.config.to_yaml())
    done.write_text(json.dumps({"step": 3, "total_steps": 3}))
    for f in evaluation_files(task):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("{}")
    assert task_status(task) == "incomplete"  # no EVALUATED.json: an evaluation (or its MLflow logging) failed
    (task.run_dir / "eval" / EVALUATED).write_text("{}")
    assert task_status(task) == "finished"
    os.utime(done, (config.stat().st_mtime - 10,) * 2)  # a later launch rewrote config.yaml, then died
    assert task_status(task) == "incomplete"
    os.utime(done, (config.stat().st_mtime,) * 2)
    done.write_text("{}")  # no step counts: not a completion
    assert task_status(task) == "incomplete"
    done.write_text('{"step": 3, "total')
    assert task_status(task).startswith(f"incomplete ({done}: unreadable (")


def test_the_parent_run_keeps_its_artifacts_beside_a_sqlite_store(tmp_path, shard_dir, monkeypatch):
    import mlflow

    from dfcvae_dist.sweeps.parent import ensure_parent
    from dfcvae_dist.sweeps.plan import load_sweep

    store = tmp_path / "store"
    store.mkdir()
    sweep = load_sweep(write_sweep(tmp_path, shard_dir, f"sqlite:///{store}/mlflow.db"))
    cwd = tmp_path / "launched-from"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    record = ensure_parent(sweep)
    experiment = mlflow.MlflowClient(tracking_uri=record["tracking_uri"]).get_experiment(record["experiment_id"])
    assert experiment.artifact_location == (store / "mlartifacts").as_uri()
    assert not (cwd / "mlruns").exists()


def test_the_parent_runs_task_count_follows_runs_appended_to_the_sweep_file(tmp_path, shard_dir):
    import mlflow

    from dfcvae_dist.sweeps.parent import ensure_parent
    from dfcvae_dist.sweeps.plan import load_sweep

    path = write_sweep(tmp_path, shard_dir, f"sqlite:///{tmp_path}/mlflow.db", name="growing")
    first = ensure_parent(load_sweep(path))
    client = mlflow.MlflowClient(tracking_uri=first["tracking_uri"])
    assert client.get_run(first["run_id"]).data.tags["sweep.tasks"] == "4"
    text = yaml.safe_load(path.read_text())
    text["runs"]["dfcvae-345"] = {"loss.layers": "[relu3_1, relu4_1, relu5_1]"}  # appended: tasks 4 and 5
    path.write_text(yaml.safe_dump(text, sort_keys=False))
    again = ensure_parent(load_sweep(path))
    assert again["run_id"] == first["run_id"]
    assert client.get_run(first["run_id"]).data.tags["sweep.tasks"] == "6"


EVALUATE_IN_THIS_PROCESS = """
import json, os, subprocess, sys
from dfcvae_dist.sweeps.plan import load_sweep
from dfcvae_dist.sweeps.run import evaluate, start_task, train_args

sweep = load_sweep(sys.argv[1])
task = sweep.task(0)
record = start_task(sweep)
subprocess.run([sys.executable, "-m", "dfcvae_dist.train", *train_args(sweep, task, record)], check=True)
before = dict(os.environ)
evaluate(sweep, task, record)
print(json.dumps({k: os.environ.get(k) for k in {*before, *os.environ} if before.get(k) != os.environ.get(k)}))
"""


@pytest.mark.slow
def test_a_tasks_evaluation_logs_into_its_run_through_a_client_and_leaves_the_environment_alone(
        tmp_path, shard_dir):
    """The evaluations are calls in the task's process: they must reach the task's MLflow run through a client of
    the sweep's store, not by setting MLFLOW_TRACKING_URI (or another MLflow variable) for the rest of it."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = write_sweep(tmp_path, shard_dir, uri, name="tiny-in-process")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with ProcessGroups() as groups:
        proc = groups.run([sys.executable, "-c", EVALUATE_IN_THIS_PROCESS, path], 600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    changed = json.loads(proc.stdout.strip().splitlines()[-1])  # scikit-learn and torch set KMP_*, TORCHINDUCTOR_*
    assert [key for key in changed if key.startswith("MLFLOW_")] == [], changed
    run_dir = tmp_path / "runs" / TINY_TASKS[0]
    assert_finished_with_evaluations(run_dir)
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = json.loads((run_dir / "COMPLETED.json").read_text())["mlflow_run_id"]
    metrics = client.get_run(run_id).data.metrics
    assert {"eval/svm/mean_accuracy", "eval/latent/kl_per_image", "eval/quality/mse"} <= set(metrics)
    name = TINY_TASKS[0]  # quality's two samplers: a figure each, and the mixture it fitted
    assert {a.path for a in client.list_artifacts(run_id, "evaluation")} == {
        "evaluation/svm_report.json", "evaluation/svm_table.md", "evaluation/quality.json",
        f"evaluation/samples-normal-{name}.png", f"evaluation/samples-gmm-{name}.png",
        f"evaluation/gmm-{name}.safetensors"}


@pytest.mark.slow
def test_workstation_sweep_trains_and_evaluates_its_tasks_as_children_of_one_parent_and_skips_them_after(
        tmp_path, shard_dir, mlflow_server):
    """Two tasks side by side (a seed of each run; the Slurm array below pools two seeds of one run)."""
    path = write_sweep(tmp_path, shard_dir, mlflow_server, name="tiny-workstation")
    tasks = (0, 2)
    proc = sweep_cli("run", path, "--parallel", "2", "--tasks", "0,2", timeout=900)
    sweep_dir, names = tmp_path / "runs", [TINY_TASKS[i] for i in tasks]
    for name in names:
        assert f"{name}: finished" in proc.stdout
        assert_finished_with_evaluations(sweep_dir / name)
    assert not any((sweep_dir / TINY_TASKS[i]).exists() for i in (1, 3))
    parent, children = sweep_runs(mlflow_server, sweep_dir, "tiny-workstation")
    assert sorted((c.data.tags["sweep.task_index"], c.data.tags["sweep.task_name"], c.info.run_name)
                  for c in children) == [(str(i), TINY_TASKS[i], TINY_TASKS[i]) for i in tasks]
    assert parent.info.status == "RUNNING"  # tasks 1 and 3 have not run: the sweep is not done
    assert all(any(k.startswith("eval/svm/") for k in c.data.metrics) for c in children)
    assert all(any(k.startswith("eval/quality/") for k in c.data.metrics) for c in children)

    done_at = {n: (sweep_dir / n / "COMPLETED.json").stat().st_mtime_ns for n in names}
    again = sweep_cli("run", path, "--tasks", "0,2")
    assert [f"task {i} {TINY_TASKS[i]}: finished, skipped" in again.stdout for i in tasks] == [True] * 2
    assert done_at == {n: (sweep_dir / n / "COMPLETED.json").stat().st_mtime_ns for n in names}
    assert len(sweep_runs(mlflow_server, sweep_dir, "tiny-workstation")[1]) == 2
    import mlflow

    assert_report(path, sweep_dir, tmp_path / "report", tasks, mlflow.MlflowClient(tracking_uri=mlflow_server))


@pytest.mark.slow
@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
def test_slurm_array_runs_the_sweep_with_a_preempted_task_requeued_on_its_own(
        cluster, tmp_path, shard_dir, mlflow_server):
    """Two seeds of one run, a task a node; the first is preempted after its first checkpoint."""
    path = write_sweep(tmp_path, shard_dir, mlflow_server, steps=8, name="tiny-slurm",
                       **{"checkpoint.every_steps": 2, "train.sync_every_steps": 2})
    env = {"SWEEP": str(path), "GPUS_PER_NODE": "0", "PROJECT_DIR": str(ROOT)}
    out = tmp_path / "sweep-%a.out"
    array = cluster.run("sbatch", "--parsable", "--array=0-1", "-N", "1", "-o", str(out),
                        str(ROOT / "slurm" / "sweep.sbatch"), env=env).stdout.strip()
    sweep_dir, logs = tmp_path / "runs", [tmp_path / f"sweep-{i}.out" for i in range(2)]
    sent = preempt_after_first_checkpoint(cluster, f"{array}_0", sweep_dir / TINY_TASKS[0], logs[0])
    states = [wait_ended(cluster, f"{array}_{i}", logs[i], timeout=600) for i in range(2)]
    assert states == ["COMPLETED"] * 2, [log_tail(log) for log in logs]
    preempted = logs[0].read_text()
    assert "requeueing (restart 1" in preempted, sent.stderr
    assert preempted.count("preemption signal") == 1  # the requeue's own SIGTERM is no second preemption
    assert "requeueing" not in logs[1].read_text()  # requeued on its own
    for name in TINY_TASKS[:2]:
        assert_finished_with_evaluations(sweep_dir / name)
    _, children = sweep_runs(mlflow_server, sweep_dir, "tiny-slurm")  # one parent: checked there
    assert sorted(c.info.run_name for c in children) == TINY_TASKS[:2]
    assert next(c for c in children if c.info.run_name == TINY_TASKS[0]).data.tags["slurm.restart_count"] == "1"

    again = cluster.run("sbatch", "--parsable", "--array=0-1", "-N", "1", "-o", str(tmp_path / "again-%a.out"),
                        str(ROOT / "slurm" / "sweep.sbatch"), env=env).stdout.strip()
    assert [wait_ended(cluster, f"{again}_{i}", logs[i], 120) for i in range(2)] == ["COMPLETED"] * 2
    assert all(f"task {i} {n}: finished, skipped" in (tmp_path / f"again-{i}.out").read_text()
               for i, n in enumerate(TINY_TASKS[:2]))
    assert len(sweep_runs(mlflow_server, sweep_dir, "tiny-slurm")[1]) == 2
    assert_report(path, sweep_dir, tmp_path / "report", (0, 1))


def test_tasks_are_indices_and_ranges_and_a_task_the_sweep_lacks_is_named():
    from dfcvae_dist.cli.sweep import parse_indices

    assert parse_indices("0,2,5-7", 8) == [0, 2, 5, 6, 7]
    with pytest.raises(UserError, match=r"^--tasks 6-8: no task 8 \(the sweep has tasks 0-7\)$"):
        parse_indices("6-8", 8)
    with pytest.raises(UserError, match=r"^--tasks 1,x: expected indices like 0,2,5-7$"):
        parse_indices("1,x", 8)


def test_the_papers_sweep_plans_its_four_runs_and_the_extra_dfcvae_gan_over_three_seeds():
    lines = sweep_cli("plan", ROOT / "sweeps" / "paper.yaml").stdout.splitlines()
    assert [line.split()[1] for line in lines[:-1]] == [
        f"{run}-seed{seed}" for run in ("dfcvae-123", "dfcvae-345", "pvae", "dcgan", "dfcvae-gan")
        for seed in (0, 1, 2)]
    assert lines[-1].endswith("sbatch --array=0-14 slurm/sweep.sbatch")


OPEN_THE_STORE_TOGETHER = """
import sys, time
from pathlib import Path
from dfcvae_dist.tracking import get_or_create_experiment, mlflow_client

uri, barrier, me, count = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
(barrier / me).touch()
while len(list(barrier.iterdir())) < count:  # every process imported, then all at once
    time.sleep(0.002)
print(get_or_create_experiment(mlflow_client(uri), "together"))
"""


def test_processes_that_open_a_new_sqlite_store_together_all_succeed(tmp_path):
    """Sweep tasks and array tasks starting at once build clients of one new store: each client creates or migrates
    its schema, and without turns one of them died in MLflow's migration ("table ... already exists")."""
    uri, barrier = f"sqlite:///{tmp_path}/store/mlflow.db", tmp_path / "barrier"
    barrier.mkdir()
    with ProcessGroups() as groups:
        procs = [groups.popen([sys.executable, "-c", OPEN_THE_STORE_TOGETHER, uri, barrier, i, 3], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
        results = [(p.wait(120), *p.communicate()) for p in procs]
    assert [code for code, _, _ in results] == [0] * 3, [err[-2000:] for _, _, err in results]
    assert len({out.strip() for _, out, _ in results}) == 1  # one experiment, whoever created it


def test_a_launch_of_a_task_that_loses_its_run_directory_to_a_sibling_says_running_elsewhere(tmp_path, shard_dir):
    """A sibling (this test process) takes the task's run directory after the task checked it was free and before its
    trainer starts (the task's launcher waits for that): the task ends with exit status 0, saying it runs elsewhere,
    not "training stopped ... run again"."""
    path = write_sweep(tmp_path, shard_dir, name="sibling")
    run_dir, ready, go = tmp_path / "runs" / TINY_TASKS[0], tmp_path / "launching", tmp_path / "go"
    launcher = f"sh -c 'touch {ready}; until [ -e {go} ]; do sleep 0.05; done; exec \"$0\" \"$@\"' {sys.executable}"
    sibling = RunLock(run_dir)
    with ProcessGroups() as groups:
        task = groups.popen([sys.executable, ROOT / "tools" / "sweep.py", "task", path, 0, "--launcher", launcher],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: ready.exists() or task.poll() is not None, 120, "the task to launch its trainer")
        sibling.acquire()
        try:
            go.touch()
            out, err = task.communicate(timeout=120)
        finally:
            sibling.release()
    assert task.returncode == 0, err[-3000:]
    assert out.strip().splitlines()[-1].startswith(f"task 0 {TINY_TASKS[0]}: running elsewhere ({run_dir} is in use "
                                                   f"by host ") and f"pid {os.getpid()}" in out
    assert "training stopped" not in err


@pytest.mark.parametrize("runs, grid, message", [
    ("  a: {loss.beta: 1.0}\n  b: {}\n  a: {loss.beta: 2.0}\n", "  train.seed: [0, 1]\n",
     "line 7: 'runs.a' is written twice (first at line 5)"),
    ("  a: {loss.beta: 1.0, loss.beta: 2.0}\n", "  train.seed: [0, 1]\n",
     "line 5: 'runs.a.loss.beta' is written twice (first at line 5)"),
    ("  a: {}\n", "  train.seed: [0, 1]\n  loss.beta: [1.0]\n  train.seed: [2]\n",
     "line 9: 'grid.train.seed' is written twice (first at line 7)"),
    ("  a: {}\n", "  train.seed:\n    - 0\n    - 00\n",
     "line 9: grid 'train.seed': '00' reads as the same value as '0' (line 8): one task twice"),
    ("  a: {}\n", "  loss.beta: [0.5, 1, 1.0]\n", "line 7: grid 'loss.beta': '1.0' reads as the same value as '1' "
                                                  "(line 7): one task twice"),
], ids=["run-twice", "run-key-twice", "grid-key-twice", "seed-0-and-00", "beta-1-and-1.0"])
def test_a_sweep_file_that_would_drop_or_repeat_a_task_is_refused_naming_its_line(tmp_path, shard_dir, runs, grid,
                                                                                   message):
    path = tmp_path / "twice.yaml"
    path.write_text(f"name: twice\nbase: quickstart\noverrides: {{data.shards: {shard_dir}, log.enabled: false}}\n"
                    f"runs:\n{runs}grid:\n{grid}evaluate: {{shards: {shard_dir}}}\n")
    from dfcvae_dist.errors import UserError
    from dfcvae_dist.sweeps.plan import load_sweep

    with pytest.raises(UserError) as refused:
        load_sweep(path)
    assert str(refused.value) == f"{path}, {message}"
