"""Checkpointer: `RUN_DIR/checkpoints/step-NNNNNNNN/`, written whole or not at all.

Every rank writes its part with `accelerator.save_state` into `.tmp-step-N/`; the main process adds the
trainer state (JSON, no pickle), the consolidated model weights (safetensors with the model config in its
metadata, loadable without accelerate) and the resolved config, renames the folder to `step-N` (atomic),
then points `latest` at it (and `best` at the best validated one, with `checkpoint.keep_best`) and prunes all
but the newest `keep` and the best. A folder under a final name is therefore always complete, and neither
pointer ever names a half-written one. `guard` (the run lock's check) is called before each of these stages:
a launch whose run directory was taken over writes no further.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save as safetensors_bytes

from dfcvae_dist.distributed import any_rank
from dfcvae_dist.errors import UserError, one_line
from dfcvae_dist.metrics import Metric
from dfcvae_dist.rundir import (BEST, CHECKPOINTS, CONFIG_FILE, LATEST, STATE_FILE, WEIGHTS_FILE, atomic_write,
                                complete_checkpoints, disk_full, find_checkpoint, step_dir_name)
from dfcvae_dist.training.state import TrainerState


def weights_bytes(weights: dict[str, torch.Tensor], model_config: dict) -> bytes:
    """safetensors with `format: pt` and the model config, so the file alone rebuilds the model."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    return safetensors_bytes(tensors, metadata={"format": "pt", "model": json.dumps(model_config)})


class Checkpointer:
    """Decides when the run saves (`due`: every `every_steps`, at the last step, and at a validated step that
    betters the `best` metric) and saves (`save`); every rank calls `save`, the main process finishes it."""

    def __init__(self, run_dir: Path, every_steps: int, keep: int, last_step: int, accelerator,
                 best: Metric | None = None, guard: Callable[[], None] = lambda: None):
        self.directory = Path(run_dir) / CHECKPOINTS
        self.every_steps, self.keep, self.last_step = every_steps, keep, last_step
        self.accelerator, self.guard = accelerator, guard
        self.best = best
        self.last_saved: int | None = None
        self.new_best_at: int | None = None

    def due(self, step: int) -> bool:
        return step in (self.last_step, self.new_best_at) or bool(self.every_steps and step % self.every_steps == 0)

    def validated(self, state: TrainerState, metrics: dict[str, float]) -> None:
        """A validation at `state.step`: a value that betters the best (strictly) is saved at this step and
        becomes the best; any other (a non-finite one too) is one more validation without improvement. The same
        on every rank: validation values are reduced over ranks."""
        if self.best is None:
            return
        value = metrics[self.best.name]
        if math.isfinite(value) and (state.best_value is None or self.betters(value, state.best_value)):
            state.best_value, state.best_step, state.validations_since_best = value, state.step, 0
            self.new_best_at = state.step
        else:
            state.validations_since_best += 1

    def betters(self, value: float, best: float) -> bool:
        return value > best if self.best.higher_is_better else value < best

    def save(self, state: TrainerState, weights: dict[str, torch.Tensor], model_config: dict,
             config_text: str) -> Path:
        acc = self.accelerator
        final = self.directory / step_dir_name(state.step)
        tmp = self.directory / f".tmp-{final.name}"
        self.guard()
        if acc.is_main_process:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        error = None
        try:
            acc.save_state(str(tmp))
            if acc.is_main_process:
                atomic_write(tmp / WEIGHTS_FILE, weights_bytes(weights, model_config))
                atomic_write(tmp / CONFIG_FILE, config_text)
                atomic_write(tmp / STATE_FILE, state.to_json())
        except (OSError, RuntimeError, UserError) as err:  # torch.save reports a full disk as a RuntimeError
            error = err
        if any_rank(acc, error is not None):
            self._fail(final, tmp, error)
        if acc.is_main_process:
            self.guard()
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write(self.directory / LATEST, final.name + "\n")
            best = self.point_at_best(state)
            for old in complete_checkpoints(self.directory)[: -self.keep]:
                if old != best:
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        self.last_saved = state.step
        return final

    def point_at_best(self, state: TrainerState) -> Path | None:
        """`best` names the checkpoint of the state's best step (rewritten at every save, so a kill between a
        checkpoint and its pointer is mended by the next save); that checkpoint, or None."""
        if self.best is None or not state.best_step:
            return None
        best = self.directory / step_dir_name(state.best_step)
        if not (best / STATE_FILE).is_file():
            return None
        atomic_write(self.directory / BEST, best.name + "\n")
        return best

    def _fail(self, final: Path, tmp: Path, error: Exception | None) -> None:
        reason = _reason(error, self.directory) if error is not None else "failed on another rank"
        self.guard()  # the folder may be another launch's now
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        latest = find_checkpoint(self.directory.parent, "auto")
        raise UserError(f"writing checkpoint {final} failed on rank {self.accelerator.process_index} ({reason}); "
                        f"the previous checkpoint {latest} is intact")


def _reason(error: Exception, directory: Path) -> str:
    """A one-line cause. torch.save reports a full disk only as an 'unexpected pos' enforce failure, so
    the free space of the checkpoint's filesystem is measured (before the partial folder is removed)."""
    if (isinstance(error, OSError) and error.errno == 28) or shutil.disk_usage(directory).free < 64 * 2**20:
        return disk_full(directory)
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno)
    return one_line(error)
