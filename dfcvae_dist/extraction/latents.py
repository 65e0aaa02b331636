"""Distributed extraction: every sample of the chosen splits exactly once across ranks.

Each rank encodes its shards (EvalStream) and writes `parts/part-RANK-of-WORLD.npz` under a temporary
name, renamed when complete; after a barrier the main process merges the parts, sorted by key, into
`latents.npz` (keys, mu, logvar, attrs, partition, attribute_names, checkpoint, features, weights).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dfcvae_dist.data.loader import EvalStream, SplitSource, make_loader, model_input
from dfcvae_dist.errors import UserError
from dfcvae_dist.imagenet import imagenet_normalize
from dfcvae_dist.losses.perceptual import load_vgg19

ARRAYS = ("keys", "mu", "logvar", "attrs", "partition")


class VGGFc7(nn.Module):
    """The paper's VGG-FC baseline: 4096-d fc7 activations of VGG19 (ImageNet-normalised input)."""

    def __init__(self, weights: str = "imagenet", seed: int = 0):
        super().__init__()
        vgg, self.weights_source = load_vgg19(weights, seed)
        self.features, self.avgpool, self.fc7 = vgg.features, vgg.avgpool, vgg.classifier[:5]
        self.eval().requires_grad_(False)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.avgpool(self.features(imagenet_normalize(x))).flatten(1)
        features = self.fc7(h)
        return features, features.new_zeros(features.shape[0], 0)


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
    tmp = parts / f".part-{rank:04d}-of-{world:04d}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, final)
    return final


def merge_parts(out: Path, world: int, meta: dict[str, str]) -> Path:
    """Concatenate every rank's part (all must exist), sort by key, write latents.npz atomically."""
    files = [out / "parts" / f"part-{r:04d}-of-{world:04d}.npz" for r in range(world)]
    missing = [f for f in files if not f.exists()]
    if missing:
        raise UserError(f"{missing[0]}: a rank's part is missing; was extraction interrupted?")
    loaded = [dict(np.load(f, allow_pickle=False)) for f in files]
    loaded = [p for p in loaded if len(p["keys"])]
    merged = {k: np.concatenate([p[k] for p in loaded]) for k in ARRAYS}
    order = np.argsort(merged["keys"], kind="stable")
    merged = {k: v[order] for k, v in merged.items()}
    if len(np.unique(merged["keys"])) != len(merged["keys"]):
        raise UserError(f"{out}: duplicate keys across ranks; the shards overlap")
    tmp = out / ".latents.tmp.npz"
    np.savez(tmp, **merged, **{k: np.array(v) for k, v in meta.items()})
    final = out / "latents.npz"
    os.replace(tmp, final)
    return final


LATENT_FIELDS = ARRAYS + ("attribute_names", "checkpoint", "features", "weights")


def load_latents(path: str | Path) -> dict[str, np.ndarray]:
    """latents.npz with every field checked; a missing one is named."""
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
    return data
