"""Write the generated pages of docs/: configuration.md from the config dataclasses (every key's type, default,
allowed values, whether a resumed run may change it, and its help) and metrics.md from the metric declarations
(dfcvae_dist/metrics.py and each model family's).

    python tools/generate_docs.py [--out-dir docs]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dfcvae_dist.config import config_markdown
from dfcvae_dist.errors import cli_main
from dfcvae_dist.metrics import metrics_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = {"configuration.md": config_markdown, "metrics.md": metrics_markdown}


@cli_main
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=DOCS, help=f"where to write (default {DOCS})")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, page in PAGES.items():
        (args.out_dir / name).write_text(page())
        print(f"wrote {args.out_dir / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
