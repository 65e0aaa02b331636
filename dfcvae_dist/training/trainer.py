"""The trainer. `Trainer(cfg)` sets up its parts (accelerator, data, recipe, checkpointer, state, tracker);
`fit()` is the loop, top to bottom. Which model is trained is the recipe's business, when to save (and which
checkpoint is the best) is the checkpointer's, and the counters a resume needs live in `TrainerState`.

It is the Python API (`from dfcvae_dist import Trainer`, docs/python-api.md) and what `dfcvae-train` runs: in
the calling process, alone or as one rank under `accelerate launch` / `torchrun`."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import itertools
import json
import os
import pickle
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from accelerate.utils import broadcast_object_list, set_seed
from rich.console import Console

from dfcvae_dist.config import Config, load_config, resume_changes
from dfcvae_dist.data.cache import CachedTrainSplit
from dfcvae_dist.data.loader import (SplitSource, TrainStream, auto_workers, batches_per_epoch, make_loader,
                                     model_input, resolve_split)
from dfcvae_dist.distributed import cpus_available, local_processes, make_accelerator, release, set_determinism
from dfcvae_dist.data.shards import MANIFEST, manifest_digest, manifest_of
from dfcvae_dist.errors import UserError, message, one_line
from dfcvae_dist.families import get_family
from dfcvae_dist.quiet import held_back
from dfcvae_dist.rundir import (CONFIG_FILE, DONE_MARKER, RESUME_MARKER, RunLock, atomic_write, best_checkpoint,
                                find_checkpoint, write_end_marker)
from dfcvae_dist.training.checkpoint import Checkpointer
from dfcvae_dist.training.progress import ProgressReporter
from dfcvae_dist.training.recipes import LossHealth, StepResult, current_lr, set_lr
from dfcvae_dist.training.run_page import (dataset_inputs, family_params, fixed_batch, labelled_rows,
                                           model_card, run_description)
from dfcvae_dist.training.state import TrainerState
from dfcvae_dist.training.tracking import Tracker, code_version


class StopRequested(BaseException):
    """A stop signal where the trainer stops at once (`StopFlag.interrupting`); not an Exception, so that no
    library's error handling swallows it."""


class StopFlag:
    """Set by SIGTERM/SIGINT (what torchrun and accelerate forward to ranks; a notebook's interrupt) while a
    `Trainer` sets up or a `fit()` runs; ranks agree on it at sync steps. Inside `interrupting()` a stop request,
    already there or arriving, raises StopRequested instead, which also ends a read blocked on a hung
    filesystem. `restore()` gives the signals back to their earlier handlers. Off the main thread, where
    Python cannot take signals, it stays unset."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested, self.raising, self.signal = False, False, ""
        self.earlier = {}
        if threading.current_thread() is threading.main_thread():
            self.earlier = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        self.requested, self.signal = True, signal.Signals(signum).name
        if self.raising:
            self.raising = False
            raise StopRequested(self.signal)

    @contextlib.contextmanager
    def interrupting(self) -> Iterator[None]:
        try:
            self.raising = True
            if self.requested:
                raise StopRequested(self.signal)
            yield
        finally:
            self.raising = False

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside `interrupting()`: what must not be cut off in the middle; a stop request raises after it."""
        raising, self.raising = self.raising, False
        try:
            yield
        finally:
            self.raising = raising
        if raising and self.requested:
            raise StopRequested(self.signal)

    def restore(self) -> None:
        for sig, handler in self.earlier.items():
            signal.signal(sig, handler)
        self.earlier = {}


