"""`python tools/fetch_vgg19.py` is the console script `dfcvae-fetch-vgg19` (dfcvae_dist/cli/fetch_vgg19.py)."""

import sys

from dfcvae_dist.cli.fetch_vgg19 import main

if __name__ == "__main__":
    sys.exit(main())
