"""Distributed extraction: every sample of the chosen splits exactly once across ranks (`extract_latents`).

Each rank encodes its shards (EvalStream) and writes `parts/part-RANK-of-WORLD.npz` under a temporary
name, renamed when complete; after a barrier the main process merges the parts, sorted by key, into
`latents.npz` (keys, mu, logvar, attrs, partition, attribute_names, checkpoint, features, weights, shards_digest;
and what tells a table whether it may be set beside the paper's: `synthetic`, whether the shards' manifest says
the images are synthetic faces, and `loss_weights`, the weights of the loss network the model was trained with).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from dfcvae_dist.data.loader import EvalStream, SplitSource, make_loader, model_input
from dfcvae_dist.data.shards import manifest_digest, read_manifest
from dfcvae_dist.distributed import make_accelerator
from dfcvae_dist.errors import UserError
from dfcvae_dist.imagenet import imagenet_normalize
from dfcvae_dist.inference import load_trained
from dfcvae_dist.losses.feature_networks import load_network
from dfcvae_dist.rundir import atomic_path
from dfcvae_dist.training.state import TrainerState

ARRAYS = ("keys", "mu", "logvar", "attrs", "partition")


class VGGFc7(nn.Module):
    """The paper's VGG-FC baseline: 4096-d fc7 activations of VGG19 (ImageNet-normalised input)."""

    def __init__(self, weights: str = "imagenet", seed: int = 0):
        super().__init__()
        vgg, self.weights_source = load_network("vgg19", weights, seed)
        self.features, self.avgpool, self.fc7 = vgg.features, vgg.avgpool, vgg.classifier[:5]
        self.eval().requires_grad_(False)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.avgpool(self.features(imagenet_normalize(x))).flatten(1)
        features = self.fc7(h)
        return features, features.new_zeros(features.shape[0], 0)


@dataclass
class Extracted:
    path: Path  # latents.npz
    features: str
    weights: str
    images: int
    ranks: int
    seconds: float


def extract_latents(shards: Path, out: Path, checkpoint: str | Path | None = None,
                    splits: Sequence[str] = ("train", "val", "test"), features: str = "latent",
                    vgg_weights: str = "imagenet", batch_size: int = 256, num_workers: int = 1) -> Extracted | None:
    """OUT/latents.npz: `features` (latent: the posteriors of the model at `checkpoint`, a run directory or
    checkpoint; vgg-fc: VGG19's fc7 with `vgg_weights`) of every image of `splits`, encoded by every rank of
    this process's launch (accelerate launch or torchrun; a plain process is one rank). What was written on
    the main process, None on the others."""
    accelerator = make_accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    if features == "latent":
        if checkpoint is None:
            raise ValueError("features='latent' needs a checkpoint")
        encoder, _, folder = load_trained(checkpoint)
        meta = {"checkpoint": str(folder), "features": "latent", "weights": "trained",
                "loss_weights": trained_with(folder)}
    else:
        with accelerator.main_process_first():
            encoder = VGGFc7(vgg_weights)
        meta = {"checkpoint": "", "features": "vgg-fc", "weights": encoder.weights_source, "loss_weights": "none"}
    manifest = read_manifest(shards)
    meta["synthetic"] = str(bool(manifest.get("synthetic"))).lower()
    encoder.to(accelerator.device)
    sources = [SplitSource.from_manifest(shards, split) for split in splits]
    start = time.perf_counter()
    write_part(out, rank, world, encode_rank(encoder, sources, rank, world, batch_size, num_workers,
                                             accelerator.device))
    accelerator.wait_for_everyone()
    extracted = None
    if accelerator.is_main_process:
        path = merge_parts(out, world, {**meta, "attribute_names": sources[0].attributes,
                                        "shards_digest": manifest_digest(manifest)})
        extracted = Extracted(path, meta["features"], meta["weights"], sum(s.num_samples for s in sources), world,
                              time.perf_counter() - start)
    accelerator.wait_for_everyone()
    return extracted


