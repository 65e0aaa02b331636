"""The samplers `dfcvae-quality` compares (`--sampler normal|gmm[:K]`): z ~ N(0, I), as the paper samples (every
family), and a Gaussian mixture fitted to a VAE's training latents (`inference.GaussianMixtureSampler`; a family
without an encoder has no latents to fit).

The mixture is fitted on the posterior means of the first `fit_images` (20,000) images of the training split of
the shards the quality metrics read. They come from the run's extraction, RUN_DIR/eval/latents/latents.npz, when it
holds this checkpoint's latents of those same shards (its `checkpoint` and `shards_digest`); otherwise the model
encodes them here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dfcvae_dist.errors import UserError
from dfcvae_dist.inference import GaussianMixtureSampler

DEFAULT_COMPONENTS = 10  # pythae's default
DEFAULT_SAMPLERS = ("normal", "gmm")
FID_KEYS = {"normal": "fid", "gmm": "fid_gmm"}  # quality.json's key (eval/quality/<key>) of each sampler's FID
EXTRACTED_LATENTS = Path("eval/latents/latents.npz")
TRAIN_PARTITION = 0


@dataclass(frozen=True)
class SamplerSpec:
    kind: str  # normal | gmm
    components: int = 0  # gmm: the mixture's components

    @property
    def label(self) -> str:
        return "N(0, I)" if self.kind == "normal" else f"a {self.components}-component Gaussian mixture"


def parse_samplers(texts: Sequence[str]) -> tuple[SamplerSpec, ...]:
    """`normal`, `gmm` or `gmm:K`, each at most once (items may be comma-separated)."""
    specs: dict[str, SamplerSpec] = {}
    for item in (part.strip() for text in texts for part in text.split(",") if part.strip()):
        kind, sep, count = item.partition(":")
        if kind not in FID_KEYS or (kind == "normal" and sep) or (sep and not count.isdigit()) or count == "0":
            raise UserError(f"--sampler {item}: expected normal, gmm or gmm:K (K components, at least 1)")
        if kind in specs:
            raise UserError(f"--sampler {item}: {kind} is given twice")
        specs[kind] = SamplerSpec(kind, int(count) if count else DEFAULT_COMPONENTS if kind == "gmm" else 0)
    if not specs:
        raise UserError("--sampler: name at least one of normal, gmm[:K]")
    return tuple(specs.values())


def extracted_train_latents(checkpoint: Path, shards: Path, limit: int) -> tuple[np.ndarray, str] | None:
    """The train-partition means of RUN_DIR/eval/latents/latents.npz (`checkpoint` in RUN_DIR/checkpoints/), when
    it was extracted from `checkpoint` and `shards`; else None."""
    from dfcvae_dist.data.shards import manifest_digest, read_manifest

    if checkpoint.parent.name != "checkpoints":
        return None
    path = checkpoint.parent.parent / EXTRACTED_LATENTS
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        if "shards_digest" not in data or "checkpoint" not in data:
            return None  # extracted before latents.npz named its shards: not known to be these
        same = (Path(str(data["checkpoint"])).resolve() == checkpoint.resolve()
                and str(data["shards_digest"]) == manifest_digest(read_manifest(shards)))
        mu = data["mu"][data["partition"] == TRAIN_PARTITION][:limit] if same else None
    return (mu, f"{path} (train partition)") if mu is not None and len(mu) else None


@torch.no_grad()
def encoded_train_latents(model, shards: Path, limit: int, device: str) -> tuple[np.ndarray, str]:
    """The posterior means of the first `limit` training images of `shards`, encoded here."""
    from dfcvae_dist.evaluation.quality import split_batches

    mu = [model.encode(x.to(device))[0].float().cpu() for x in split_batches(shards, "train", limit)]
    if not mu:
        raise UserError(f"{shards}: the train split is empty: no latents to fit a Gaussian mixture to")
    return torch.cat(mu).numpy(), f"the train split of {shards}, encoded"


def model_samplers(name: str, model, checkpoint: Path, encodes: bool, specs: Sequence[SamplerSpec], shards: Path,
                   limit: int, device: str) -> tuple[dict[str, GaussianMixtureSampler | None], dict | None]:
    """{kind: sampler (None: N(0, I))} of the asked samplers that apply to the model (a mixture needs an encoder),
    and how its mixture was fitted (quality.json's `gmm`: components, fit_images, fit_on, file)."""
    chosen, fitted = {}, None
    for spec in specs:
        if spec.kind == "normal":
            chosen["normal"] = None
        elif encodes:
            mu, source = (extracted_train_latents(checkpoint, shards, limit)
                          or encoded_train_latents(model, shards, limit, device))
            chosen["gmm"] = GaussianMixtureSampler.fit(mu, spec.components)
            fitted = {"components": chosen["gmm"].n_components, "fit_images": len(mu), "fit_on": source,
                      "file": mixture_file(name)}
    return chosen, fitted


def mixture_file(name: str) -> str:
    return f"gmm-{name}.safetensors"


def write_sampler_files(name: str, model, chosen: dict[str, GaussianMixtureSampler | None], out: Path,
                        n: int = 64) -> dict[str, str]:
    """OUT/samples-KIND-NAME.png (8 x 8 samples, seed 0) for each sampler, and the mixture as gmm-NAME.safetensors
    (`GaussianMixtureSampler.load`); {kind: its figure's file name}."""
    from dfcvae_dist.figures import labelled_grid
    from dfcvae_dist.inference import sample

    figures = {}
    for kind, sampler in chosen.items():
        figures[kind] = f"samples-{kind}-{name}.png"
        faces = sample(model, n, 0, sampler)
        source = "N(0, I)" if sampler is None else \
            f"a Gaussian mixture of {sampler.n_components} components fitted to the training latents"
        labelled_grid([("", faces[i:i + 8]) for i in range(0, n, 8)],
                      f"{name}: {n} samples, z drawn from {source} (seed 0)").save(out / figures[kind])
        if sampler is not None:
            sampler.save(out / mixture_file(name))
    return figures


def sampler_files(result: dict) -> list[str]:
    """The files a model's quality entry names beside quality.json: its sample figures and its mixture."""
    return [*result.get("samples", {}).values(), *([result["gmm"]["file"]] if result.get("gmm") else [])]


def sampler_batches(model, n: int, sampler: GaussianMixtureSampler | None, batch: int = 250, seed: int = 0):
    """n images from `sampler` (None: N(0, I), the model's own `sample`), a batch at a time, deterministic for
    `seed`."""
    generator, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    device = next(model.parameters()).device
    for start in range(0, n, batch):
        size = min(batch, n - start)
        yield model.sample(size, generator) if sampler is None else model.decode(sampler.sample(size, rng).to(device))
