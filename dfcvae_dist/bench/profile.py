"""A `torch.profiler` summary of the real trainer: `--steps` steps after a warm-up, from the start of the first to
the start of the one after the last (so loading and the trainer's bookkeeping between steps are in the window,
which ends once the device has finished the window's work): kernels per step and the share of the window the
device is busy, with the kernels that take the most time.

    python -m dfcvae_dist.bench.profile --out PROFILE.json [--steps 10] [--warmup-steps 5] --config dfcvae-123 k=v ...

On CUDA the kernels are the GPU's (the trace's `kernel` events; copies and memsets count as busy time, not as
kernels). A CPU has no device kernels, so its operators stand in: the aten operators not nested in another one on
the same thread, busy being the share of the window spent in them.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity

from dfcvae_dist.errors import cli_main

WINDOW = "dfcvae-profiled-steps"
GPU_BUSY = {"kernel", "gpu_memcpy", "gpu_memset"}


def profiled_fit(cfg, warmup_steps: int, steps: int, trace: Path) -> str:
    """Train as `cfg` says, profiling steps warmup_steps + 1 .. warmup_steps + steps; writes the chrome trace.
    Returns the device type."""
    from dfcvae_dist.bench.end_to_end import synchronize
    from dfcvae_dist.training.trainer import Trainer

    trainer = Trainer(cfg)
    device = trainer.accelerator.device
    first, after = warmup_steps + 1, warmup_steps + steps + 1
    if trainer.data.total_steps < after:
        raise ValueError(f"{trainer.data.total_steps} steps: the window needs {after} (set train.max_steps)")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    profiler = torch.profiler.profile(activities=activities)
    window = torch.profiler.record_function(WINDOW)
    train_step = trainer.recipe.train_step

    def profiled_step(micro_batches, n):
        if n in (first, after):
            synchronize(device)
        if n == first:
            profiler.start()
            window.__enter__()
        elif n == after:
            window.__exit__(None, None, None)
            profiler.stop()
        return train_step(micro_batches, n)

    trainer.recipe.train_step = profiled_step
    trainer.fit()
    profiler.export_chrome_trace(str(trace))
    return device.type


def summarize(trace: dict, device_type: str, steps: int, top: int = 10) -> dict:
    """Kernels per step, the busy share of the window and the `top` kernels by time, from a chrome trace."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    window = next(e for e in events if e["name"] == WINDOW and e.get("cat") == "user_annotation")
    start, end = window["ts"], window["ts"] + window["dur"]
    if device_type == "cuda":
        kernels = [e for e in events if e.get("cat") == "kernel"]
        busy = [e for e in events if e.get("cat") in GPU_BUSY]
    else:
        kernels = busy = outermost(e for e in events if e.get("cat") == "cpu_op" and e["name"].startswith("aten::"))
    kernels = [e for e in kernels if start <= e["ts"] < end]
    time_by_name = collections.Counter()
    count_by_name = collections.Counter()
    for e in kernels:
        time_by_name[e["name"]] += e["dur"]
        count_by_name[e["name"]] += 1
    return {"device": device_type, "steps": steps, "window_s": window["dur"] / 1e6,
            "kernels": "GPU kernels" if device_type == "cuda" else "outermost aten operators (no device kernels)",
            "kernels_per_step": len(kernels) / steps,
            "busy_share": covered(busy, start, end) / window["dur"],
            "top": [{"name": name, "per_step": count_by_name[name] / steps, "ms_per_step": us / steps / 1e3}
                    for name, us in time_by_name.most_common(top)]}


def outermost(events) -> list[dict]:
    """The events not nested inside another of them on the same thread."""
    kept, ends = [], {}
    for e in sorted(events, key=lambda e: (e["tid"], e["ts"], -e["dur"])):
        if e["ts"] >= ends.get(e["tid"], float("-inf")):
            kept.append(e)
            ends[e["tid"]] = e["ts"] + e["dur"]
    return kept


def covered(events: list[dict], start: float, end: float) -> float:
    """Length of the union of the events' intervals within [start, end]."""
    total, reach = 0.0, start
    for s, e in sorted((max(start, ev["ts"]), min(end, ev["ts"] + ev["dur"])) for ev in events):
        if e > reach:
            total += e - max(s, reach)
            reach = e
    return total


@cli_main
def main(argv: list[str]) -> int:
    from dfcvae_dist.config import load_config
    from dfcvae_dist.rundir import atomic_write

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the summary (JSON)")
    parser.add_argument("--trace", type=Path, help="also keep the chrome trace here")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, [*args.overrides, f"train.max_steps={args.warmup_steps + args.steps + 1}"])
    with tempfile.TemporaryDirectory(prefix="dfcvae-profile-") as tmp:
        trace = args.trace or Path(tmp) / "trace.json"
        device_type = profiled_fit(cfg, args.warmup_steps, args.steps, trace)
        summary = {"config": args.config, "overrides": args.overrides, **summarize(json.loads(trace.read_text()),
                                                                                 device_type, args.steps)}
    atomic_write(args.out, json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "top"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