@dataclass
class TrainData:
    """The training split as whole optimizer steps, the same number on every rank; the val split if used."""

    stream: TrainStream
    num_workers: int
    grad_accum: int
    batches_per_epoch: int  # micro-batches per rank
    total_steps: int
    global_batch: int
    val: SplitSource | None
    cache: CachedTrainSplit | None = None
    workers_note: str = ""  # data.num_workers=auto capped by the shards

    @classmethod
    def from_config(cls, cfg: Config, rank: int, world: int, validates: bool, device: torch.device) -> "TrainData":
        data, train = cfg.data, cfg.train
        source = resolve_split(data.shards, "train", data.num_samples)
        check_image_size(data.shards, cfg.model.image_size)
        per_epoch = batches_per_epoch(source.num_samples, train.batch_size, world, train.grad_accum)
        workers, note = data.num_workers, ""
        if workers == "auto":
            workers, note = auto_workers(cpus_available(), local_processes(), len(source.urls), world)
        stream = TrainStream(source, train.batch_size, per_epoch, rank, world, workers, train.seed,
                             data.shuffle_buffer, data.skip_corrupt)
        cache = None
        if data.cache != "none":
            cache = CachedTrainSplit(stream, data.cache, device, cfg.model.image_size, workers, local_processes())
        total = train.max_steps or train.epochs * per_epoch // train.grad_accum
        val = None
        if train.val_every_steps and validates:
            val = resolve_split(data.shards, "val", val_pattern=data.val_shards)
            if not val.urls or (Path(data.shards).is_dir() and val.num_samples == 0):
                raise UserError(f"the val split of {data.shards} is empty; set train.val_every_steps=0 or "
                                "write shards with a val partition")
        return cls(stream, workers, train.grad_accum, per_epoch, total, train.batch_size * world * train.grad_accum,
                   val, cache, note)

    @property
    def steps_per_epoch(self) -> int:
        return self.batches_per_epoch // self.grad_accum

    def use_workers(self, workers: int) -> None:
        """Read with `workers` workers (a resumed run: the count its checkpoint recorded, which decides the order)."""
        self.stream.set_workers(workers)
        self.num_workers, self.workers_note = workers, ""

    def steps(self, epoch: int, start_batch: int, device, memory_format) -> Iterator[tuple[list[torch.Tensor], int]]:
        """The rest of `epoch` from micro-batch `start_batch`: per optimizer step, its `grad_accum` micro-batches
        and the number of damaged samples passed over to fill them."""
        if self.cache is not None:
            self.cache.set_position(epoch, start_batch)
            loader = self.cache
        else:
            self.stream.set_position(epoch, start_batch)
            loader = make_loader(self.stream, self.num_workers, pin_memory=torch.device(device).type == "cuda")
        batches = ((model_input(b["image"], device, memory_format), b["skipped"]) for b in loader)
        for group in iter(lambda: list(itertools.islice(batches, self.grad_accum)), []):
            yield [images for images, _ in group], sum(skipped for _, skipped in group)


