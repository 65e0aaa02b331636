"""Performance, as ratios measured side by side in one run, written to JSON (keys are stable).

    python tools/bench.py [--quick] [--json benchmarks/cpu.json] [--device cpu]

1. training step: ours vs a plain reference step (full VGG19 features, two fp32 passes, no truncation)
2. data loading per worker: our shards vs an ImageFolder-style JPEG folder with crop + resize
3. machine limit: matmul and conv FLOP/s; the step's counted FLOPs x img/s as a fraction of matmul
4. extraction img/s and 40-attribute SVM seconds on N x 100 latents
5. scaling: real 1- and 2-process training runs, and the all-reduce volume per step
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dfcvae_dist import bench
from dfcvae_dist.data import shards
from dfcvae_dist.data.synthetic import make_synthetic_celeba
from dfcvae_dist.errors import UserError, cli_main


@cli_main
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test in about a minute")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--svm-n", type=int, help="latents for the SVM figure (default 200,000; quick: 20,000)")
    args = p.parse_args(argv)
    if args.device == "cuda":
        raise UserError("--device cuda: the GPU variant of the benchmark is not written yet; run on cpu")
    q = args.quick
    batch, size, repeats = (16, 64, 2) if q else (64, 64, 5)
    console = Console()
    work = bench.temporary_dir()
    try:
        console.print("making synthetic data ...")
        make_synthetic_celeba(work / "celeba", 400 if q else 2000, seed=0)
        names, samples = shards.celeba_samples(work / "celeba")
        for fmt in ("png", "npy"):
            shards.make_shards(names, samples, work / f"shards-{fmt}", shards.ShardSettings(size, "paper", fmt, 50),
                               workers=2)
        r = {"machine": bench.machine(), "quick": q, "batch": batch, "image_size": size}

        console.print("training step: ours vs plain reference ...")
        # ours = the trainer with loss.compile=true (truncated VGG, targets under no_grad, channels-last,
        # compiled loss); the lever measurements beside it switch levers off one at a time.
        compiled_step = bench.train_step_fn(batch, size, plain=False, channels_last=True, compile_loss=True)
        ours = batch / bench.timed(compiled_step, repeats, warmup=2)
        uncompiled = batch / bench.timed(bench.train_step_fn(batch, size, plain=False, channels_last=True), repeats)
        contiguous = batch / bench.timed(bench.train_step_fn(batch, size, plain=False), repeats)
        plain = batch / bench.timed(bench.train_step_fn(batch, size, plain=True), repeats)
        flops_ours = bench.step_flops_per_image(batch, size) / 1e9
        flops_plain = bench.step_flops_per_image(batch, size, plain=True) / 1e9
        r["train_step"] = {"ours_img_s": ours, "plain_img_s": plain, "ratio": ours / plain,
                           "ours_without_compile_img_s": uncompiled,
                           "ours_without_compile_and_channels_last_img_s": contiguous, "flop_ratio": flops_plain / flops_ours,
                           "plain_gflop_per_img": flops_plain}

        console.print("data loading ...")
        # ours: npy shards (the default, nothing to decode); png shards beside them
        loader_batch, loader_batches = (32, 8) if q else (64, 80)
        ours_l, png_l = (bench.shard_loader_img_s(work / f"shards-{fmt}", loader_batch, loader_batches)
                         for fmt in ("npy", "png"))
        jpeg_l = bench.jpeg_folder_img_s(work / "celeba" / "img_align_celeba", loader_batch, 256 if q else 2000, size)
        r["loader"] = {"ours_img_s": ours_l, "jpeg_img_s": jpeg_l, "ratio": ours_l / jpeg_l,
                       "ours_png_img_s": png_l, "png_ratio": png_l / jpeg_l}

        console.print("machine limit ...")
        mm = bench.matmul_gflops(1024 if q else 2048, repeats)
        conv = bench.conv_gflops(8, 128, 32, repeats)
        r["limit"] = {"matmul_gflops": mm, "conv_gflops": conv, "step_gflop_per_img": flops_ours,
                      "fraction": flops_ours * ours / mm, "fraction_of_conv": flops_ours * ours / conv}

        console.print("extraction and SVM ...")
        ext = bench.extraction_img_s(256, size, repeats)
        r["extract"] = {"img_s": ext, "ratio_to_train": ext / ours}
        n = args.svm_n or (20_000 if q else 200_000)
        r["svm"] = {"seconds": bench.svm_seconds(n), "n": n}

        console.print("scaling: 1 and 2 processes ...")
        scaling = bench.scaling_img_s(work / "shards-npy", 4 if q else 12, batch // 2 if q else 32, size, work)
        r["scaling"] = {**scaling, "allreduce_mb_per_step": bench.allreduce_mb_per_step(size)}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = Table("figure", "ours", "reference", "ratio / note", title=f"bench ({'quick' if q else 'full'})")
    t, lo, li = r["train_step"], r["loader"], r["limit"]
    table.add_row("training step img/s", f"{t['ours_img_s']:.1f}", f"{t['plain_img_s']:.1f} plain",
                  f"{t['ratio']:.2f}x (FLOP ratio {t['flop_ratio']:.2f}x)")
    table.add_row("  without torch.compile", f"{t['ours_without_compile_img_s']:.1f}", "", "")
    table.add_row("  without compile and channels-last", f"{t['ours_without_compile_and_channels_last_img_s']:.1f}",
                  "", "")
    table.add_row("loader img/s per worker", f"{lo['ours_img_s']:.0f}", f"{lo['jpeg_img_s']:.0f} jpeg", f"{lo['ratio']:.2f}x")
    table.add_row("  png shards", f"{lo['ours_png_img_s']:.0f}", "", f"{lo['png_ratio']:.2f}x")
    table.add_row("matmul / conv GFLOP/s", f"{li['matmul_gflops']:.1f}", f"{li['conv_gflops']:.1f}", "")
    table.add_row("step GFLOP/img, fraction of matmul", f"{li['step_gflop_per_img']:.2f}", "",
                  f"{li['fraction']:.0%} (of conv {li['fraction_of_conv']:.0%})")
    table.add_row("extraction img/s", f"{r['extract']['img_s']:.0f}", "", f"{r['extract']['ratio_to_train']:.1f}x train")
    table.add_row(f"SVM 40 attributes, n={r['svm']['n']}", f"{r['svm']['seconds']:.1f} s", "", "")
    table.add_row("scaling img/s (1 / 2 proc)", f"{r['scaling']['img_s_1proc']:.1f}", f"{r['scaling']['img_s_2proc']:.1f}",
                  f"all-reduce {r['scaling']['allreduce_mb_per_step']:.1f} MB/step")
    console.print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=1))
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
