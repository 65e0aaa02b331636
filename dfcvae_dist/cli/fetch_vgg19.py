"""Fetch torchvision's ImageNet weights of a loss network (VGG19 by default) on a machine with internet, for
offline clusters.

Downloads into torch's hub cache (where `loss.network_weights=imagenet` looks) and, with --out, also copies
the file there, e.g. onto shared storage for `loss.network_weights=/shared/vgg19.pth`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from torchvision.models import get_model_weights

from dfcvae_dist.errors import UserError, cli_main, one_line
from dfcvae_dist.losses.feature_networks import BUILTIN_NETWORKS, imagenet_cache_path


@cli_main
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--network", choices=BUILTIN_NETWORKS, default="vgg19", help="the loss network (loss.network)")
    parser.add_argument("--out", type=Path, help="also copy the weights file here")
    args = parser.parse_args(argv)
    weights = get_model_weights(args.network).DEFAULT
    try:
        weights.get_state_dict(progress=True)
    except OSError as err:
        raise UserError(f"cannot download {weights.url}: {one_line(err)}") from None
    print(f"cached at {imagenet_cache_path(args.network)}")
    if args.out:
        shutil.copyfile(imagenet_cache_path(args.network), args.out)
        print(f"copied to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
