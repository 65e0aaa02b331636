"""`python tools/sweep.py` is the console script `dfcvae-sweep` (dfcvae_dist/cli/sweep.py)."""

import sys

from dfcvae_dist.cli.sweep import main

if __name__ == "__main__":
    sys.exit(main())
