"""Where a sweep task stands: finished, running, incomplete or not started; read from its run directory only."""

from __future__ import annotations

import json
from pathlib import Path

from dfcvae_dist.config import load_config, resume_changes
from dfcvae_dist.families import get_family
from dfcvae_dist.errors import UserError
from dfcvae_dist.rundir import CONFIG_FILE, DONE_MARKER, RunLock
from dfcvae_dist.sweeps.plan import Task

# Resume-safe keys that still decide how far a run trains: a change means the resumed run trains on.
TRAINING_LENGTH = {"train.epochs", "train.max_steps"}


EVALUATED = "EVALUATED.json"  # RUN_DIR/eval/: written by the sweep once every evaluation step, logging included, ran


def evaluation_files(task: Task) -> list[Path]:
    """What a finished task's evaluation steps leave (RUN_DIR/eval/...): its family's steps."""
    files = {"extract": Path("latents/latents.npz"), "svm": Path("svm/svm_report.json"),
             "quality": Path("quality/quality.json")}
    return [task.run_dir / "eval" / files[name] for name in get_family(task.family).evaluations]


def is_trained(task: Task) -> bool:
    """The run wrote COMPLETED.json at its last step for this task's config.

    The run's config.yaml is compared the way a resume would compare it (the sweep also gives every run its
    parent run and tags, which a digest would count): no change a resume refuses, and no change of the training
    length.
    A launch rewrites config.yaml at its start, so a COMPLETED.json older than it is that of an earlier launch."""
    done, saved = task.run_dir / DONE_MARKER, task.run_dir / CONFIG_FILE
    if not done.is_file() or not saved.is_file() or done.stat().st_mtime < saved.stat().st_mtime:
        return False
    summary = read_json(done)
    safe, refused = resume_changes(load_config(saved), task.config)
    return (not refused and not TRAINING_LENGTH & {key for key, _, _ in safe}
            and summary.get("total_steps") is not None and summary.get("step") == summary["total_steps"])


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable ({err})") from None


def is_evaluated(task: Task) -> bool:
    """The sweep's evaluation marker, newer than the training it evaluates (written only after every step,
    MLflow logging included, succeeded), and every output it names."""
    trained_at = (task.run_dir / DONE_MARKER).stat().st_mtime
    marker = task.run_dir / "eval" / EVALUATED
    return (marker.is_file() and marker.stat().st_mtime >= trained_at
            and all(f.is_file() and f.stat().st_mtime >= trained_at for f in evaluation_files(task)))


def live_owner(run_dir: Path) -> dict | None:
    return RunLock(run_dir).live_owner()


def task_status(task: Task) -> str:
    """`finished`, `running` (a live owner holds its run directory), `incomplete` or `not started`; a damaged
    COMPLETED.json or config.yaml is `incomplete (...)` naming the file."""
    try:
        if is_trained(task) and is_evaluated(task):
            return "finished"
    except UserError as err:
        return f"incomplete ({err})"
    if live_owner(task.run_dir):
        return "running"
    return "incomplete" if task.run_dir.exists() else "not started"


def skipped_line(task: Task, status: str) -> str:
    """Why a finished or running task is not run: one line (a running one names who holds its run directory)."""
    if status == "finished":
        return f"task {task.index} {task.name}: finished, skipped"
    owner = live_owner(task.run_dir) or {}
    job = f", Slurm job {owner['slurm_job_id']}" if owner.get("slurm_job_id") else ""
    return (f"task {task.index} {task.name}: running elsewhere ({task.run_dir} is in use by host {owner.get('host')}, "
            f"pid {owner.get('pid')}{job}): not started again")
