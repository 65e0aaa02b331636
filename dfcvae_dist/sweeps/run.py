"""Run sweep tasks: train (resuming from any checkpoint), then evaluate into RUN_DIR/eval/{latents,svm,quality}.

The trainer runs as a subprocess (`python -m dfcvae_dist.train`, or under a launcher such as `accelerate
launch`); the evaluations are library calls in the task's process, logging into the task's MLflow run through
a client of the sweep's tracking store. A signal stops a task like any CLI; run again, it resumes training
from its checkpoint and evaluates again.
On Slurm, slurm/sweep.sbatch launches the training itself (on every node, with preemption and requeue) and
calls `train_args` and `evaluate` through `dfcvae-sweep task`.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

from dfcvae_dist.errors import UserError, message
from dfcvae_dist.rundir import DONE_MARKER, RunLock, atomic_write
from dfcvae_dist.sweeps.parent import child_overrides, ensure_parent, set_parent_status
from dfcvae_dist.sweeps.plan import EvaluateConfig, Sweep, Task, check_evaluation_data
from dfcvae_dist.sweeps.status import EVALUATED, is_trained, live_owner, skipped_line, task_status
from dfcvae_dist.families import get_family
from dfcvae_dist.tracking import mlflow_client

Step = tuple[str, Callable[[], str]]  # (name, the call: it returns the line to print)


class RunningElsewhere(UserError):
    """The task's run directory is held by a live process (another launch of the same task)."""


def train_args(sweep: Sweep, task: Task, record: dict | None) -> list[str]:
    """The trainer's arguments after `-m dfcvae_dist.train`: the task's config, as a child of the parent run."""
    return ["--config", str(sweep.base), *task.overrides, *child_overrides(sweep, task.index, record)]


def evaluation_steps(sweep: Sweep, task: Task, record: dict | None) -> list[Step]:
    """The family's evaluation steps (extract -> SVMs -> quality; a family without an encoder: quality only), the
    last two logged into the task's MLflow run (when the sweep and the task are tracked)."""
    ev, out = sweep.evaluate, task.run_dir / "eval"
    run_id = mlflow_run_id(task) if record else None
    client = mlflow_client(record["tracking_uri"]) if run_id else None
    steps = {"extract": functools.partial(extract_step, ev, task, out / "latents"),
             "svm": functools.partial(svm_step, ev, out / "latents" / "latents.npz", out / "svm", run_id, client),
             "quality": functools.partial(quality_step, ev, task, out / "quality", run_id, client)}
    return [(name, steps[name]) for name in get_family(task.family).evaluations]


def extract_step(ev: EvaluateConfig, task: Task, out: Path) -> str:
    from dfcvae_dist.extraction.latents import extract_latents  # torch: not for planning

    done = extract_latents(Path(ev.shards), out, task.run_dir, batch_size=ev.batch_size)
    return f"wrote {done.path} ({done.images} images)"


def svm_step(ev: EvaluateConfig, latents: Path, out: Path, run_id: str | None, client) -> str:
    from dfcvae_dist.evaluation.svm import REPORT_FILE, evaluate_svms

    report = evaluate_svms(latents, out, ev.svm_subsample, class_weight=ev.svm_class_weight, focus=ev.svm_focus,
                           run_id=run_id, client=client)
    return f"wrote {out / REPORT_FILE} (mean accuracy {report['mean_accuracy']:.4f})"


def quality_step(ev: EvaluateConfig, task: Task, out: Path, run_id: str | None, client) -> str:
    from dfcvae_dist.evaluation.quality import QUALITY_FILE, QualityOptions, evaluate_quality

    opts = QualityOptions(Path(ev.quality_shards or ev.shards), ev.split, ev.max_images, ev.network_weights,
                          Path(ev.fid_weights) if ev.fid_weights else None, ev.fid_samples or 0, network=ev.network)
    evaluate_quality({task.name: str(task.run_dir)}, opts, out, {task.name: run_id} if run_id else None, client)
    return f"wrote {out / QUALITY_FILE}"


def mlflow_run_id(task: Task) -> str | None:
    done = task.run_dir / DONE_MARKER
    return json.loads(done.read_text()).get("mlflow_run_id") if done.is_file() else None


