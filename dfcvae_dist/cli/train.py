"""Train DFC-VAE, PVAE or DCGAN on WebDataset shards.

    dfcvae-train --config quickstart [section.key=value ...]                      # one process
    accelerate launch [--config_file configs/accelerate/X.yaml] -m dfcvae_dist.train --config dfcvae-123 [k=v ...]
    torchrun --nproc_per_node 2 -m dfcvae_dist.train --config ...                 # also works

The same as `Trainer(load_config(config, overrides)).fit()` in Python (docs/python-api.md).
"""

from __future__ import annotations

import argparse
import logging
import os

from dfcvae_dist.config import config_help, load_config, shipped_configs
from dfcvae_dist.errors import UserError, cli_main, message


@cli_main
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dfcvae-train", description=__doc__,
                                     epilog=config_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a YAML file, or a shipped config's name: " + ", ".join(shipped_configs()))
    parser.add_argument("overrides", nargs="*", help="section.key=value (the keys are listed below)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    from dfcvae_dist.training.trainer import Trainer  # after the config is checked: a typo costs no heavy import

    try:
        Trainer(cfg).fit()
    except UserError as err:
        raise UserError(f"[rank {os.environ.get('RANK', '0')}] {message(err)}") from None
    return 0
