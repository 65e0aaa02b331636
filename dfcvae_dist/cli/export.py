"""Export a trained model as one shareable folder (model.safetensors, config.json, README.md: the model card), the
layout the Hugging Face Hub takes; with --push, upload it there. `load_trained(OUT)` or `load_trained("hf://OWNER/
NAME")` loads it (docs/model-folder.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dfcvae_dist.errors import cli_main
from dfcvae_dist.export import check_repo, export_model, push_folder
from dfcvae_dist.inference import WHICH


@cli_main
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("run_dir", metavar="RUN_DIR", help="training run directory (or one of its checkpoint folders)")
    p.add_argument("--out", type=Path, required=True, help="the model folder to write")
    p.add_argument("--which", choices=WHICH, default="latest",
                   help="which checkpoint of the run: the newest, or the best validated (checkpoint.keep_best)")
    p.add_argument("--push", metavar="OWNER/NAME", help="then upload the folder to this Hugging Face Hub model "
                   "repository (token: $HF_TOKEN or `hf auth login`; endpoint: $HF_ENDPOINT)")
    args = p.parse_args(argv)
    if args.push:
        check_repo(args.push)  # a bad name fails before the work
    checkpoint = export_model(args.run_dir, args.out, args.which, args.push)
    print(f"wrote {args.out} (model.safetensors, config.json, README.md) from {checkpoint}")
    if args.push:
        print(f"pushed to {push_folder(args.out, args.push)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
