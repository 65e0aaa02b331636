"""Checkpointer: `RUN_DIR/checkpoints/step-NNNNNNNN/`, written whole or not at all.

Every rank writes its part with `accelerator.save_state` into `.tmp-step-N/`; the main process adds the
trainer state (JSON, no pickle), the consolidated model weights (safetensors, loadable without
accelerate) and the resolved config, renames the folder to `step-N` (atomic), then points `latest` at it
(also written to a temporary name and renamed) and prunes all but the newest `keep`. A folder under a
final name is therefore always complete, and `latest` never names a half-written one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from dfcvae_dist.distributed import any_rank
from dfcvae_dist.errors import UserError

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.yaml"
STEP_DIR = re.compile(r"^step-(\d+)$")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_DIR.match(p.name)) and
             (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """`auto`: the newest complete checkpoint of the run (None if there is none); `none`; or a path."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if path.is_dir() and not (path / STATE_FILE).exists() and (path / "checkpoints").is_dir():
            path = find_checkpoint(path, "auto")  # a run directory
        if path is None or not (Path(path) / STATE_FILE).is_file():
            raise UserError(f"train.resume: {resume} is not a complete checkpoint (no {STATE_FILE})")
        return Path(path)
    directory = Path(run_dir) / "checkpoints"
    latest = directory / "latest"
    if latest.is_file():
        named = directory / latest.read_text().strip()
        if (named / STATE_FILE).is_file():
            return named
    found = complete_checkpoints(directory)
    return found[-1] if found else None


def read_trainer_state(checkpoint: Path) -> dict:
    try:
        return json.loads((Path(checkpoint) / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{checkpoint / STATE_FILE}: unreadable trainer state ({err})") from None


class Checkpointer:
    """Save and prune checkpoints of one run; every rank calls `save`, the main process finishes it."""

    def __init__(self, run_dir: Path, keep: int, accelerator):
        self.directory = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.accelerator = accelerator

    def save(self, step: int, trainer_state: dict, model_state: dict[str, torch.Tensor], config_text: str) -> Path:
        acc = self.accelerator
        final = self.directory / f"step-{step:08d}"
        tmp = self.directory / f".tmp-step-{step:08d}"
        if acc.is_main_process:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        error = None
        try:
            acc.save_state(str(tmp))
            if acc.is_main_process:
                save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(tmp / WEIGHTS_FILE))
                (tmp / CONFIG_FILE).write_text(config_text)
                _atomic_write(tmp / STATE_FILE, json.dumps(trainer_state, indent=1))
        except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
            error = err
        failed = any_rank(acc, error is not None)
        if failed:
            reason = _reason(error, self.directory) if error is not None else "failed on another rank"
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            latest = find_checkpoint(self.directory.parent, "auto")
            raise UserError(f"writing checkpoint {final} failed on rank {acc.process_index} ({reason}); "
                            f"the previous checkpoint {latest} is intact")
        if acc.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _atomic_write(self.directory / "latest", final.name + "\n")
            for old in complete_checkpoints(self.directory)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final


def _reason(error: Exception, directory: Path) -> str:
    """A one-line cause. torch.save reports a full disk only as an 'unexpected pos' enforce failure, so
    the free space of the checkpoint's filesystem is measured (before the partial folder is removed)."""
    free = shutil.disk_usage(directory).free
    if (isinstance(error, OSError) and error.errno == 28) or free < 64 * 2**20:
        return f"No space left on device: {free / 2**20:.1f} MiB free on {directory}"
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno)
    return str(error).splitlines()[0] if str(error) else type(error).__name__
