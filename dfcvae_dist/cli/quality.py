"""Image quality of one or more trained models on a split, in one table: MSE, SSIM, MS-SSIM, LPIPS, blur ratio,
perceptual distance and FID per sampler (DCGAN: FID from N(0, I) only). Writes quality.json and each sampler's
sample figure, and logs each model's results into its own MLflow run (docs/evaluation.md says what each number is
and which compare with published ones)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dfcvae_dist.errors import UserError, cli_main
from dfcvae_dist.evaluation.quality import QUALITY_FILE, QualityOptions, evaluate_quality
from dfcvae_dist.evaluation.samplers import DEFAULT_SAMPLERS, parse_samplers, sampler_files
from dfcvae_dist.losses.feature_networks import BUILTIN_NETWORKS
from dfcvae_dist.metrics import QUALITY, formatted, metric
from dfcvae_dist.tracking import resolve_run_id

HEADLINE = [metric(f"eval/quality/{key}") for key in ("ssim", "lpips", "fid")]  # the ones papers report


@cli_main
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH",
                   help="model to compare (repeat): a run directory or checkpoint, e.g. dfcvae=runs/dfcvae")
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--network", choices=BUILTIN_NETWORKS, default="vgg19",
                   help="feature network of our perceptual distance, at its default layers (VGG19: the paper's 123)")
    p.add_argument("--network-weights", "--vgg-weights", dest="network_weights", default="imagenet",
                   help="that network's weights: imagenet|random|PATH")
    p.add_argument("--max-images", type=int, default=2000, help="images of the split for the reconstruction metrics")
    p.add_argument("--fid-samples", type=int, default=10_000,
                   help="samples and real images for FID (at most the split's size; 50000 for papers that use it; "
                        "0: no FID)")
    p.add_argument("--fid-weights", type=Path, help="the FID Inception weights file (default: torch hub's cache)")
    p.add_argument("--fid", action="store_true", help=argparse.SUPPRESS)  # FID is on by default; old command lines
    p.add_argument("--sampler", action="append", metavar="normal|gmm[:K]",
                   help="where samples come from (repeat or comma-separate): normal, z ~ N(0, I); gmm[:K], z from a "
                        "K-component (default 10) Gaussian mixture fitted to the VAE's training latents. Default: both "
                        "(a model without an encoder: normal only)")
    p.add_argument("--gmm-fit-images", type=int, default=20_000,
                   help="training latents the mixture is fitted to (the first of the train split)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log into the models' MLflow runs")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    checkpoints = dict(parse_model(item) for item in args.checkpoint)
    opts = QualityOptions(args.shards, args.split, args.max_images, args.network_weights, args.fid_weights,
                          args.fid_samples, network=args.network, samplers=tuple(args.sampler or DEFAULT_SAMPLERS),
                          gmm_fit_images=args.gmm_fit_images)
    parse_samplers(opts.samplers)  # a bad --sampler fails before the work
    run_ids = {} if args.no_mlflow else tracked_runs(checkpoints)
    quality = evaluate_quality(checkpoints, opts, args.out, run_ids)
    print_table(quality, args.split)
    print(f"wrote {args.out / QUALITY_FILE}")
    for result in quality["models"].values():
        for file in sampler_files(result):
            print(f"wrote {args.out / file}")
    for name, run_id in run_ids.items():
        print(f"MLflow: {name} logged into run {run_id}")
    print(f"headline ({args.split} split; every number in the table above):")
    for name, r in quality["models"].items():
        print(f"  {name}: " + ", ".join(f"{m.label} {formatted(m, r[m.key])}" for m in HEADLINE))
    return 0


def tracked_runs(checkpoints: dict[str, str]) -> dict[str, str]:
    """The MLflow run of each model, named by its COMPLETED.json; a run that was not tracked is skipped in one line."""
    run_ids = {}
    for name, path in checkpoints.items():
        try:
            run_ids[name] = resolve_run_id(str(run_directory(path)))
        except UserError as err:
            print(f"MLflow: {name} skipped: {err}")
    return run_ids


def parse_model(item: str) -> tuple[str, str]:
    name, sep, path = item.partition("=")
    return (name, path) if sep else (Path(name).name, name)


def print_table(quality: dict, split: str) -> None:
    table = Table("model", "family", "images", *(m.label for m in QUALITY), title=f"{split} split")
    for name, r in quality["models"].items():
        table.add_row(name, r["family"], str(r["images"]), *(formatted(m, r[m.key]) for m in QUALITY))
    console = Console(width=200)
    console.print(table)
    for key, note in quality["notes"].items():
        console.print(f"{key}: {note}", highlight=False, soft_wrap=True)


def run_directory(path: str) -> Path:
    """The training run directory of a run directory or of one of its checkpoints (RUN/checkpoints/step-N)."""
    path = Path(path)
    return path.parent.parent if path.parent.name == "checkpoints" else path


if __name__ == "__main__":
    sys.exit(main())
