"""`python tools/make_shards.py` is the console script `dfcvae-shards` (dfcvae_dist/cli/shards.py)."""

import sys

from dfcvae_dist.cli.shards import main

if __name__ == "__main__":
    sys.exit(main())
