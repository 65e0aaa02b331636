"""The paper's Figures 3 and 4 for a comparison: one labelled row per model, small images upscaled with
nearest neighbours so their pixels stay visible (dfcvae_dist/figures.py).

samples.png          random samples; every VAE decodes the SAME z (one seed, one latent size), a GAN's
                     generator draws its own z from the same seed (a different latent space)
reconstructions.png  the same test faces (top row) through each model that encodes, from the mean latent
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from dfcvae_dist.errors import UserError
from dfcvae_dist.families import get_family
from dfcvae_dist.figures import labelled_grid
from dfcvae_dist.inference import decode, encode, load_trained, sample

COLUMNS = 8
SAMPLES_TITLE = "Figure 3: random samples, one row per model"
SAMPLES_CAPTION = "Every VAE decodes the same z ~ N(0, I) (seed {seed}); a GAN draws its own z from that seed."
RECONSTRUCTIONS_TITLE = "Figure 4: the same test faces (top row) through each model"
RECONSTRUCTIONS_CAPTION = "Each model encodes the faces and decodes the mean of q(z|x)."


def first_models(tasks, problems: list[str]) -> list[tuple[str, torch.nn.Module, object]]:
    """(run name, model, config) of each run name's first finished task whose checkpoint loads."""
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
        models.append((task.run_name, model, cfg))
    return models


def samples_rows(models, seed: int) -> list[tuple[str, torch.Tensor]]:
    return [(get_family(cfg.model.name).samples_label(name), sample(model, COLUMNS, seed))
            for name, model, cfg in models]


def reconstruction_rows(vaes, faces: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    rows = [("test faces", faces)]
    for name, model, cfg in vaes:
        size = cfg.model.image_size
        x = faces if faces.shape[-1] == size else F.interpolate(faces, size=(size, size), mode="bilinear",
                                                                 antialias=True)
        rows.append((name, decode(model, encode(model, x)[0]).cpu()))
    return rows


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
            figures["reconstructions"] = labelled_grid(reconstruction_rows(vaes, faces), RECONSTRUCTIONS_TITLE,
                                                       caption=RECONSTRUCTIONS_CAPTION).save(out / "reconstructions.png")
    return figures, problems
