"""`python tools/make_synthetic_celeba.py` is the console script `dfcvae-synthetic` (dfcvae_dist/cli/synthetic.py)."""

import sys

from dfcvae_dist.cli.synthetic import main

if __name__ == "__main__":
    sys.exit(main())
