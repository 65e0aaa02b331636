"""`python tools/export.py` is the console script `dfcvae-export` (dfcvae_dist/cli/export.py)."""

import sys

from dfcvae_dist.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
