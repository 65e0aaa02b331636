"""The run directory contract, and the one way this project writes a file atomically.

    RUN_DIR/
      config.yaml                      the resolved config of the newest launch
      RESUME_ME.json | COMPLETED.json  how the newest launch ended (read by slurm/train.sbatch)
      ranks/rank-N.json                per-rank parameter digest and first-epoch shards
      checkpoints/latest               the name of the newest complete checkpoint
      checkpoints/step-NNNNNNNN/       trainer_state.json, weights.safetensors, config.yaml, accelerate's files

Nothing here imports accelerate, DeepSpeed or MLflow: serving code reads run directories too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Iterator

from dfcvae_dist.errors import UserError

CONFIG_FILE = "config.yaml"
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "weights.safetensors"
RESUME_MARKER = "RESUME_ME.json"  # stopped early at a checkpoint: resume me
DONE_MARKER = "COMPLETED.json"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write to; on success it is fsynced and renamed to `path`, on any
    failure removed. A reader therefore sees the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: str | bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)


def write_end_marker(run_dir: Path, stopped_early: bool, summary: dict) -> None:
    """Leave exactly one of RESUME_ME.json / COMPLETED.json."""
    keep, drop = (RESUME_MARKER, DONE_MARKER) if stopped_early else (DONE_MARKER, RESUME_MARKER)
    atomic_write(Path(run_dir) / keep, json.dumps(summary, indent=1))
    (Path(run_dir) / drop).unlink(missing_ok=True)


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    if not Path(directory).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(directory).iterdir() if (m := STEP_DIR.match(p.name)) and
             (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """`auto`: the run's newest complete checkpoint (`latest`, or the highest step when `latest` is missing
    or names an incomplete one; None if there is none); `none`; or a checkpoint or run directory path."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if path.is_dir() and not (path / STATE_FILE).exists() and (path / CHECKPOINTS).is_dir():
            path = find_checkpoint(path, "auto")
        if path is None or not (Path(path) / STATE_FILE).is_file():
            raise UserError(f"train.resume: {resume} is not a complete checkpoint (no {STATE_FILE})")
        return Path(path)
    directory = Path(run_dir) / CHECKPOINTS
    latest = directory / LATEST
    if latest.is_file():
        named = directory / latest.read_text().strip()
        if (named / STATE_FILE).is_file():
            return named
    found = complete_checkpoints(directory)
    return found[-1] if found else None
