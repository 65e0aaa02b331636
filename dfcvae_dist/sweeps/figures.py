"""The paper's Figures 3 and 4 for a comparison: one labelled row per model, small images upscaled with
nearest neighbours so their pixels stay visible (dfcvae_dist/figures.py).

samples.png          random samples; every VAE decodes the SAME z (one seed, one latent size), a GAN's
                     generator draws its own z from the same seed (a different latent space)
samples-gmm.png      each VAE's samples from the Gaussian mixture its quality step fitted to its training latents
reconstructions.png  the same test faces (top row) through each model that encodes, from the mean latent
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from dfcvae_dist.errors import UserError
from dfcvae_dist.families import get_family
from dfcvae_dist.figures import labelled_grid
from dfcvae_dist.inference import GaussianMixtureSampler, decode, encode, load_trained, sample

COLUMNS = 8
SAMPLES_TITLE = "Figure 3: random samples, one row per model"
SAMPLES_CAPTION = "Every VAE decodes the same z ~ N(0, I) (seed {seed}); a GAN draws its own z from that seed."
SAMPLES_GMM_TITLE = "Samples from a Gaussian mixture fitted to each VAE's training latents"
SAMPLES_GMM_CAPTION = ("Each row: decode(z), z drawn (seed {seed}) from the mixture the model's quality step fitted "
                       "to the latent means of its training images, instead of N(0, I).")
RECONSTRUCTIONS_TITLE = "Figure 4: the same test faces (top row) through each model"
RECONSTRUCTIONS_CAPTION = "Each model encodes the faces and decodes the mean of q(z|x)."


def first_models(tasks, problems: list[str]) -> list[tuple[str, torch.nn.Module, object, object]]:
    """(run name, model, config, task) of each run name's first finished task whose checkpoint loads."""
    models, seen = [], set()
    for task in tasks:
        if task.run_name in seen:
            continue
        try:
            model, cfg, _ = load_trained(task.run_dir, expect=None)
        except UserError as err:
            problems.append(f"figures: {task.name}: {err}")
            continue
        seen.add(task.run_name)
        models.append((task.run_name, model, cfg, task))
    return models


def samples_rows(models, seed: int) -> list[tuple[str, torch.Tensor]]:
    return [(get_family(cfg.model.name).samples_label(name), sample(model, COLUMNS, seed))
            for name, model, cfg, _ in models]


def reconstruction_rows(vaes, faces: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    rows = [("test faces", faces)]
    for name, model, cfg, _ in vaes:
        size = cfg.model.image_size
        x = faces if faces.shape[-1] == size else F.interpolate(faces, size=(size, size), mode="bilinear",
                                                                 antialias=True)
        rows.append((name, decode(model, encode(model, x)[0]).cpu()))
    return rows


def mixture_rows(vaes, seed: int, problems: list[str]) -> list[tuple[str, torch.Tensor]]:
    """Each VAE's samples from the mixture its quality step fitted (quality.json's `gmm`), where it has one."""
    from dfcvae_dist.sweeps.report import QUALITY_FILE

    rows = []
    for name, model, _, task in vaes:
        file = mixture_file(task.run_dir / QUALITY_FILE)
        try:
            if file is not None:
                rows.append((name, sample(model, COLUMNS, seed, sampler=GaussianMixtureSampler.load(file))))
        except UserError as err:
            problems.append(f"figures: {task.name}: {err}")
    return rows


def mixture_file(quality_json: Path) -> Path | None:
    """The mixture file a run's quality.json names; None where none was fitted or the file is missing or unreadable
    (the report's task table names those)."""
    try:
        entry = next(iter(json.loads(quality_json.read_text())["models"].values()))
        return quality_json.parent / entry["gmm"]["file"] if entry.get("gmm") else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration):
        return None


def comparison_figures(tasks, out: Path, shards: str | None, seed: int = 0) -> tuple[dict, list[str]]:
    """Write samples.png and reconstructions.png for the finished `tasks`; (their layouts, problem lines).
    `shards`: the test faces' manifest directory (default: the first VAE's data.shards)."""
    from dfcvae_dist.data.loader import read_images

    problems: list[str] = []
    models = first_models(tasks, problems)
    figures = {}
    if models:
        figures["samples"] = labelled_grid(samples_rows(models, seed), SAMPLES_TITLE,
                                           caption=SAMPLES_CAPTION.format(seed=seed)).save(out / "samples.png")
    vaes = [m for m in models if get_family(m[2].model.name).encodes]
    if vaes:
        shards = shards or vaes[0][2].data.shards
        try:
            faces = read_images(shards, "test", COLUMNS)["image"]
        except UserError as err:
            problems.append(f"figures: reconstructions.png not drawn: {err}")
        else:
            figures["reconstructions"] = labelled_grid(
                reconstruction_rows(vaes, faces), RECONSTRUCTIONS_TITLE, caption=RECONSTRUCTIONS_CAPTION).save(
                out / "reconstructions.png")
        if mixtures := mixture_rows(vaes, seed, problems):
            figures["samples_gmm"] = labelled_grid(mixtures, SAMPLES_GMM_TITLE,
                                                   caption=SAMPLES_GMM_CAPTION.format(seed=seed)).save(
                out / "samples-gmm.png")
    return figures, problems
