"""Write CelebA (official or torchvision layout) or a plain image folder as WebDataset tar shards."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.progress import Progress

from dfcvae_dist.data import shards
from dfcvae_dist.data.synthetic import is_synthetic
from dfcvae_dist.errors import UserError, cli_main


@cli_main
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--celeba-root", type=Path, help="CelebA directory (ROOT or ROOT/celeba)")
    src.add_argument("--image-folder", type=Path, help="a folder of your own images (center-cropped)")
    src.add_argument("--verify", type=Path, metavar="DIR", help="re-read every shard against DIR/manifest.json")
    p.add_argument("--out", type=Path, help="output directory")
    p.add_argument("--attributes", type=Path, help="CSV of labels for --image-folder: image,<attr>,...")
    p.add_argument("--holdout", type=float, default=0.05, help="--image-folder: fraction for val (and test)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--crop", choices=["paper", "landmarks"], default="paper",
                   help="paper: box x30..168 y40..178; landmarks: square face box from the 5 landmarks")
    p.add_argument("--format", choices=["npy", "png", "jpg"], default="npy",
                   help="image encoding in the tar; npy: raw uint8 pixels, nothing to decode (fastest); png: "
                        "lossless, ~25%% smaller")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--skip-corrupt", action="store_true", help="skip undecodable images, list them in the manifest")
    args = p.parse_args(argv)

    if args.verify:
        problems = shards.verify_shards(args.verify)
        for line in problems:
            print(line)
        print(f"{args.verify}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        return 1 if problems else 0
    if args.out is None:
        raise UserError("--out is required when writing shards")
    if args.celeba_root:
        names, samples = shards.celeba_samples(args.celeba_root)
        crop, source, synthetic = args.crop, str(args.celeba_root), is_synthetic(args.celeba_root)
    else:
        names, samples = shards.folder_samples(args.image_folder, args.attributes, args.holdout)
        crop, source, synthetic = "center", str(args.image_folder), False
    settings = shards.ShardSettings(args.image_size, crop, args.format, args.shard_size, source)
    start = time.perf_counter()
    with Progress() as progress:
        task = progress.add_task("sharding", total=len(samples))
        manifest = shards.make_shards(names, samples, args.out, settings, args.workers, args.skip_corrupt,
                                      progress=lambda n: progress.advance(task, n), synthetic=synthetic)
    elapsed = time.perf_counter() - start
    counts = ", ".join(f"{k} {v['num_samples']}" for k, v in manifest["splits"].items())
    kind = "; synthetic" if synthetic else ""
    print(f"wrote {args.out} ({counts}; skipped {len(manifest['skipped'])}{kind}) in {elapsed:.1f}s "
          f"({len(samples) / elapsed:.0f} img/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
