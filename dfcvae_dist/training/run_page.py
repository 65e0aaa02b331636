"""What a run's MLflow page shows besides its curves: a description in words, the data's lineage (dataset
inputs from the shard manifest), only the params its model family reads, and image panels that can be
followed over time (a fixed batch with its reconstructions, samples of a fixed z)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from dfcvae_dist.config import Config
from dfcvae_dist.data.loader import EvalStream, make_loader, model_input, resolve_split
from dfcvae_dist.data.shards import manifest_digest, manifest_of
from dfcvae_dist.families import get_family
from dfcvae_dist.figures import labelled_grid
from dfcvae_dist.metrics import TRAINING
SPLIT_CONTEXTS = {"train": "training", "val": "validation", "test": "evaluation"}


def family_params(cfg: Config) -> dict:
    """The config as MLflow params, without the keys this model family never reads."""
    unused = get_family(cfg.model.name).unused_keys(cfg)
    return {k: v for k, v in cfg.flat().items() if k not in unused}


def dataset_inputs(shards: str, manifest: dict | None) -> list:
    """MLflow dataset inputs, one per non-empty split of the manifest (train: training, val: validation,
    test: evaluation), each with the manifest's digest, the sample counts and whether the data is synthetic."""
    if manifest is None:
        return []
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    directory = Path(shards).resolve()
    counts = {split: info["num_samples"] for split, info in manifest["splits"].items()}
    inputs = []
    for split, context in SPLIT_CONTEXTS.items():
        if not counts.get(split):
            continue
        profile = {"split": split, "num_samples": counts[split], "splits": counts,
                   "synthetic": manifest["synthetic"], "image_size": manifest.get("image_size"),
                   "crop": manifest.get("crop"), "made_from": manifest.get("source")}
        dataset = Dataset(f"{directory.name}/{split}", manifest_digest(manifest), "local", str(directory),
                          profile=json.dumps(profile))
        inputs.append(DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return inputs


def run_description(cfg: Config, feature_weights: str, manifest: dict | None) -> str:
    """The run page's description (markdown): model, data, loss network, what the numbers mean."""
    model, family = cfg.model, get_family(cfg.model.name)
    lines = [f"**{family.title}**, {model.image_size}×{model.image_size} images, latent size "
             f"{model.latent_dim}, trained by `dfcvae_dist` into `{cfg.train.run_dir}`.", ""]
    if feature_weights.startswith("random"):
        lines += [f"> **Warning: the {cfg.loss.network} loss network has RANDOM weights ({feature_weights}).** The "
                  "loss is not the paper's feature perceptual loss; the numbers demonstrate the pipeline, not the "
                  "method.", ""]
    lines += ["**Data**: " + data_line(cfg.data.shards, manifest), ""]
    lines += [line for loss_line in family.loss_lines(cfg, feature_weights) for line in (loss_line, "")]
    lines += ["**What the numbers mean** (every name: docs/metrics.md)", *metric_lines(cfg), "",
              "**Images** (step slider): " + family.images_caption()]
    return "\n".join(lines)


def data_line(shards: str, manifest: dict | None) -> str:
    if manifest is None:
        return f"`{shards}` (a WebDataset URL pattern: no manifest, so no counts or digest)."
    counts = " / ".join(f"{info['num_samples']:,} {split}" for split, info in manifest["splits"].items())
    kind = ("**synthetic faces** (drawn by `dfcvae-synthetic`, not CelebA)" if manifest["synthetic"]
            else f"images from `{manifest.get('source') or 'unrecorded source'}`")
    return f"`{Path(shards).resolve()}`: {counts} images, {kind}; manifest digest `{manifest_digest(manifest)}`."


def metric_lines(cfg: Config) -> list[str]:
    """The family's own training metrics and its objective, then the evaluations'."""
    own = get_family(cfg.model.name).metrics(cfg)
    lines = [f"- `{m.name}`: {m.meaning} ({m.unit})." for m in own]
    if not any(m.name == "train/total" for m in own):
        lines.insert(0, f"- `train/total`: {TRAINING[0].meaning}.")
    return lines + ["- `eval/...`: the evaluations (SVM attribute accuracy, latent statistics, quality) once run."]


def fixed_batch(cfg: Config, n: int = 8) -> torch.Tensor | None:
    """The first `n` images by key of the val split, or of the train split where the data has no val split:
    the same faces at every image step and after a resume. Shards are written in key order, so the first
    shard holds the first keys."""
    data = cfg.data
    manifest = manifest_of(data.shards)
    has_val = bool(manifest["splits"].get("val", {}).get("num_samples")) if manifest else bool(data.val_shards)
    source = resolve_split(data.shards, "val" if has_val else "train", pattern_samples=n,
                           val_pattern=data.val_shards)
    source.urls = source.urls[:1]
    keys, images = [], []
    for batch in make_loader(EvalStream(source, 256, 0, 1, data.skip_corrupt), 0):
        keys += batch["key"]
        images.append(batch["image"])
    if not keys:
        return None
    order = sorted(range(len(keys)), key=keys.__getitem__)[:n]
    return model_input(torch.cat(images)[order], "cpu")


def labelled_rows(rows: list[tuple[str, torch.Tensor]], title: str = "") -> Image.Image:
    """Rows of images ((N, 3, H, W) in [0, 1], N equal) as one picture, each row labelled on its left, upscaled
    by nearest neighbour (dfcvae_dist/figures.py)."""
    return labelled_grid(rows, title).picture
