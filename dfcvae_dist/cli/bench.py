"""Performance, measured side by side in one run and written to JSON (keys are stable).

    dfcvae-bench [--quick] [--device cpu|cuda] [--json benchmarks/cpu-2core.json]

1. training step: ours (fp32, fp16, bf16 autocast; train.compile off, loss and step; the trainer's default on the
   device, also with the 345 loss) interleaved with a plain reference step (full VGG19 features, two fp32
   passes), medians and spread over rounds
2. machine limit: the best sustained rate of a few large matmuls and convolutions; each step as a fraction
3. data loading: our shards with N workers vs an ImageFolder-style JPEG folder with crop + resize
4. the paper's training phase (5 epochs x 162,770 images at 64x64): estimated wall time here
5. extraction img/s, 40-attribute SVM seconds, real 1- and 2-process training runs
6. end to end: the real trainer with the shipped configs (123, 345, PVAE) on npy shards on local disk; on a GPU
   also its levers (the variants of dfcvae_dist/bench/end_to_end.py)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from rich.console import Console

from dfcvae_dist.bench import SECTIONS
from dfcvae_dist.errors import UserError, cli_main
from dfcvae_dist.rundir import atomic_write


@cli_main
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, no compile: a smoke test in seconds")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--svm-n", type=int, help="latents for the SVM figure (default 100,000; quick: 20,000)")
    p.add_argument("--sections", help="comma-separated, of: " + ", ".join(SECTIONS) + " (default: all)")
    args = p.parse_args(argv)
    sections = args.sections.split(",") if args.sections else None
    unknown = sorted(set(sections or []) - set(SECTIONS))
    if unknown:
        raise UserError(f"--sections: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA device on this machine; run with --device cpu")
    # Imported after the checks: torch.utils.benchmark warns on import when torch was built for CUDA but
    # finds no CUDA runtime, which would bury a bad-input line.
    from dfcvae_dist.bench.report import bench_table
    from dfcvae_dist.bench.run import BenchSettings, run

    console = Console()
    save = (lambda r: atomic_write(args.json, json.dumps(r, indent=1))) if args.json else (lambda r: None)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
    result = run(BenchSettings.for_run(args.device, args.quick, args.svm_n, sections), say=console.print, save=save)
    console.print(bench_table(result))
    if args.json:
        save(result)
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
