"""Encode every image of the chosen splits on one or many ranks into DIR/latents.npz.

    accelerate launch --multi_gpu --num_processes 2 -m dfcvae_dist.cli.extract --checkpoint RUN_DIR \
        --shards data/shards/landmarks-64 --out results/latents
    dfcvae-extract --features vgg-fc --vgg-weights imagenet --shards ... --out ...
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dfcvae_dist.data.loader import SplitSource
from dfcvae_dist.distributed import make_accelerator
from dfcvae_dist.errors import UserError, cli_main
from dfcvae_dist.extraction.latents import VGGFc7, encode_rank, merge_parts, write_part
from dfcvae_dist.inference import load_trained


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
    accelerator = make_accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    if args.features == "latent":
        if not args.checkpoint:
            raise UserError("--checkpoint is required with --features latent")
        encoder, _, checkpoint = load_trained(args.checkpoint)
        meta = {"checkpoint": str(checkpoint), "features": "latent", "weights": "trained"}
    else:
        with accelerator.main_process_first():
            encoder = VGGFc7(args.vgg_weights)
        meta = {"checkpoint": "", "features": "vgg-fc", "weights": encoder.weights_source}
    encoder.to(accelerator.device)
    sources = [SplitSource.from_manifest(args.shards, s.strip()) for s in args.split.split(",")]
    start = time.perf_counter()
    arrays = encode_rank(encoder, sources, rank, world, args.batch_size, args.num_workers, accelerator.device)
    write_part(args.out, rank, world, arrays)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        path = merge_parts(args.out, world, {**meta, "attribute_names": sources[0].attributes})
        n = sum(s.num_samples for s in sources)
        print(f"wrote {path}: {n} images, {args.features} ({meta['weights']}), {world} rank(s), "
              f"{n / (time.perf_counter() - start):.0f} img/s")
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