class Trainer:
    """`Trainer(cfg).fit()` trains as `cfg` says: it takes the run directory, resumes from its newest checkpoint
    (`train.resume`), and returns the summary that COMPLETED.json / RESUME_ME.json also holds. A Trainer trains
    once; a new one on the same config resumes."""

    def __init__(self, cfg: Config):
        self.cfg, self.family = cfg, get_family(cfg.model.name)
        train = cfg.train
        set_determinism(train.deterministic)
        self.accelerator = acc = make_accelerator(train.mixed_precision, train.grad_accum, train.collective_timeout_s,
                                                  train.threads)
        self.console = Console(stderr=True, quiet=not acc.is_main_process, soft_wrap=True)  # no breaks in paths
        self.run_dir = Path(train.run_dir)
        self.lock = RunLock(self.run_dir, train.lock_stale_s)
        self.hold_run_dir()
        self.tracker: Tracker | None = None
        self.progress: ProgressReporter | None = None
        self.fitted = False
        self.stop = StopFlag()  # a stop request ends setup at once
        try:
            with self.stop.interrupting():
                self.set_up()
        except StopRequested:
            self.abandon("KILLED")
            raise UserError(f"stopped by {self.stop.signal} while setting up, before the first step of this launch; "
                            f"{self.run_dir / RESUME_MARKER} says where to resume") from None
        except BaseException:
            self.abandon()
            raise
        finally:
            self.stop.restore()

    def set_up(self) -> None:
        """Everything after the run directory is ours: data, recipe, checkpointer, state, tracker."""
        cfg, train, acc = self.cfg, self.cfg.train, self.accelerator
        set_seed(train.seed)
        self.memory_format = torch.channels_last if train.channels_last else torch.contiguous_format
        self.data = TrainData.from_config(cfg, acc.process_index, acc.num_processes, self.family.validates, acc.device)
        self.health = LossHealth(acc, train.on_nonfinite)
        with held_back("dfcvae_dist.losses.feature_networks"):  # random weights: said once, in start_tracking
            self.recipe = self.family.build_recipe(cfg, acc, self.health, self.memory_format)
        best = next((m for m in self.family.metrics(cfg) if m.name == cfg.checkpoint.keep_best), None)
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint.every_steps, cfg.checkpoint.keep,
                                         self.data.total_steps, acc, best, guard=self.lock.check)
        self.changed: list[tuple[str, object, object]] = []  # resume-safe keys changed since the checkpoint
        self.resumed_from: tuple[Path, str | None] | None = None  # another run directory's checkpoint, its MLflow run
        self.state = self.resume()
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / DONE_MARKER).unlink(missing_ok=True)  # an earlier launch's: this one is not done yet
            atomic_write(self.run_dir / CONFIG_FILE, cfg.to_yaml())
        self.start_tracking()
        self.fixed_z = torch.randn(16, cfg.model.latent_dim, generator=torch.Generator().manual_seed(1234))
        self.fixed_images = None  # the same faces at every image step, read once (DCGAN reconstructs nothing)
        if self.tracker.logging and self.family.encodes:
            with torch.random.fork_rng(devices=[]):  # a DataLoader draws its base seed from the global generator
                self.fixed_images = fixed_batch(cfg)
        self.images_logged_at = -1
        self.last_losses: dict[str, tuple[int, float]] = {}  # name: (step, value) as last logged, for the summary
        self.overflows = None  # fp16 steps a fused optimizer skipped, counted on the device (`settle_overflows`)
        self.compile_s = None  # the first step of this launch under train.compile, until it is logged
        self.launched = (time.perf_counter(), self.state.wall_time_s)
        self.describe()

    def abandon(self, status: str = "FAILED") -> None:
        """After an error (FAILED) or a stop request during setup (KILLED, and RESUME_ME.json naming the newest
        checkpoint, so that a preempted Slurm job is requeued): the tracked run ends so, and the run directory and
        accelerate are free for the next launch (also in this process)."""
        if status == "KILLED" and self.accelerator.is_main_process and self.lock.held:
            self.lock.check()
            state = getattr(self, "state", None)
            write_end_marker(self.run_dir, True, {
                "step": state.step if state else None, "stopped_early": True, "reason": "stop_requested",
                "mlflow_run_id": state.mlflow_run_id if state else None,
                "checkpoint": str(find_checkpoint(self.run_dir, "auto"))})
        if self.tracker is not None:
            self.tracker.end(status)  # as it really ended, within log.flush_timeout_s
        self.lock.release()
        if self.accelerator.num_processes == 1:  # ranks that may still wait in a collective keep their group
            release(self.accelerator)

    def fit(self) -> dict:
        """Train to the last step, an early stop or a stop signal (SIGTERM/SIGINT: a checkpoint, then RESUME_ME.json);
        the summary. An error ends the tracked run as FAILED, frees the run directory and is raised."""
        if self.fitted:
            raise UserError(f"this Trainer has trained {self.run_dir} already: make a new one (it resumes)")
        self.fitted, self.stop = True, StopFlag()
        try:
            return self.loop()
        except BaseException:
            self.abandon()
            raise
        finally:
            self.stop.restore()
            if self.progress is not None:
                self.progress.stop()  # a notebook keeps no live bar behind an error

    def loop(self) -> dict:
        s, data, acc = self.state, self.data, self.accelerator
        self.progress = ProgressReporter(self.console, data.total_steps, data.steps_per_epoch, s.step,
                                         data.global_batch, self.cfg.log.progress_every_s, acc.is_main_process)
        if s.step == 0:  # the image history starts with the untrained model, so the UI's cards open on content
            self.log_images()
        stopping, early = False, self.patience_exhausted()  # a resumed run that had stopped early stays stopped
        while s.step < data.total_steps and not (stopping or early):
            set_lr(self.recipe.optimizers, self.cfg.optim.lr * self.cfg.optim.lr_decay_per_epoch ** s.epoch)
            try:
                for micro_batches, damaged in self.batches(data.steps(s.epoch, s.batch_in_epoch, acc.device,
                                                                      self.memory_format)):
                    train_step = self.recipe.train_step if self.compile_s is not None else self.timed_first_step
                    result = train_step(micro_batches, s.step + 1)
                    s.advance(result.skipped, damaged)  # only the first epoch of a launch may start mid-way
                    if result.overflow is not None:
                        self.overflows = result.overflow.int() + (0 if self.overflows is None else self.overflows)
                    self.log_step(result)
                    if data.val is not None and s.step % self.cfg.train.val_every_steps == 0:
                        early = self.validate()
                    if s.step % self.cfg.train.sync_every_steps == 0 or self.checkpointer.due(s.step):
                        stopping = self.health.agree(self.stop.requested)  # the step's only collective (with logging)
                    if (stopping or self.checkpointer.due(s.step)) and not early:  # an early stop saves in finish()
                        self.save()
                    if stopping or early or s.step == data.total_steps:
                        break
            except StopRequested:  # one process, waiting for its next batch: it stops after its last whole step
                stopping = True
        self.progress.stop()
        reason = "early_stop" if early else "stop_requested" if stopping and s.step < data.total_steps else "completed"
        return self.finish(reason)

    def batches(self, steps: Iterator) -> Iterator:
        """`steps`; in a one-process run a stop request ends the wait for the next one at once (a hung read, or a
        long search for good samples) with StopRequested. Several ranks wait for the agreed step instead: the
        others may already be inside the next step's collectives, which a rank leaving now would hang."""
        if self.accelerator.num_processes > 1:
            yield from steps
            return
        while True:
            with self.stop.interrupting():
                item = next(steps, None)
            if item is None:
                return
            yield item

    def validate(self) -> bool:
        """The validation loss, logged and shown to the checkpointer; True when early stopping's patience ran out."""
        train = self.cfg.train
        metrics = {"val/total": self.recipe.validation_loss(self.data.val, train.batch_size, train.val_batches,
                                                            self.cfg.data.skip_corrupt)}
        self.tracker.log_metrics(metrics, self.state.step)
        self.last_losses["val/total"] = (self.state.step, metrics["val/total"])
        self.checkpointer.validated(self.state, metrics)
        return self.patience_exhausted()

    def patience_exhausted(self) -> bool:
        patience = self.cfg.train.early_stop_patience
        return patience is not None and self.state.validations_since_best >= patience

    def timed_first_step(self, micro_batches: list[torch.Tensor], step: int) -> StepResult:
        """The launch's first step; under train.compile it compiles, and its time is said and logged."""
        started = time.perf_counter()
        result = self.recipe.train_step(micro_batches, step)
        self.compile_s = 0.0
        if self.recipe.compiled != "off":
            self.compile_s = time.perf_counter() - started
            self.console.print(f"train.compile={self.recipe.compiled}: the first step took {self.compile_s:.1f} s "
                               "(compiling)")
        return result

    def settle_overflows(self) -> None:
        """Add the fp16 overflow steps counted on the device to the skipped steps (a host sync: at log steps,
        checkpoints and the end only)."""
        if self.overflows is not None:
            self.state.skipped_steps += int(self.overflows.item())
            self.overflows = None

    def log_step(self, result: StepResult) -> None:
        s, log = self.state, self.cfg.log
        self.progress.step_done(s.step)
        logs = s.step % log.every_steps == 0 or s.step == self.data.total_steps
        if result.skipped or (logs and result.overflow is not None and bool(result.overflow)):
            return
        if logs:
            self.settle_overflows()
            names = list(result.metrics)
            values = self.accelerator.reduce(torch.stack([result.metrics[n].float() for n in names]), reduction="mean")
            metrics = {f"train/{n}": v for n, v in zip(names, values.tolist(), strict=True)}
            if self.cfg.data.skip_corrupt:
                metrics["train/skipped_samples"] = self.skipped_samples_all_ranks()
            metrics.update({"train/lr": current_lr(self.recipe.optimizers[0]), "train/epoch": s.epoch,
                            "train/img_per_s": self.progress.img_per_s_since_last_log(s.step),
                            "train/skipped_steps": s.skipped_steps})
            if self.compile_s:
                metrics["train/compile_s"], self.compile_s = self.compile_s, 0.0
            self.tracker.log_metrics(metrics, s.step)
            self.last_losses["train/total"] = (s.step, metrics["train/total"])
            self.progress.logged(s.step, metrics["train/total"], metrics["train/img_per_s"])
        if log.image_every_steps and s.step % log.image_every_steps == 0:
            self.log_images()

    def save(self, final: bool = False) -> Path:
        """Every rank; the checkpoint's state holds the damaged samples of all ranks (the main one resumes with them).
        `final`: the run's last checkpoint (also at the last step), logged as its final model."""
        self.settle_overflows()
        state = dataclasses.replace(self.state, wall_time_s=self.wall_time_s())
        state.skipped_samples = self.skipped_samples_all_ranks()
        checkpoint = self.checkpointer.save(state, self.recipe.weights(), self.recipe.model_config, self.cfg.to_yaml())
        self.tracker.checkpointed()
        self.tracker.log_model(checkpoint, state.step, final or state.step == self.data.total_steps, self.cfg.log.model)
        return checkpoint

    def finish(self, reason: str) -> dict:
        """`reason`: completed (every step), early_stop (COMPLETED.json too) or stop_requested (RESUME_ME.json)."""
        s, acc = self.state, self.accelerator
        stopped_early = reason == "stop_requested"
        if self.checkpointer.last_saved != s.step:
            self.health.agree(self.stop.requested)
            self.save(final=not stopped_early)
        self.settle_overflows()
        damaged = self.skipped_samples_all_ranks()
        summary = {"step": s.step, "total_steps": self.data.total_steps, "stopped_early": stopped_early,
                   "reason": reason, **self.best_summary(),
                   "mlflow_run_id": s.mlflow_run_id, "checkpoint": str(find_checkpoint(self.run_dir, "auto")),
                   "feature_weights": s.feature_weights, "skipped_steps": s.skipped_steps,
                   "skipped_samples": damaged,
                   "img_per_s": self.progress.img_per_s(s.step), "wall_time_s": round(self.wall_time_s(), 3),
                   "config_digest": s.config_digest}
        self.lock.check()
        record_rank(self.run_dir, acc.process_index, self.recipe.module, self.data.stream)
        if acc.is_main_process:  # before any final tracking call: a hung server must not cost the marker
            write_end_marker(self.run_dir, stopped_early, summary)
        acc.wait_for_everyone()  # the last collective: the tracker's flush below may take log.flush_timeout_s
        if self.images_logged_at != s.step:
            self.log_images()
        self.tracker.end("KILLED" if stopped_early else "FINISHED")
        for line in end_of_run_lines(summary, s, self.last_losses, self.tracker.run_page()):
            self.console.print(line, markup=False, highlight=False)
        release(acc)
        self.lock.release()
        return summary

    def best_summary(self) -> dict:
        """With checkpoint.keep_best: the metric, its best value, that step and its checkpoint."""
        s = self.state
        if self.checkpointer.best is None:
            return {}
        return {"best_metric": s.best_metric, "best_value": s.best_value, "best_step": s.best_step,
                "best_checkpoint": str(best_checkpoint(self.run_dir)),
                "validations_since_best": s.validations_since_best}

    def skipped_samples_all_ranks(self) -> int:
        """Damaged samples passed over, summed over ranks (a collective: every rank calls it)."""
        acc = self.accelerator
        return int(acc.reduce(torch.tensor(self.state.skipped_samples, device=acc.device), reduction="sum").item())

    def wall_time_s(self) -> float:
        started, before = self.launched
        return before + time.perf_counter() - started

    def hold_run_dir(self) -> None:
        """The main process takes the run directory's lock before anything reads or writes there; every
        rank learns the outcome, so a second launch on a busy directory stops at once on all of them. The other
        ranks then follow the lock, so that all of them stop at once if another launch takes it over."""
        token = on_main_then_all(self.accelerator, self.lock.acquire)
        if not self.accelerator.is_main_process:
            self.lock.follow(token)

    def resume(self) -> TrainerState:
        """The state to start from: fresh, or that of the checkpoint the main process picked, loaded on every rank."""
        acc, cfg = self.accelerator, self.cfg
        network = self.recipe.feature_network
        state = TrainerState(batches_per_epoch=self.data.batches_per_epoch, grad_accum=cfg.train.grad_accum,
                             model=cfg.model.name, world_size=acc.num_processes, config_digest=cfg.digest(),
                             feature_weights=network.weights_source if network is not None else "none",
                             precision=acc.mixed_precision, best_metric=cfg.checkpoint.keep_best or "",
                             data_digest=data_digest(cfg.data.shards), num_workers=self.data.num_workers)
        choice = on_main_then_all(acc, lambda: str(find_checkpoint(self.run_dir, cfg.train.resume) or ""))
        if not choice:
            return state
        checkpoint = Path(choice)
        saved = TrainerState.read(checkpoint)
        saved_cfg = load_config(checkpoint / CONFIG_FILE)
        saved.precision = saved.precision or saved_cfg.train.mixed_precision  # older checkpoints: in their config
        if saved.num_workers is None:  # older checkpoints: in their config
            saved.num_workers = saved_cfg.data.num_workers
        refuse_incompatible(checkpoint, saved, state)
        self.changed = self.compare_config(checkpoint, saved_cfg)
        refuse_other_data(checkpoint, saved, state, cfg, self.console)
        self.resume_workers(checkpoint, saved.num_workers)
        saved.num_workers = self.data.num_workers
        try:  # accelerate loads with weights_only=True: a file that would run code is refused, not executed
            acc.load_state(str(checkpoint))
        except (pickle.UnpicklingError, RuntimeError, OSError) as err:
            raise UserError(f"{checkpoint}: checkpoint refused or unreadable ({one_line(err, 300)})") from None
        saved.config_digest, saved.feature_weights = state.config_digest, state.feature_weights
        saved.data_digest = state.data_digest
        if checkpoint.resolve().parent.parent != self.run_dir.resolve():  # another run's: a new MLflow run
            self.resumed_from, saved.mlflow_run_id = (checkpoint, saved.mlflow_run_id), None
        if saved.best_metric != state.best_metric:  # checkpoint.keep_best changed: its best starts anew
            saved.best_metric, saved.best_value, saved.best_step, saved.validations_since_best = \
                state.best_metric, None, 0, 0
        saved.skipped_samples = saved.skipped_samples if acc.is_main_process else 0  # a sum over ranks
        if self.resumed_from is None:  # a new run directory has no checkpoint yet, even at the last step
            self.checkpointer.last_saved = saved.step
        self.console.print(f"resumed from {checkpoint} at step {saved.step}")
        return saved

    def resume_workers(self, checkpoint: Path, recorded: int) -> None:
        """Each worker reads its own shards, so a resumed run reads with the worker count its checkpoint recorded:
        data.num_workers=auto keeps it; another explicit count is refused unless train.resume_allow_changes names
        data.num_workers."""
        cfg, resolved = self.cfg, self.data.num_workers
        if self.data.cache is not None or max(1, recorded) == max(1, resolved):  # 0 workers: the order of 1
            return
        if cfg.data.num_workers == "auto":
            self.console.print(f"resume: data.num_workers=auto keeps the checkpoint's {recorded} worker(s) (it would "
                               f"pick {resolved} here): the count decides the sample order")
            self.data.use_workers(recorded)
        elif "data.num_workers" not in cfg.train.resume_allow_changes:
            raise UserError(f"{checkpoint}: trained with {recorded} loader worker(s) per rank, this launch asks for "
                            f"{resolved} (data.num_workers={cfg.data.num_workers}): the count decides the sample "
                            f"order; resume with data.num_workers=auto or ={recorded}, or take responsibility with "
                            "train.resume_allow_changes=[data.num_workers]")

    def compare_config(self, checkpoint: Path, saved: Config) -> list[tuple[str, object, object]]:
        """Refuse a resume whose config changes the model, the optimisation or the data position; return the
        resume-safe changes (and those the user took responsibility for with train.resume_allow_changes)."""
        safe, refused = resume_changes(saved, self.cfg)
        if refused:
            listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in refused)
            raise UserError(f"{checkpoint}: this launch changes what the checkpoint was trained with ({listed}); "
                            "resume with the checkpoint's values, start a new run (another train.run_dir or "
                            "train.resume=none), or take responsibility with train.resume_allow_changes=[KEY, ...]")
        for key, old, new in safe:
            self.console.print(f"resume: {key} changed from {old!r} to {new!r}")
        return safe

    def start_tracking(self) -> None:
        """The tracker; a new MLflow run gets its params, config and data, every launch its tags."""
        cfg, s, acc = self.cfg, self.state, self.accelerator
        with self.stop.deferred():  # a run half created could not be ended: a stop waits until it exists
            self.tracker = tracker = Tracker(cfg, acc, s.mlflow_run_id, resumed_step=s.step, guard=self.lock.check)
        manifest = manifest_of(cfg.data.shards) if tracker.active else None
        if not s.mlflow_run_id:
            tracker.log_params(family_params(cfg))
            tracker.log_text(cfg.to_yaml(), "config.yaml")
            tracker.log_inputs(dataset_inputs(cfg.data.shards, manifest))
        s.mlflow_run_id = tracker.run_id or s.mlflow_run_id
        if tracker.active:
            self.console.print(f"MLflow: run {tracker.run_id} in {tracker.client.tracking_uri}; artifacts in "
                               f"{tracker.artifact_uri}")
        tracker.model_card = model_card(cfg, s.feature_weights, manifest, tracker.run_name)
        tracker.set_tags({"mlflow.note.content": run_description(cfg, s.feature_weights, manifest),
                          "world_size": acc.num_processes, "precision": acc.mixed_precision,
                          **feature_network_tags(self.recipe.feature_network), "code_version": code_version(),
                          "distributed_type": str(acc.distributed_type), **slurm_tags(),
                          **{f"resume.step{s.step}.{key}": f"{old!r} -> {new!r}" for key, old, new in self.changed},
                          **resumed_from_tags(self.resumed_from)})
        if s.feature_weights.startswith("random"):
            self.console.print(f"[bold yellow]WARNING: the {cfg.loss.network} loss network has RANDOM weights: not the "
                               "paper's loss[/]")

    def describe(self) -> None:
        cfg, data, world = self.cfg, self.data, self.accelerator.num_processes
        for note in (f"data: {data.num_workers} loader worker(s) per rank (data.num_workers={cfg.data.num_workers})",
                     data.workers_note, data.cache.describe() if data.cache else ""):
            if note:
                self.console.print(note)
        self.console.print(f"[bold]{self.family.title}[/] world size {world}, global batch {data.global_batch} = "
                           f"{cfg.train.batch_size} per rank x {world} ranks x {cfg.train.grad_accum} accumulation; "
                           f"{data.steps_per_epoch} steps per epoch, {data.total_steps} steps; precision "
                           f"{self.accelerator.mixed_precision}")

    def log_images(self) -> None:
        """The fixed batch above its reconstructions, and samples of the fixed z: one entry per image step of
        the keys `reconstructions` and `samples`. Decoded in eval mode from the mean of z, so no training
        random stream is drawn from (a resumed run stays bit-exact)."""
        if not self.tracker.logging:
            return
        step = self.images_logged_at = self.state.step
        if self.fixed_images is not None:
            rows = [("input", self.fixed_images), ("reconstruction", self.recipe.reconstruct(self.fixed_images))]
            title = f"Step {step}: fixed faces above their reconstructions (decoded from the mean of q(z|x))"
            self.tracker.log_image(labelled_rows(rows, title), "reconstructions", step)
        samples = self.recipe.decode(self.fixed_z)  # a fixed z: no random stream is drawn from
        rows = [("z 1–8", samples[:8]), ("z 9–16", samples[8:])]
        self.tracker.log_image(labelled_rows(rows, f"Step {step}: samples of 16 fixed z ~ N(0, I)"), "samples", step)


