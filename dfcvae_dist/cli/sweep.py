"""Sweeps: many runs from one YAML file (docs/sweeps.md).

    dfcvae-sweep plan sweeps/paper.yaml                 # check every task, print them and the sbatch line
    dfcvae-sweep run sweeps/paper.yaml --parallel 2     # a workstation: train and evaluate the unfinished tasks
    dfcvae-sweep task sweeps/paper.yaml 3               # one task (what each array task of slurm/sweep.sbatch does)
    SWEEP=sweeps/paper.yaml sbatch --array=0-11 -N 1 slurm/sweep.sbatch
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys

from dfcvae_dist.errors import UserError, cli_main
from dfcvae_dist.sweeps.plan import load_sweep
from dfcvae_dist.sweeps.run import evaluate_trained, run_sweep, run_task, train_args_if_needed
from dfcvae_dist.sweeps.status import task_status

NOTHING_TO_DO = 3  # `task --train-args`: the task is finished or running (its line is printed); the job ends


@cli_main
def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    sweep = load_sweep(args.sweep)  # every task checked before anything runs
    if args.command == "plan":
        for task in sweep.tasks:
            print(f"{task.index:>3}  {task.name}  {' '.join(shlex.quote(o) for o in task.overrides)}")
        print(f"SWEEP={shlex.quote(str(sweep.path))} sbatch --array=0-{len(sweep.tasks) - 1} slurm/sweep.sbatch")
        return 0
    if args.command == "run":
        if args.parallel < 1:
            raise UserError(f"--parallel {args.parallel}: must be at least 1")
        indices = parse_indices(args.tasks, len(sweep.tasks)) if args.tasks else range(len(sweep.tasks))
        failed = run_sweep(sweep, list(indices), args.parallel, args.launcher)
        print(f"sweep {sweep.name}: " + ", ".join(f"{t.name} {task_status(t)}" for t in sweep.tasks))
        return 1 if failed else 0
    if args.train_args:
        return print_train_args(sweep, args.index)
    if args.evaluate:
        evaluate_trained(sweep, args.index)
        return 0
    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable]
    return 0 if run_task(sweep, args.index, launcher) in ("finished", "running") else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dfcvae-sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("plan", help="check every task; print them and the sbatch line").add_argument("sweep")
    run = sub.add_parser("run", help="train and evaluate the unfinished tasks here, without Slurm")
    run.add_argument("sweep")
    run.add_argument("--parallel", type=int, default=1, help="tasks at a time (each task's log in SWEEP_DIR/logs)")
    run.add_argument("--tasks", help="only these task indices, e.g. 0,2,5-7")
    task = sub.add_parser("task", help="train and evaluate one task (each array task of slurm/sweep.sbatch)")
    task.add_argument("sweep")
    task.add_argument("index", type=int)
    stage = task.add_mutually_exclusive_group()
    stage.add_argument("--train-args", action="store_true", help="(slurm/sweep.sbatch) print the run directory and "
                       f"the trainer's arguments, NUL-separated; exit {NOTHING_TO_DO} if the task is finished or "
                       "running")
    stage.add_argument("--evaluate", action="store_true", help="(slurm/sweep.sbatch) evaluate the trained task")
    for p_ in (run, task):
        p_.add_argument("--launcher", help="training launcher instead of this python, e.g. "
                        "'accelerate launch --num_processes 2 --main_process_port 29640'")
    return p


def parse_indices(text: str, count: int) -> list[int]:
    indices = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        try:
            indices += range(int(first), int(last or first) + 1)
        except ValueError:
            raise UserError(f"--tasks {text}: expected indices like 0,2,5-7") from None
    bad = [i for i in indices if not 0 <= i < count]
    if bad:
        raise UserError(f"--tasks {text}: no task {bad[0]} (the sweep has tasks 0-{count - 1})")
    return indices


def print_train_args(sweep, index: int) -> int:
    """The run directory, then the trainer's arguments when it still has to train, NUL-separated: arguments
    reach the trainer whole, whatever they hold."""
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the arguments alone
        args = train_args_if_needed(sweep, index)
    if args is None:
        return NOTHING_TO_DO
    sys.stdout.write("".join(f"{a}\0" for a in [str(sweep.task(index).run_dir), *args]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
