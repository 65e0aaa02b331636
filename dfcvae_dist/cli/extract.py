"""Encode every image of the chosen splits on one or many ranks into DIR/latents.npz.

    accelerate launch --multi_gpu --num_processes 2 -m dfcvae_dist.cli.extract --checkpoint RUN_DIR \
        --shards data/shards/landmarks-64 --out results/latents
    dfcvae-extract --features vgg-fc --vgg-weights imagenet --shards ... --out ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dfcvae_dist.errors import UserError, cli_main
from dfcvae_dist.extraction.latents import extract_latents


@cli_main
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint folder or run directory (features=latent)")
    p.add_argument("--shards", type=Path, required=True, help="manifest directory")
    p.add_argument("--split", default="train,val,test", help="comma-separated splits")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--features", choices=["latent", "vgg-fc"], default="latent")
    p.add_argument("--vgg-weights", default="imagenet", help="vgg-fc: imagenet, random or a file")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=1)
    args = p.parse_args(argv)
    if args.features == "latent" and not args.checkpoint:
        raise UserError("--checkpoint is required with --features latent")
    done = extract_latents(args.shards, args.out, args.checkpoint, [s.strip() for s in args.split.split(",")],
                           args.features, args.vgg_weights, args.batch_size, args.num_workers)
    if done:  # the main process
        print(f"wrote {done.path}: {done.images} images, {done.features} ({done.weights}), {done.ranks} rank(s), "
              f"{done.images / done.seconds:.0f} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
