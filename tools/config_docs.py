"""Write docs/configuration.md from the config dataclasses: every key's type, default, allowed values,
whether a resumed run may change it, and its help.

    python tools/config_docs.py [--out docs/configuration.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dfcvae_dist.config import config_markdown
from dfcvae_dist.errors import cli_main

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


@cli_main
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DOC, help=f"where to write (default {DOC})")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(config_markdown())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
