"""Reconstruction quality of one or more trained models on a split, in one table (MSE, SSIM, blur ratio,
feature perceptual distance; FID when Inception weights are available)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dfcvae_dist.data.loader import read_images
from dfcvae_dist.errors import cli_main
from dfcvae_dist.evaluation.quality import (frechet_distance, inception_features, inception_or_reason,
                                            reconstruction_metrics)
from dfcvae_dist.imagenet import PAPER_LAYERS
from dfcvae_dist.inference import load_trained, sample
from dfcvae_dist.losses import FeaturePerceptualLoss


@cli_main
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH",
                   help="model to compare (repeat), e.g. dfcvae=runs/dfcvae pvae=runs/pvae")
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--vgg-weights", default="imagenet", help="loss network of the perceptual distance")
    p.add_argument("--max-images", type=int, default=2000)
    p.add_argument("--fid", action="store_true", help="also FID (needs Inception v3 weights)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    perceptual = FeaturePerceptualLoss(list(PAPER_LAYERS["123"]), weights=args.vgg_weights)
    images = read_images(args.shards, args.split, args.max_images)["image"]
    results = {}
    for item in args.checkpoint:
        name, _, path = item.partition("=")
        model, _, checkpoint = load_trained(path or name)
        results[name] = {"checkpoint": str(checkpoint),
                         **reconstruction_metrics(model, images.split(200), perceptual)}
    note = f"perceptual distance with VGG19 weights: {perceptual.weights_source}"
    if args.fid:
        inception, reason = inception_or_reason()
        if inception is None:
            note += "; " + reason
        else:
            real = inception_features(inception, images)
            for name, r in results.items():
                model, _, _ = load_trained(r["checkpoint"])
                r["fid_samples"] = frechet_distance(real, inception_features(inception, sample(model, len(images))))
            note += f"; FID of {len(images)} samples from N(0, I) against as many {args.split} images"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps({"models": results, "note": note}, indent=1))
    table = Table("model", "images", "MSE", "SSIM", "blur ratio", "perceptual", "FID", title=f"{args.split} split")
    for name, r in results.items():
        fid = f"{r['fid_samples']:.1f}" if "fid_samples" in r else "-"
        table.add_row(name, str(r["images"]), f"{r['mse']:.5f}", f"{r['ssim']:.4f}", f"{r['blur_ratio']:.3f}",
                      f"{r['perceptual']:.4g}", fid)
    Console().print(table)
    print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
