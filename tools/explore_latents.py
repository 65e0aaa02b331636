"""`python tools/explore_latents.py` is the console script `dfcvae-explore` (dfcvae_dist/cli/explore.py)."""

import sys

from dfcvae_dist.cli.explore import main

if __name__ == "__main__":
    sys.exit(main())
