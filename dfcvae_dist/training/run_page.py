"""What a run's MLflow page shows besides its curves: a short description in words, the data's lineage
(dataset inputs from the shard manifest), only the params its model family reads, image panels that can be
followed over time from step 0 (a fixed batch with its reconstructions, samples of a fixed z), and the card of
its logged model (name, description, params, datasets)."""

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


# Settings that change neither the trained weights nor the metrics (where, how often and whether a run logs,
# saves and resumes; threads and timeouts): in the run's config.yaml artifact, not among its params. MLflow's
# image cards list every param above the image, and its compare views default to the first params that differ.
BOOKKEEPING = ("log.", "checkpoint.", "train.run_dir", "train.resume", "train.threads", "train.collective_timeout_s",
               "train.sync_every_steps")


def family_params(cfg: Config) -> dict:
    """The config as MLflow params: the settings of what is trained, without the keys this model family never
    reads and without BOOKKEEPING."""
    unused = get_family(cfg.model.name).unused_keys(cfg)
    return {k: v for k, v in cfg.flat().items() if k not in unused and not k.startswith(BOOKKEEPING)}


def split_datasets(shards: str, manifest: dict | None) -> dict[str, tuple[str, str]]:
    """The MLflow dataset (name, digest) of each non-empty split of the manifest: `<shards folder>/<split>` and
    the manifest's digest. None without a manifest (a WebDataset URL pattern)."""
    if manifest is None:
        return {}
    digest, folder = manifest_digest(manifest), Path(shards).resolve().name
    return {split: (f"{folder}/{split}", digest) for split, info in manifest["splits"].items()
            if info["num_samples"]}


def dataset_inputs(shards: str, manifest: dict | None) -> list:
    """MLflow dataset inputs, one per non-empty split of the manifest (train: training, val: validation,
    test: evaluation), each with the manifest's digest, the sample counts and whether the data is synthetic."""
    if manifest is None:
        return []
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    counts = {split: info["num_samples"] for split, info in manifest["splits"].items()}
    datasets, inputs = split_datasets(shards, manifest), []
    for split, context in SPLIT_CONTEXTS.items():
        if split not in datasets:
            continue
        profile = {"split": split, "num_samples": counts[split], "splits": counts,
                   "synthetic": manifest["synthetic"], "image_size": manifest.get("image_size"),
                   "crop": manifest.get("crop"), "made_from": manifest.get("source")}
        dataset = Dataset(*datasets[split], "local", str(Path(shards).resolve()), profile=json.dumps(profile))
        inputs.append(DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return inputs


def run_description(cfg: Config, feature_weights: str, manifest: dict | None) -> str:
    """The run page's description (markdown, a line each, which MLflow shows as line breaks): model and data,
    a warning for random loss-network weights, the objective, the family's loss lines. Short enough for MLflow
    to show whole (it folds a description past 100 px, about four lines, behind "Show more"): the settings are
    the run's parameters, the metric names are explained in docs/metrics.md."""
    model, family = cfg.model, get_family(cfg.model.name)
    lines = [f"**{family.title}**: {model.image_size}×{model.image_size} images, latent size {model.latent_dim}, "
             f"trained on {data_line(cfg.data.shards, manifest)}"]
    if feature_weights.startswith("random"):
        lines += [f"**Warning: the {cfg.loss.network} loss network has RANDOM weights ({feature_weights})**: the "
                  "numbers demonstrate the pipeline, not the paper's method."]
    lines += [f"**Objective**: `train/total` = {objective(cfg)} (every metric: docs/metrics.md).",
              *family.loss_lines(cfg, feature_weights)]
    return "\n".join(lines)


def data_line(shards: str, manifest: dict | None) -> str:
    """The data in a few words: its split sizes and whether it is synthetic (its path and digest are the run's
    dataset inputs)."""
    if manifest is None:
        return f"`{shards}` (a WebDataset URL pattern: no manifest, so no counts)."
    counts = " / ".join(f"{info['num_samples']:,} {split}" for split, info in manifest["splits"].items())
    kind = ("**synthetic faces** (not CelebA)" if manifest["synthetic"]
            else f"images from `{manifest.get('source') or 'an unrecorded source'}`")
    return f"{counts} {kind}."


def objective(cfg: Config) -> str:
    """What the family's `train/total` is (its metrics' first line)."""
    own = {m.name: m.meaning for m in get_family(cfg.model.name).metrics(cfg)}
    return own.get("train/total", TRAINING[0].meaning)


def model_card(cfg: Config, feature_weights: str, manifest: dict | None, run_name: str):
    """The logged model's name (`<family>-<run name>`), description, params, and the datasets of its metrics
    (train/*: the train split, val/*: the val split)."""
    from dfcvae_dist.model_logging import ModelCard, input_shapes

    model, family = cfg.model, get_family(cfg.model.name)
    lines = [f"**{family.title}** of run `{run_name}`: {model.image_size}×{model.image_size} images, latent size "
             f"{model.latent_dim}, trained on " + data_line(cfg.data.shards, manifest)]
    if feature_weights.startswith("random"):
        lines += [f"> **Warning: trained with RANDOM {cfg.loss.network} loss-network weights ({feature_weights}).**"]
    lines += ["`mlflow.pyfunc.load_model(\"models:/<model id>\").predict(x, params={\"mode\": ...})`, x "
              f"{input_shapes(model.latent_dim, model.image_size)}. Safetensors weights and our code, no pickle."]
    datasets = split_datasets(cfg.data.shards, manifest)
    return ModelCard(f"{family.name}-{run_name}", "\n\n".join(lines),
                     {k: str(v)[:500] for k, v in family_params(cfg).items()},
                     {f"{split}/": datasets[split] for split in ("train", "val") if split in datasets})


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
