"""Latent-space studies as PNGs (paper figures 3-8): samples, reconstructions, interpolation, attribute
arithmetic, attribute-vector correlation and a t-SNE map."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dfcvae_dist.data.loader import read_images
from dfcvae_dist.errors import cli_main
from dfcvae_dist.evaluation import studies
from dfcvae_dist.extraction.latents import load_latents
from dfcvae_dist.inference import load_trained
from dfcvae_dist.tracking import mlflow_client, resolve_run_id


@cli_main
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or run directory")
    p.add_argument("--latents", type=Path, required=True, help="latents.npz (for attribute vectors)")
    p.add_argument("--shards", type=Path, required=True, help="manifest directory the images come from")
    p.add_argument("--split", default="test")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--attributes", default="Smiling,Eyeglasses", help="attributes for the arithmetic figure")
    p.add_argument("--correlate", default=",".join(studies.CORRELATION_ATTRIBUTES),
                   help="13 or more attributes for the correlation heatmap")
    p.add_argument("--tsne-attribute", help="frame the t-SNE map's faces by this attribute (default: the first of "
                                            "--attributes)")
    p.add_argument("--tsne-images", type=int, default=1600,
                   help="images placed on the t-SNE map (at most what the split holds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mlflow-run", help="also log the PNGs into this MLflow run (run id or training run directory)")
    args = p.parse_args(argv)
    run_id = resolve_run_id(args.mlflow_run) if args.mlflow_run else None  # a bad value fails before the work
    torch.manual_seed(args.seed)
    model, _, _ = load_trained(args.checkpoint)
    names, vectors = studies.attribute_vectors(load_latents(args.latents))
    arithmetic = [a.strip() for a in args.attributes.split(",") if a.strip()]
    correlate = [a.strip() for a in args.correlate.split(",") if a.strip()]
    tsne_attribute = args.tsne_attribute or next(iter(arithmetic), None)
    studies.check_attributes(arithmetic + correlate + [tsne_attribute] * bool(tsne_attribute), names)
    sample = read_images(args.shards, args.split, args.tsne_images)
    images, attrs = sample["image"], sample["attrs"]
    if len(images) < args.tsne_images:
        print(f"the {args.split} split of {args.shards} holds {len(images)} images, fewer than --tsne-images "
              f"{args.tsne_images}: the t-SNE map and the other figures use all {len(images)}")
    args.out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        mu = torch.cat([model.encode(chunk)[0] for chunk in images.split(256)]).numpy()
    paths = [
        studies.samples_figure(model, args.out, args.seed),
        studies.reconstruction_figure(model, images, args.out),
        studies.interpolation_figure(model, images, args.out, args.seed),
        studies.arithmetic_figure(model, images, attrs, names, vectors, arithmetic, args.out),
        studies.correlation_figure(names, vectors, correlate, args.out),
        studies.tsne_figure(mu, images, args.out, args.seed, colour_by=tsne_attribute and (
            tsne_attribute, attrs[:, names.index(tsne_attribute)])),
    ]
    for path in paths:
        print(f"wrote {path}")
    if run_id:
        client = mlflow_client()
        for path in paths:
            client.log_artifact(run_id, str(path), "studies")
    return 0


if __name__ == "__main__":
    sys.exit(main())
