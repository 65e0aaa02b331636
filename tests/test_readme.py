"""The README's commands work in the order it gives them: every fenced command of its "Two commands" and "Launch"
sections, read from README.md (so this cannot go stale), runs after what `make quickstart` leaves behind, on tiny
data and 2 steps. A command that needs what this machine has not (GPUs, Slurm, hours) is skipped with its reason;
a command that matches neither is a failure, so a new one is never left unchecked by accident."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, ProcessGroups

pytestmark = pytest.mark.slow

SECTIONS = ("## Two commands", "## Launch")
TINY = ["train.max_steps=2", "train.batch_size=8", "train.val_every_steps=0", "log.image_every_steps=0",
        "checkpoint.every_steps=2", "log.system_metrics=false"]  # appended to every training command
SKIPPED = {  # a part of the command: why the command is not run here
    "make test": "the test suite itself",
    "--mixed_precision bf16": "8 GPUs in bf16",
    "sbatch": "a Slurm cluster with GPUs (tests/test_slurm.py submits the same scripts to a private CPU cluster)",
    "mlflow ui": "a server that runs until stopped",
    "dfcvae-sweep run": "the paper's comparison on real CelebA: hours of GPU time (make reproduce runs it on CPU)",
}
QUICKSTART = "make quickstart"  # 20-50 minutes: here, what it leaves that the later commands meet
TRAINING = ("dfcvae-train", "dfcvae_dist.train")


def readme_commands(text: str) -> list[str]:
    """The fenced bash commands of SECTIONS in order, continuation lines joined, comments dropped."""
    commands = []
    for section in re.split(r"^(?=## )", text, flags=re.M):
        if not section.startswith(SECTIONS):
            continue
        for block in re.findall(r"^```bash\n(.*?)^```", section, flags=re.M | re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words:
                    commands.append(shlex.join(words))
    return commands


def test_readme_commands_are_parsed_from_both_sections():
    commands = readme_commands((ROOT / "README.md").read_text())
    assert commands[:2] == [QUICKSTART, "make test"]
    assert any(c.startswith(".venv/bin/dfcvae-train --config quickstart") for c in commands)
    assert any(c.startswith("dfcvae-report --sweep") for c in commands)  # the last subsection of Launch


def clone(tmp_path: Path, shard_dir: Path) -> Path:
    """A checkout as a user has it after `make quickstart`, minus its 20-50 minutes: the repository's files,
    the environment as .venv, tiny shards where the quickstart writes its own."""
    work = tmp_path / "clone"
    work.mkdir()
    for name in ("configs", "dfcvae_dist", "slurm", "sweeps", "tools", "Makefile", "README.md"):
        (work / name).symlink_to(ROOT / name)
    (work / ".venv").symlink_to(Path(sys.executable).parent.parent)
    (work / "quickstart" / "shards").mkdir(parents=True)
    (work / "quickstart" / "shards" / "landmarks-32").symlink_to(shard_dir)
    return work


def quickstart_training(work: Path) -> str:
    """The quickstart's first training command, as `make -n` expands it (2 processes into quickstart/runs/dfcvae)."""
    dry = subprocess.run(["make", "-n", "quickstart", "STAMP="], cwd=work, capture_output=True, text=True, check=True)
    return next(line for line in dry.stdout.replace("\\\n", " ").splitlines() if "dfcvae_dist.train" in line)


def on_this_machine(command: str) -> str:
    """`dfcvae-x` as the README writes it bare (an activated environment): this environment's."""
    first = command.split()[0]
    return f".venv/bin/{command}" if first.startswith("dfcvae-") else command


def test_readme_commands_run_in_order_after_the_quickstart(tmp_path, shard_dir):
    work = clone(tmp_path, shard_dir)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the README sets none
    ran, skipped = [], []
    with ProcessGroups() as groups:
        def run(command: str, refusal: str | None = None) -> None:
            """`command` succeeds; or, with `refusal`, ends with that one line and exit status 2."""
            start = time.monotonic()
            proc = groups.run(["bash", "-c", command], 300, cwd=work, env=env)
            detail = f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
            if refusal is None:
                assert proc.returncode == 0, detail
            else:
                assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(refusal), detail
            ran.append(f"{command}  ({time.monotonic() - start:.0f} s)")

        quickstart_run = work / "quickstart" / "runs" / "dfcvae" / "COMPLETED.json"
        for command in readme_commands((work / "README.md").read_text()):
            reason = next((why for part, why in SKIPPED.items() if part in command), None)
            if reason:
                skipped.append(f"{command}: {reason}")
            elif command == QUICKSTART:
                # untracked: what matters to the commands after it is its run directory, not its MLflow store
                run(shlex.join([*shlex.split(quickstart_training(work)), *TINY, "log.enabled=false"]))
                quickstart_state = quickstart_run.read_text()
            elif any(program in command for program in TRAINING):
                run(f"{on_this_machine(command)} {shlex.join(TINY)}")
            elif command.startswith("dfcvae-sweep plan"):
                run(on_this_machine(command))
            elif command.startswith("dfcvae-report"):  # the sweep it reports on is skipped above: nothing ran
                run(on_this_machine(command), refusal="error: nothing to report: no finished run (runs/paper/")
            else:
                pytest.fail(f"README command neither run nor skipped here: add it to this test: {command}")
    assert json.loads(quickstart_state)["step"] == 2
    assert quickstart_run.read_text() == quickstart_state  # no later command resumed into it
    assert (work / "mlflow.db").is_file()  # the README's runs logged to MLflow's default store
    trained = sorted(p.parent.name for p in (work / "runs").glob("*/COMPLETED.json"))
    assert trained == ["first-try", "torchrun", "two-processes"]
    assert len(ran) == 6 and len(skipped) == 8, (ran, skipped)
    print("\n".join(["ran:", *ran, "skipped:", *skipped]))
