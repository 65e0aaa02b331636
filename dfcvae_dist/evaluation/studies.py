"""Latent-space studies of the paper's section 4.3, each written as a PNG.

Figure 3: samples from N(0, I); Figure 4: inputs above reconstructions; Figure 5: interpolation between
encoded images and between random z; Figure 6: attribute arithmetic z + alpha * v; Figure 7: correlation
of attribute vectors; Figure 8: t-SNE map of images placed by their latents. Deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision

from dfcvae_dist.errors import UserError
from dfcvae_dist.inference import attribute_vector, interpolate_latents

ALPHAS = torch.linspace(0, 1, 11)  # the paper's alpha = 0, 0.1, ..., 1
CORRELATION_ATTRIBUTES = ["Attractive", "Bald", "Eyeglasses", "Gray_Hair", "Heavy_Makeup", "Male", "Mustache",
                          "No_Beard", "Pale_Skin", "Smiling", "Wearing_Hat", "Wearing_Lipstick", "Young"]


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> Path:
    torchvision.utils.save_image(images.float().clamp(0, 1).cpu(), path, nrow=nrow, padding=2)
    return path


def attribute_vectors(latents: dict) -> tuple[list[str], np.ndarray]:
    """Per attribute, `inference.attribute_vector` over all images (zeros where all or none have it)."""
    names = [str(n) for n in latents["attribute_names"]]
    vectors = np.zeros((len(names), latents["mu"].shape[1]))
    for j in range(len(names)):
        if 0 < latents["attrs"][:, j].sum() < len(latents["attrs"]):
            vectors[j] = attribute_vector(latents["mu"], latents["attrs"], j).numpy()
    return names, vectors


def check_attributes(requested: list[str], names: list[str]) -> None:
    unknown = [a for a in requested if a not in names]
    if unknown:
        raise UserError(f"unknown attribute(s) {', '.join(unknown)}; known: {', '.join(names)}")


@torch.no_grad()
def samples_figure(model, out: Path, seed: int, n: int = 64) -> Path:
    return save_grid(model.sample(n, torch.Generator().manual_seed(seed)), out / "samples.png", nrow=8)


@torch.no_grad()
def reconstruction_figure(model, images: torch.Tensor, out: Path, n: int = 8) -> Path:
    mu, _ = model.encode(images[:n])
    return save_grid(torch.cat([images[:n], model.decode(mu)]), out / "reconstructions.png", nrow=n)


@torch.no_grad()
def interpolation_figure(model, images: torch.Tensor, out: Path, seed: int, pairs: int = 3) -> Path:
    """Rows: (1 - a) z_left + a z_right for encoded pairs, then one pair of random z."""
    mu, _ = model.encode(images[: 2 * pairs])
    random_pair = torch.randn(2, mu.shape[1], generator=torch.Generator().manual_seed(seed))
    z = torch.cat([interpolate_latents(mu[0::2], mu[1::2], len(ALPHAS)).flatten(0, 1),
                   interpolate_latents(random_pair[0], random_pair[1], len(ALPHAS))])
    return save_grid(model.decode(z), out / "interpolation.png", nrow=len(ALPHAS))


@torch.no_grad()
def arithmetic_figure(model, images: torch.Tensor, image_attrs: torch.Tensor, names: list[str],
                      vectors: np.ndarray, attributes: list[str], out: Path) -> Path:
    """For each attribute: a face without it plus alpha * v, and a face with it minus alpha * v."""
    rows = []
    for name in attributes:
        j = names.index(name)
        v = torch.from_numpy(vectors[j]).float()
        for sign, want in ((1.0, 0), (-1.0, 1)):
            idx = torch.nonzero(image_attrs[:, j] == want).flatten()
            if len(idx) == 0:
                continue
            z, _ = model.encode(images[idx[:1]])
            rows.append(torch.stack([z[0] + sign * a * v for a in ALPHAS]))
    if not rows:
        raise UserError(f"no images to show attribute arithmetic for {', '.join(attributes)}")
    return save_grid(model.decode(torch.cat(rows)), out / "arithmetic.png", nrow=len(ALPHAS))


def correlation_figure(names: list[str], vectors: np.ndarray, attributes: list[str], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = np.array([vectors[names.index(a)] for a in attributes])
    corr = np.corrcoef(chosen)
    fig, ax = plt.subplots(figsize=(8, 7))
    im = ax.imshow(corr, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(attributes)), attributes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(attributes)), attributes, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title("Correlation of attribute vectors")
    fig.tight_layout()
    path = out / "attribute_correlation.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def tsne_figure(mu: np.ndarray, images: torch.Tensor, out: Path, seed: int, cells: int = 40) -> Path:
    """Images placed on a cells x cells canvas by a 2-D t-SNE of their latents (nearest free cell)."""
    from sklearn.manifold import TSNE

    xy = TSNE(n_components=2, init="pca", random_state=seed, perplexity=30).fit_transform(mu)
    xy = (xy - xy.min(0)) / np.maximum(xy.max(0) - xy.min(0), 1e-9) * (cells - 1)
    size = images.shape[-1]
    canvas = torch.ones(3, cells * size, cells * size)
    free = np.ones((cells, cells), dtype=bool)
    grid = np.stack(np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij"), -1).reshape(-1, 2)
    for i in np.argsort(np.linalg.norm(xy - xy.mean(0), axis=1)):
        open_cells = grid[free.reshape(-1)]
        if not len(open_cells):
            break
        cx, cy = open_cells[np.argmin(((open_cells - xy[i]) ** 2).sum(1))]
        free[cx, cy] = False
        canvas[:, cy * size:(cy + 1) * size, cx * size:(cx + 1) * size] = images[i]
    path = out / "tsne.png"
    torchvision.utils.save_image(canvas, path)
    return path
