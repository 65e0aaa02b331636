"""Write a synthetic CelebA (official layout) for offline training and tests."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.progress import Progress

from dfcvae_dist.data.synthetic import make_synthetic_celeba
from dfcvae_dist.errors import cli_main


@cli_main
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="directory to create")
    parser.add_argument("--num", type=int, default=10000, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with Progress() as progress:
        task = progress.add_task("drawing faces", total=args.num)
        make_synthetic_celeba(args.out, args.num, args.seed, args.workers,
                              progress=lambda: progress.advance(task))
    elapsed = time.perf_counter() - start
    print(f"wrote {args.num} images to {args.out} in {elapsed:.1f}s ({args.num / elapsed:.0f} img/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
