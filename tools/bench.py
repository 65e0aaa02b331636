"""`python tools/bench.py` is the console script `dfcvae-bench` (dfcvae_dist/cli/bench.py)."""

import sys

from dfcvae_dist.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
