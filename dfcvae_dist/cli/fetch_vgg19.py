"""Fetch torchvision's VGG19 ImageNet weights (on a machine with internet) for offline clusters.

Downloads into torch's hub cache (where `loss.vgg_weights=imagenet` looks) and, with --out, also copies
the file there, e.g. onto shared storage for `loss.vgg_weights=/shared/vgg19.pth`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from torchvision.models import VGG19_Weights

from dfcvae_dist.errors import UserError, cli_main
from dfcvae_dist.losses.perceptual import imagenet_cache_path


@cli_main
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, help="also copy the weights file here")
    args = parser.parse_args(argv)
    try:
        VGG19_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
    except OSError as err:
        raise UserError(f"cannot download {VGG19_Weights.IMAGENET1K_V1.url}: {err}") from None
    print(f"cached at {imagenet_cache_path()}")
    if args.out:
        shutil.copyfile(imagenet_cache_path(), args.out)
        print(f"copied to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
