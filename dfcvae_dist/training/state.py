"""`TrainerState`: the trainer's own counters, the only state a checkpoint keeps outside the model,
optimizers and RNGs (which accelerate saves). Stored as `trainer_state.json`: JSON, never a pickle."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from dfcvae_dist.errors import UserError
from dfcvae_dist.rundir import STATE_FILE


RENAMED = {"vgg_weights": "feature_weights"}


@dataclass
class TrainerState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed on each rank
    batches_per_epoch: int = 1  # micro-batches per rank and epoch
    grad_accum: int = 1
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss
    skipped_samples: int = 0  # damaged samples this rank passed over (data.skip_corrupt)
    model: str = ""
    mlflow_run_id: str | None = None
    world_size: int = 1
    config_digest: str = ""
    data_digest: str = ""  # the training data's manifest digest (data.shards a manifest directory; else "")
    feature_weights: str = "none"  # the loss network's weights: imagenet, random(seed=N), file:PATH; none without one
    precision: str = ""  # the resolved mixed precision (no, fp16, bf16); "" in checkpoints that kept it in their config
    num_workers: int | None = None  # loader workers per rank, which decide the sample order; None: in the config
    wall_time_s: float = 0.0  # seconds of training, over every launch, up to `step` (work lost to a kill not counted)
    best_metric: str = ""  # checkpoint.keep_best when best_value was recorded
    best_value: float | None = None  # its best value so far, at validation step `best_step`
    best_step: int = 0
    validations_since_best: int = 0  # validations in a row that did not better it (train.early_stop_patience)

    def advance(self, skipped: bool, skipped_samples: int = 0) -> None:
        """One optimizer step done: `grad_accum` micro-batches further; a full epoch rolls over to the next."""
        self.step += 1
        self.skipped_steps += int(skipped)
        self.skipped_samples += skipped_samples
        self.epoch, self.batch_in_epoch = divmod(self.step * self.grad_accum, self.batches_per_epoch)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_dict(cls, raw: dict) -> "TrainerState":
        """Also reads the state files of earlier versions, which kept `micro_batches` instead of the position, and
        `vgg_weights` for `feature_weights`."""
        raw = {RENAMED.get(k, k): v for k, v in raw.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in raw.items() if k in known})
        if "batch_in_epoch" not in raw and "micro_batches" in raw:
            state.grad_accum = max(1, raw["micro_batches"] // max(1, raw["step"]))
            state.epoch, state.batch_in_epoch = divmod(raw["micro_batches"], state.batches_per_epoch)
        return state

    @classmethod
    def read(cls, checkpoint: Path) -> "TrainerState":
        path = Path(checkpoint) / STATE_FILE
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as err:
            raise UserError(f"{path}: unreadable trainer state ({err})") from None
