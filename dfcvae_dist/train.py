"""`python -m dfcvae_dist.train`: the same as the `dfcvae-train` console script (dfcvae_dist.cli.train)."""

import sys

from dfcvae_dist.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