def trained_with(checkpoint: Path) -> str:
    """The weights of the loss network the checkpoint's model was trained with (`random(seed=0)`, `imagenet`,
    `none` for a family without one), or `unknown` where the folder keeps no trainer state."""
    try:
        return TrainerState.read(checkpoint).feature_weights
    except UserError:
        return "unknown"


@torch.no_grad()
def encode_rank(encoder, sources: list[SplitSource], rank: int, world: int, batch_size: int,
                num_workers: int, device: torch.device) -> dict[str, np.ndarray]:
    parts = {name: [] for name in ARRAYS}
    for source in sources:
        stream = EvalStream(source, batch_size, rank, world)
        for batch in make_loader(stream, num_workers):
            mu, logvar = encoder.encode(model_input(batch["image"], device))
            parts["keys"].append(np.array(batch["key"]))
            parts["mu"].append(mu.float().cpu().numpy())
            parts["logvar"].append(logvar.float().cpu().numpy())
            parts["attrs"].append(batch["attrs"].numpy())
            parts["partition"].append(batch["partition"].numpy())
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in parts.items()}


def write_part(out: Path, rank: int, world: int, arrays: dict[str, np.ndarray]) -> Path:
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    final = parts / f"part-{rank:04d}-of-{world:04d}.npz"
    save_npz(final, arrays)
    return final


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: savez adds no suffix
        np.savez(f, **arrays)


def merge_parts(out: Path, world: int, meta: dict[str, str]) -> Path:
    """Concatenate every rank's part (all must exist), sort by key, write latents.npz atomically."""
    files = [out / "parts" / f"part-{r:04d}-of-{world:04d}.npz" for r in range(world)]
    missing = [rank for rank, f in enumerate(files) if not f.exists()]
    if missing:
        raise UserError(f"{files[missing[0]]}: the part of rank {missing[0]} is missing ({len(missing)} of {world} "
                        "parts missing); was extraction interrupted?")
    loaded = {f.name: dict(np.load(f, allow_pickle=False)) for f in files}
    loaded = {name: part for name, part in loaded.items() if len(part["keys"])}
    if not loaded:
        raise UserError(f"{out}: no images to merge, all {world} rank part(s) are empty; do the chosen splits hold "
                        "any images? (see the shards' manifest.json)")
    merged = {k: np.concatenate([part[k] for part in loaded.values()]) for k in ARRAYS}
    order = np.argsort(merged["keys"], kind="stable")
    merged = {k: v[order] for k, v in merged.items()}
    repeated = merged["keys"][1:][merged["keys"][1:] == merged["keys"][:-1]]
    if len(repeated):
        holders = [name for name, part in loaded.items() if repeated[0] in part["keys"]]
        raise UserError(f"{out / 'parts'}: key '{repeated[0]}' is in {' and '.join(holders)} ({len(repeated)} "
                        "repeated key(s)); the shards overlap")
    final = out / "latents.npz"
    save_npz(final, {**merged, **{k: np.array(v) for k, v in meta.items()}})
    return final


LATENT_FIELDS = ARRAYS + ("attribute_names", "checkpoint", "features", "weights")


def load_latents(path: str | Path) -> dict[str, np.ndarray]:
    """latents.npz with every field checked (a missing one is named), plus `path`: where it was read."""
    path = Path(path)
    try:
        data = dict(np.load(path, allow_pickle=False))
    except FileNotFoundError:
        raise UserError(f"{path}: no such latents file (write it with tools/extract_latents.py)") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable latents file ({err})") from None
    missing = [k for k in LATENT_FIELDS if k not in data]
    if missing:
        raise UserError(f"{path}: missing array(s) {', '.join(missing)}")
    data["path"] = np.array(str(path))  # so that later complaints about the contents can name the file
    return data
