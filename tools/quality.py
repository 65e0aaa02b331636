"""`python tools/quality.py` is the console script `dfcvae-quality` (dfcvae_dist/cli/quality.py)."""

import sys

from dfcvae_dist.cli.quality import main

if __name__ == "__main__":
    sys.exit(main())
