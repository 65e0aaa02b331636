"""`python tools/extract_latents.py` is the console script `dfcvae-extract` (dfcvae_dist/cli/extract.py)."""

import sys

from dfcvae_dist.cli.extract import main

if __name__ == "__main__":
    sys.exit(main())
