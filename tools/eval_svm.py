"""`python tools/eval_svm.py` is the console script `dfcvae-svm` (dfcvae_dist/cli/svm.py)."""

import sys

from dfcvae_dist.cli.svm import main

if __name__ == "__main__":
    sys.exit(main())