def evaluate(sweep: Sweep, task: Task, record: dict | None) -> None:
    """Evaluate a trained task in this process, holding its run directory's lock: a second evaluation of it
    stops at once. A signal ends it like any CLI; a re-run evaluates again."""
    lock = RunLock(task.run_dir)
    try:
        lock.acquire()
    except UserError:
        raise RunningElsewhere(skipped_line(task, "running")) from None
    try:
        steps = evaluation_steps(sweep, task, record)
        for name, step in steps:
            print(f"task {task.index} {task.name}: {name}", flush=True)
            try:
                print(f"task {task.index} {task.name}: {step()}", flush=True)
            except UserError as err:
                raise UserError(f"task {task.index} {task.name}: {name}: {message(err)}") from None
        # only now: an output written before its MLflow logging failed must not count as evaluated
        atomic_write(task.run_dir / "eval" / EVALUATED, json.dumps({"steps": [name for name, _ in steps]}))
    finally:
        lock.release()


def run_task(sweep: Sweep, index: int, launcher: Sequence[str] = (sys.executable,)) -> str:
    """Train (a subprocess, resuming from any checkpoint) and evaluate one task unless it is finished or
    running; its status at the end."""
    task, status = sweep.task(index), task_status(sweep.task(index))
    if status in ("finished", "running"):
        print(skipped_line(task, status), flush=True)
        return status
    record = start_task(sweep)
    if not is_trained(task):
        print(f"task {index} {task.name}: training in {task.run_dir}", flush=True)
        code = subprocess.run([*launcher, "-m", "dfcvae_dist.train", *train_args(sweep, task, record)]).returncode
        if not is_trained(task) and live_owner(task.run_dir):  # a sibling took the run directory first
            print(skipped_line(task, "running"), flush=True)
            return "running"
        if not is_trained(task):
            raise UserError(f"task {index} {task.name}: training stopped (exit status {code}) before the end of "
                            f"{task.run_dir}; run the task again to resume")
    try:
        evaluate(sweep, task, record)
    except RunningElsewhere as line:  # a sibling trained it and is evaluating it
        print(line, flush=True)
        return "running"
    print(f"task {index} {task.name}: finished", flush=True)
    close_parent_if_done(sweep, record)
    return "finished"


def train_args_if_needed(sweep: Sweep, index: int) -> list[str] | None:
    """(slurm/sweep.sbatch, which launches the trainer itself) None if the task is finished or running (its line
    printed), else the trainer's arguments: none when only the evaluations are missing."""
    task, status = sweep.task(index), task_status(sweep.task(index))
    if status in ("finished", "running"):
        print(skipped_line(task, status), flush=True)
        return None
    record = start_task(sweep)
    return [] if is_trained(task) else train_args(sweep, task, record)


def start_task(sweep: Sweep) -> dict | None:
    """The parent run's record, the parent RUNNING again (a task of the sweep is under way)."""
    check_evaluation_data(sweep)
    record = ensure_parent(sweep)
    set_parent_status(record, finished=False)
    return record


def evaluate_trained(sweep: Sweep, index: int) -> None:
    """(slurm/sweep.sbatch) Evaluate a task whose training has finished."""
    task, record = sweep.task(index), ensure_parent(sweep)
    if not is_trained(task):
        raise UserError(f"task {index} {task.name}: {task.run_dir} has not finished training for this task's config")
    try:
        evaluate(sweep, task, record)
    except RunningElsewhere as line:  # a sibling array task is evaluating it
        print(line, flush=True)
        return
    print(f"task {index} {task.name}: finished", flush=True)
    close_parent_if_done(sweep, record)


def close_parent_if_done(sweep: Sweep, record: dict | None) -> None:
    if all(task_status(t) == "finished" for t in sweep.tasks):
        set_parent_status(record, finished=True)


def run_sweep(sweep: Sweep, indices: Sequence[int], parallel: int = 1, launcher: str | None = None) -> int:
    """The workstation path: each unfinished task of `indices` as its own `dfcvae-sweep task` process,
    `parallel` at a time (each one's output in SWEEP_DIR/logs/TASK.log when more than one runs); the number
    of tasks that failed."""
    record = ensure_parent(sweep)  # once, before the tasks race for it
    logs = sweep.sweep_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    def one(index: int) -> int:
        task = sweep.tasks[index]
        if task_status(task) == "finished":  # without starting a process for it
            print(skipped_line(task, "finished"), flush=True)
            return 0
        cmd = [sys.executable, "-m", "dfcvae_dist.cli.sweep", "task", str(sweep.path), str(index),
               *(["--launcher", launcher] if launcher else [])]
        if parallel == 1:
            return subprocess.run(cmd).returncode
        with open(logs / f"{task.name}.log", "a") as log:
            print(f"task {index} {task.name}: started (log: {log.name})", flush=True)
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        print(f"task {index} {task.name}: {task_status(task)}" + (f" (exit status {code}; log: {log.name})"
                                                                   if code else ""), flush=True)
        return code

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        failed = sum(code != 0 for code in pool.map(one, indices))
    close_parent_if_done(sweep, record)
    return failed