def end_of_run_lines(summary: dict, state: TrainerState, losses: dict[str, tuple[int, float]],
                     run_page: str | None) -> list[str]:
    """A run's last lines: how far it got, its final losses, speed and wall time, where its checkpoint and
    its MLflow page are."""
    epochs = f"{state.step * state.grad_accum / state.batches_per_epoch:.2f}".rstrip("0").rstrip(".")  # completed
    img_per_s = "n/a" if summary["img_per_s"] is None else f"{summary['img_per_s']:.0f}"
    wall = datetime.timedelta(seconds=round(summary["wall_time_s"]))
    ended = {"completed": "finished", "early_stop": "stopped early (train.early_stop_patience) at",
             "stop_requested": "stopped at"}[summary["reason"]]
    lines = [f"{ended} step {state.step} of {summary['total_steps']} ({epochs} epoch{'' if epochs == '1' else 's'}), "
             f"{img_per_s} img/s, wall time {wall} (all launches)"]
    if losses:
        lines.append("final losses: " + ", ".join(f"{name} {value:.4g} (step {step})"
                                                  for name, (step, value) in losses.items()))
    best = f"; best {summary['best_checkpoint']}" if "best_checkpoint" in summary else ""
    lines.append(f"checkpoint: {summary['checkpoint']}{best}")
    if run_page:
        lines.append(f"MLflow run page: {run_page}")
    return lines


