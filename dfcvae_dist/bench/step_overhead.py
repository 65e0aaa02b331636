"""What our code makes each training step wait for, counted on a real multi-process run (any device).

- host syncs: the operations that would make a GPU's host wait for the device, seen by a TorchDispatchMode:
  `aten._local_scalar_dense` (`.item()`, `bool(t)`, `float(t)`) and `aten.nonzero`; plus `Tensor.tolist`,
  which the dispatcher does not see on CPU, counted by wrapping it. Not counted: Adam reading its step
  counters, which torch keeps on the host (unless capturable or fused), so that read never waits for a GPU.
- host-to-device copies: tensors made from host data during a step, which on a GPU are blocking copies from
  pageable memory (and make the host wait for the queued kernels): `aten.lift_fresh` (`torch.tensor(...)`,
  `torch.as_tensor` of Python numbers or lists, whatever the device, so the CPU counts them too) and copies from
  a CPU tensor to another device, except non-blocking ones from pinned memory (the loader's batches). Not
  counted: the host-side increment torch.optim makes for those host step counters.
- collectives: the torch.distributed calls made from Python. DDP's gradient all-reduce runs in C++ (its
  reducer) and is not among them; DDP's broadcast of BatchNorm buffers before each forward is Python, and is
  counted apart as `ddp_buffer_broadcasts`.

Every event is charged to the optimizer step in progress (from the call of `recipe.train_step(..., step)` to
the next), so a step's logging, checkpoint and agreement are its own. A "quiet" step neither logs, saves,
validates, logs images nor agrees on stop/non-finite state: it must show zero of each.

On a GPU, `--sync-debug` also runs every quiet step (from its call to the next) under
`torch.cuda.set_sync_debug_mode("error")`: any synchronising CUDA call, ours or a library's, fails the run.

    torchrun --nproc_per_node 2 -m dfcvae_dist.bench.step_overhead --out DIR [--sync-debug] --config quickstart k=v
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

HOST_SYNC_OPS = {torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero}
COPY_OPS = {torch.ops.aten._to_copy, torch.ops.aten.copy_}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "barrier", "monitored_barrier", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "gather", "gather_object", "scatter", "all_to_all", "send", "recv")


class StepCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.step = 0
        self.host_side: set[int] = set()  # ids of tensors that stay on the host on any device
        self.counts: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in HOST_SYNC_OPS and id(args[0]) not in self.host_side:
            self.counts[self.step]["host_syncs"] += 1
        elif host_to_device(func, args, kwargs):
            self.counts[self.step]["host_to_device_copies"] += 1
        return func(*args, **kwargs)

    def counting(self, kind: str, fn):
        def wrapper(*args, **kwargs):
            self.counts[self.step][kind] += 1
            return fn(*args, **kwargs)

        return wrapper

    @contextlib.contextmanager
    def active(self):
        patched = [(torch.Tensor, "tolist", "host_syncs"), (dist, "_broadcast_coalesced", "ddp_buffer_broadcasts")]
        patched += [(dist, name, "collectives") for name in COLLECTIVES]
        originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patched]
        for owner, name, kind in patched:
            setattr(owner, name, self.counting(kind, getattr(owner, name)))
        try:
            with self:
                yield self
        finally:
            for owner, name, original in originals:
                setattr(owner, name, original)


def host_to_device(func, args, kwargs) -> bool:
    """A tensor made from host data (any device), or a blocking copy from a CPU tensor to another device."""
    if func.overloadpacket is torch.ops.aten.lift_fresh:
        return not called_from("torch/optim/")
    if func.overloadpacket not in COPY_OPS:
        return False
    source = args[1] if func.overloadpacket is torch.ops.aten.copy_ else args[0]
    target = args[0].device if func.overloadpacket is torch.ops.aten.copy_ else kwargs.get("device") or source.device
    non_blocking = kwargs.get("non_blocking", len(args) > 2 and args[2])
    return (source.device.type == "cpu" and torch.device(target).type != "cpu"
            and not (non_blocking and source.is_pinned()))


def called_from(path_part: str) -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if path_part in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def quiet_steps(cfg, total: int) -> list[int]:
    """Steps (after the first, which warms up) on which the trainer neither logs, saves, validates nor agrees."""
    every = [cfg.log.every_steps, cfg.train.sync_every_steps, cfg.checkpoint.every_steps,
             cfg.log.image_every_steps, cfg.train.val_every_steps]
    return [s for s in range(2, total) if not any(e and s % e == 0 for e in every)]


def count_run(cfg, sync_debug: bool = False) -> dict:
    from dfcvae_dist.training.trainer import Trainer

    trainer = Trainer(cfg)
    counter = StepCounter()
    train_step = trainer.recipe.train_step
    quiet = set(quiet_steps(cfg, trainer.data.total_steps))

    def counted_step(micro_batches, step):
        counter.step = step
        counter.host_side = {id(state["step"]) for optimizer in trainer.recipe.optimizers
                             for state in optimizer.state.values() if "step" in state}
        if sync_debug:
            torch.cuda.set_sync_debug_mode("error" if step in quiet else "default")
        return train_step(micro_batches, step)

    trainer.recipe.train_step = counted_step
    try:
        with counter.active():
            trainer.fit()
    finally:
        if sync_debug:
            torch.cuda.set_sync_debug_mode("default")
    total = trainer.data.total_steps
    return {"per_step": {s: dict(counter.counts[s]) for s in range(1, total + 1)}, "sync_debug": sync_debug,
            "quiet_steps": quiet_steps(cfg, total), "sync_every_steps": cfg.train.sync_every_steps,
            "log_every_steps": cfg.log.every_steps, "world_size": trainer.accelerator.num_processes,
            "rank": trainer.accelerator.process_index}


def summary(profile: dict) -> dict:
    """The figures the bench reports: the worst quiet step, and what a logging/agreeing step costs."""
    per_step, quiet = profile["per_step"], profile["quiet_steps"]

    def worst(kind: str, steps) -> int:
        return max((per_step[s].get(kind, 0) for s in steps), default=0)

    sync_steps = [s for s in per_step if s % profile["sync_every_steps"] == 0]
    return {"host_syncs": worst("host_syncs", quiet), "collectives": worst("collectives", quiet),
            "host_to_device_copies": worst("host_to_device_copies", quiet),
            "ddp_buffer_broadcasts": worst("ddp_buffer_broadcasts", quiet), "quiet_steps": quiet,
            "sync_debug": profile["sync_debug"],
            "sync_step_collectives": worst("collectives", sync_steps), "world_size": profile["world_size"],
            "note": "our code on a step that neither logs nor checkpoints; DDP's gradient all-reduce (C++) not "
                    "counted, its BatchNorm buffer broadcast counted apart"}


def measure(shard_dir: Path, work: Path, image_size: int = 32, nproc: int = 2, steps: int = 10,
            sync_debug: bool = False, overrides: tuple[str, ...] = ()) -> dict:
    """A real `nproc`-process run under torchrun (CPU here, the GPU where there is one); rank 0's summary.
    `sync_debug`: quiet steps under CUDA's sync debug mode "error" (a GPU only); `overrides` go last."""
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", str(nproc), "-m",
           "dfcvae_dist.bench.step_overhead", "--out", str(work / "step-overhead"),
           *(["--sync-debug"] if sync_debug else []), "--config", "quickstart",
           f"data.shards={shard_dir}", f"train.run_dir={work / 'step-overhead-run'}", f"train.max_steps={steps}",
           f"model.image_size={image_size}", "train.batch_size=8", "log.every_steps=5", "train.sync_every_steps=6",
           "checkpoint.every_steps=0", "log.image_every_steps=0", "train.val_every_steps=0", "log.enabled=false",
           "train.resume=none", "data.num_workers=1", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"step-overhead run failed:\n{proc.stderr[-3000:]}")
    profile = json.loads((work / "step-overhead" / "rank-0.json").read_text())
    profile["per_step"] = {int(s): c for s, c in profile["per_step"].items()}
    return {**summary(profile), "per_step": profile["per_step"]}


def main(argv: list[str] | None = None) -> int:
    from dfcvae_dist.config import load_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sync-debug", action="store_true", help="quiet steps under CUDA's sync debug mode 'error'")
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    profile = count_run(load_config(args.config, args.overrides), args.sync_debug)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank-{profile['rank']}.json").write_text(json.dumps(profile, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
