"""`python tools/report.py` is the console script `dfcvae-report` (dfcvae_dist/cli/report.py)."""

import sys

from dfcvae_dist.cli.report import main

if __name__ == "__main__":
    sys.exit(main())