def on_main_then_all(accelerator, fn):
    """`fn()` on the main process, its result (or its error, as one line) on every rank."""
    outcome = [None]
    if accelerator.is_main_process:
        try:
            outcome = [("ok", fn())]
        except Exception as err:  # noqa: BLE001 - any error must reach the other ranks, not leave them waiting
            outcome = [("error", message(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}")]
    broadcast_object_list(outcome, from_process=0)
    kind, value = outcome[0]
    if kind == "error":
        raise UserError(value)
    return value


def refuse_incompatible(checkpoint: Path, saved: TrainerState, now: TrainerState) -> None:
    """A checkpoint whose data position or model cannot carry over to this launch."""
    if saved.world_size != now.world_size:
        raise UserError(f"{checkpoint}: saved with world size {saved.world_size}, now {now.world_size}; the data "
                        "position cannot be carried over: resume with the same number of processes, or start a "
                        "new run (train.resume=none, another train.run_dir)")
    if saved.model != now.model:
        raise UserError(f"{checkpoint}: a {saved.model} checkpoint, but model.name={now.model}")
    if saved.precision != now.precision:
        raise UserError(f"{checkpoint}: trained in precision {saved.precision}, this launch resolves {now.precision}: "
                        f"resume with --mixed_precision {saved.precision} "
                        f"(or train.mixed_precision={saved.precision}), or start a new run")
    if (saved.batches_per_epoch, saved.grad_accum) != (now.batches_per_epoch, now.grad_accum):
        raise UserError(f"{checkpoint}: saved with {saved.batches_per_epoch} micro-batches per rank and epoch in "
                        f"steps of {saved.grad_accum}, now {now.batches_per_epoch} in steps of {now.grad_accum}; the "
                        "data position cannot be carried over: resume with the same train.batch_size, "
                        "train.grad_accum and data")


def data_digest(shards: str) -> str:
    """The digest of the data `data.shards` names (its manifest's shards and their sha256); "" for a URL pattern."""
    manifest = manifest_of(shards)
    return manifest_digest(manifest) if manifest else ""


def refuse_other_data(checkpoint: Path, saved: TrainerState, now: TrainerState, cfg: Config,
                      console: Console) -> None:
    """The same data.shards path with other contents (written again, other images) would resume on other data
    without a word: the checkpoint keeps the manifest's digest (older checkpoints have none)."""
    if not saved.data_digest or not now.data_digest or saved.data_digest == now.data_digest:
        return
    change = (f"{cfg.data.shards} holds other shards than the checkpoint trained on (manifest digest "
              f"{saved.data_digest}, now {now.data_digest})")
    if "data.shards" not in cfg.train.resume_allow_changes:
        raise UserError(f"{checkpoint}: {change}; resume on the data it trained on, start a new run (another "
                        "train.run_dir or train.resume=none), or take responsibility with "
                        "train.resume_allow_changes=[data.shards]")
    console.print(f"resume: {change}")


def check_image_size(shards: str, image_size: int) -> None:
    """Shards of one size and a model of another would fail deep in the first step: say so before it."""
    manifest = manifest_of(shards)
    size = manifest.get("image_size") if manifest else None
    if size is not None and size != image_size:
        raise UserError(f"{Path(shards) / MANIFEST}: the shards hold {size}x{size} images, but "
                        f"model.image_size={image_size}: set model.image_size={size}, or write shards with "
                        f"--image-size {image_size}")


def feature_network_tags(network) -> dict:
    """The loss network a run trained with, as MLflow tags (none for a family without one)."""
    if network is None:
        return {"feature_network": "none"}
    return {"feature_network": network.network, "feature_network_dtype": str(network.dtype),
            "feature_network_weights": network.weights_source,
            "feature_network_random": network.weights_source.startswith("random")}


def resumed_from_tags(resumed_from: tuple[Path, str | None] | None) -> dict:
    """A run started from another run directory's checkpoint names it, and that run's MLflow run."""
    if resumed_from is None:
        return {}
    checkpoint, run_id = resumed_from
    return {"resumed_from": str(checkpoint), **({"resumed_from_run_id": run_id} if run_id else {})}


def slurm_tags() -> dict:
    names = {"SLURM_JOB_ID": "slurm.job_id", "SLURM_RESTART_COUNT": "slurm.restart_count",
             "SLURM_JOB_NODELIST": "slurm.nodelist", "SLURM_NNODES": "slurm.nnodes"}
    return {tag: os.environ[var] for var, tag in names.items() if var in os.environ}


def record_rank(run_dir: Path, rank: int, module: torch.nn.Module, stream: TrainStream) -> None:
    """`ranks/rank-N.json`: a digest of this rank's parameters (equal on every rank under DDP) and its
    shards of the first epoch (disjoint across ranks)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.named_parameters()):  # not BN running stats: those are per rank
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    (run_dir / "ranks").mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "ranks" / f"rank-{rank}.json", json.dumps(
        {"rank": rank, "params_sha256": digest.hexdigest(), "first_epoch_shards": stream.rank_shards(0)}))

