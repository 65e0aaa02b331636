"""End to end: the real `Trainer` with a shipped config on npy shards on local disk, as a user runs it (tracking
off, so a machine without MLflow runs it too). Each run is a process of its own; its figure is the steady state
in img/s (loading, the step and the trainer's bookkeeping, over whole steps after a warm-up), with the start
(data, model, loss network), the first step (compilation, cuDNN autotuning) and the rest of the warm-up reported
apart.

    python -m dfcvae_dist.bench.end_to_end --out RESULT.json --warmup-steps 3 --config dfcvae-123 key=value ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from dfcvae_dist.errors import cli_main

CONFIGS = ("dfcvae-123", "dfcvae-345", "pvae")
# Overrides on a shipped config; a run is (config, variant). Data, so that a lever is one line here.
VARIANTS = {
    "default": [],  # the shipped config as it is (on CUDA: fp32 model, fp16 loss network, no compilation)
    "cache_memory": ["data.cache=memory"],
    "cache_device": ["data.cache=device"],
    "compile_step": ["train.compile=step"],
    "batch512_bf16": ["train.batch_size=512", "train.mixed_precision=bf16"],
}
# On CPU the trainer with a cache against the step alone (the trainer's bookkeeping should hide behind the step),
# and the streamed default beside it.
CPU_RUNS = [("dfcvae-123", "cache_memory"), ("dfcvae-123", "default"), ("dfcvae-345", "cache_memory"),
            ("pvae", "cache_memory")]
# In the order of what matters most: a run cut short by a time limit keeps the runs before it.
GPU_RUNS = [*(("dfcvae-123", v) for v in ("default", "compile_step", "cache_device", "batch512_bf16")),
            ("dfcvae-345", "default"), ("pvae", "default")]
# What every run sets on top of its config and variant: the bench's data, a fresh run, no tracking.
BENCH_OVERRIDES = ["loss.network_weights=random", "log.enabled=false", "train.resume=none", "train.val_every_steps=0"]


def run_name(config: str, variant: str) -> str:
    return f"{config}/{variant}"


def write_shards(celeba_dir: Path, out: Path, images: int, image_size: int, workers: int) -> Path:
    """npy shards of `images` samples: the synthetic faces of `celeba_dir` repeated under new keys (what a sample
    shows does not change the cost of reading it), in their splits."""
    from dfcvae_dist.data import shards

    names, samples = shards.celeba_samples(celeba_dir)
    repeated = [dataclasses.replace(samples[i % len(samples)], key=f"{i:07d}") for i in range(images)]
    shards.make_shards(names, repeated, out, shards.ShardSettings(image_size, "paper", "npy", 1000), workers=workers)
    return out


def total_steps(warmup_steps: int, steady_images: int, batch: int) -> int:
    """Steps of a run: the warm-up, then whole steps covering `steady_images` (at least 2), timed from the first
    steady step's start to the last one's start."""
    return warmup_steps + 1 + max(2, math.ceil(steady_images / batch))


def batch_size(overrides: list[str], default: int) -> int:
    sizes = [int(o.split("=", 1)[1]) for o in overrides if o.startswith("train.batch_size=")]
    return sizes[-1] if sizes else default


def run(config: str, variant: str, shards: Path, work: Path, batch: int, image_size: int, warmup_steps: int,
        steady_images: int, timeout_s: float = 1800) -> dict:
    """One run in a process of its own: its figures, or {"skipped": why} when the config refuses the variant (a
    key this version does not know) or {"failed": the end of its log}."""
    overrides = [*BENCH_OVERRIDES, f"data.shards={shards}", f"model.image_size={image_size}",
                 f"train.batch_size={batch}", *VARIANTS[variant]]
    steps = total_steps(warmup_steps, steady_images, batch_size(overrides, batch))
    out = work / f"e2e-{config}-{variant}.json"
    cmd = [sys.executable, "-m", "dfcvae_dist.bench.end_to_end", "--out", str(out), "--warmup-steps",
           str(warmup_steps), "--config", config, *overrides, f"train.max_steps={steps}",
           f"train.run_dir={work / f'e2e-{config}-{variant}'}"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work, timeout=timeout_s)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        if last[0].startswith("error:"):  # a UserError: one line
            return {"skipped": last[0]}
        return {"failed": proc.stderr[-3000:]}
    return {"variant": variant, "overrides": VARIANTS[variant], **json.loads(out.read_text()),
            "process_s": time.perf_counter() - started}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_fit(cfg, warmup_steps: int) -> dict:
    """Train as `cfg` says, timing step starts: the first, the second, the first steady one and the last one (the
    device synchronised at each, so that the steady window holds the work of its steps)."""
    from dfcvae_dist.training.trainer import Trainer

    started = time.perf_counter()
    trainer = Trainer(cfg)
    device, data, total = trainer.accelerator.device, trainer.data, trainer.data.total_steps
    first_steady = warmup_steps + 1
    if warmup_steps < 1 or total < first_steady + 2:
        raise ValueError(f"{total} steps leave no steady window after {warmup_steps} warm-up steps")
    marks: dict[int, float] = {}
    train_step = trainer.recipe.train_step

    def timed_step(micro_batches, step):
        if step in (1, 2, first_steady, total):
            synchronize(device)
            marks[step] = time.perf_counter()
        return train_step(micro_batches, step)

    trainer.recipe.train_step = timed_step
    fit_started = time.perf_counter()
    trainer.fit()
    ended = time.perf_counter()
    steady_steps = total - first_steady
    return {"img_s": steady_steps * data.global_batch / (marks[total] - marks[first_steady]),
            "steady_steps": steady_steps, "steady_s": marks[total] - marks[first_steady],
            "warmup_steps": warmup_steps, "startup_s": fit_started - started, "first_step_s": marks[2] - marks[1],
            "warmup_s": marks[first_steady] - marks[1], "finish_s": ended - marks[total],
            "global_batch": data.global_batch, "loader_workers": data.num_workers,
            "cache_fill_s": data.cache.fill_s if data.cache is not None else None, "device": str(device),
            "precision": trainer.accelerator.mixed_precision}


@cli_main
def main(argv: list[str]) -> int:
    from dfcvae_dist.config import load_config
    from dfcvae_dist.rundir import atomic_write

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    result = {"config": args.config, **timed_fit(load_config(args.config, args.overrides), args.warmup_steps)}
    atomic_write(args.out, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
