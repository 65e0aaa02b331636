"""Latent-space studies of the paper's section 4.3, each written as a PNG.

Figure 3: samples from N(0, I); Figure 4: inputs above reconstructions; Figure 5: interpolation between
encoded images and between random z; Figure 6: attribute arithmetic z + alpha * v; Figure 7: correlation
of attribute vectors; Figure 8: t-SNE map of images placed by their latents. Deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.functional import to_pil_image

from dfcvae_dist.errors import UserError
from dfcvae_dist.figures import labelled_grid, titled, to_bytes
from dfcvae_dist.inference import attribute_vector, interpolate_latents

ALPHAS = torch.linspace(0, 1, 11)  # the paper's alpha = 0, 0.1, ..., 1
ALPHA_LABELS = [f"α = {a:.1f}" for a in ALPHAS.tolist()]
HAS_COLOUR, LACKS_COLOUR = "#E69F00", "#0072B2"  # Okabe-Ito orange and blue: told apart by colour-blind readers
CORRELATION_ATTRIBUTES = ["Attractive", "Bald", "Eyeglasses", "Gray_Hair", "Heavy_Makeup", "Male", "Mustache",
                          "No_Beard", "Pale_Skin", "Smiling", "Wearing_Hat", "Wearing_Lipstick", "Young"]


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
    samples = model.sample(n, torch.Generator().manual_seed(seed))
    rows = [("", samples[i:i + 8]) for i in range(0, n, 8)]
    figure = labelled_grid(rows, f"Samples: {n} faces decoded from z ~ N(0, I) (seed {seed})")
    return save(figure, out / "samples.png")


@torch.no_grad()
def reconstruction_figure(model, images: torch.Tensor, out: Path, n: int = 8) -> Path:
    mu, _ = model.encode(images[:n])
    figure = labelled_grid([("input", images[:n]), ("reconstruction", model.decode(mu))],
                           "Reconstructions: each input above its reconstruction, decoded from the mean of q(z|x)")
    return save(figure, out / "reconstructions.png")


@torch.no_grad()
def interpolation_figure(model, images: torch.Tensor, out: Path, seed: int, pairs: int = 3) -> Path:
    """Rows: (1 - a) z_left + a z_right for encoded pairs, then one pair of random z."""
    mu, _ = model.encode(images[: 2 * pairs])
    random_pair = torch.randn(2, mu.shape[1], generator=torch.Generator().manual_seed(seed))
    z = torch.cat([interpolate_latents(mu[0::2], mu[1::2], len(ALPHAS)).flatten(0, 1),
                   interpolate_latents(random_pair[0], random_pair[1], len(ALPHAS))])
    decoded = model.decode(z).split(len(ALPHAS))
    labels = [f"images {2 * i + 1} → {2 * i + 2}" for i in range(pairs)] + ["random z₁ → z₂"]
    figure = labelled_grid(list(zip(labels, decoded, strict=True)),
                           "Interpolation in latent space: decode((1 − α)·z₁ + α·z₂)", ALPHA_LABELS,
                           caption="Rows 'images i → j': z₁, z₂ are the encoder's means of two images of the split; "
                           f"the last row joins two random z ~ N(0, I) (seed {seed}).")
    return save(figure, out / "interpolation.png")


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
            label = f"{name}: without, + α·v" if sign > 0 else f"{name}: with, − α·v"
            rows.append((label, torch.stack([z[0] + sign * a * v for a in ALPHAS])))
    if not rows:
        raise UserError(f"no images to show attribute arithmetic for {', '.join(attributes)}")
    decoded = model.decode(torch.cat([z for _, z in rows])).split(len(ALPHAS))
    figure = labelled_grid([(label, faces) for (label, _), faces in zip(rows, decoded, strict=True)],
                           "Attribute arithmetic: decode(z + α·v) adds the attribute, decode(z − α·v) removes it",
                           ALPHA_LABELS, caption="z: the encoder's mean of a face without the attribute (+) or with it "
                           "(−); v: the attribute's vector, the mean z of the images with it minus that of those "
                           "without.")
    return save(figure, out / "arithmetic.png")


def save(figure, path: Path) -> Path:
    figure.save(path)
    return path


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
    fig.colorbar(im, ax=ax, fraction=0.046, label="Pearson correlation")
    ax.set_title(f"Correlation of {len(attributes)} attribute vectors (mean z with the attribute − mean z without)")
    fig.tight_layout()
    path = out / "attribute_correlation.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")  # long tick labels stay inside
    plt.close(fig)
    return path


def tsne_figure(mu: np.ndarray, images: torch.Tensor, out: Path, seed: int, cells: int = 40,
                colour_by: tuple[str, torch.Tensor] | None = None) -> Path:
    """Images placed on a cells x cells canvas by a 2-D t-SNE of their latents (nearest free cell); with
    `colour_by` (an attribute's name and each image's 0/1 value) each face is framed in that attribute's colour."""
    from sklearn.manifold import TSNE

    xy = TSNE(n_components=2, init="pca", random_state=seed, perplexity=30).fit_transform(mu)
    xy = (xy - xy.min(0)) / np.maximum(xy.max(0) - xy.min(0), 1e-9) * (cells - 1)
    frame, gap = (3, 1) if colour_by else (0, 0)  # a coloured frame, and white between frames
    size = images.shape[-1] + 2 * (frame + gap)
    canvas = torch.ones(3, cells * size, cells * size)
    free = np.ones((cells, cells), dtype=bool)
    grid = np.stack(np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij"), -1).reshape(-1, 2)
    for i in np.argsort(np.linalg.norm(xy - xy.mean(0), axis=1)):
        open_cells = grid[free.reshape(-1)]
        if not len(open_cells):
            break
        cx, cy = open_cells[np.argmin(((open_cells - xy[i]) ** 2).sum(1))]
        free[cx, cy] = False
        tile = canvas[:, cy * size + gap:(cy + 1) * size - gap, cx * size + gap:(cx + 1) * size - gap]
        if colour_by:
            tile[:] = colour(HAS_COLOUR if colour_by[1][i] else LACKS_COLOUR)[:, None, None]
        tile[:, frame:tile.shape[1] - frame, frame:tile.shape[2] - frame] = images[i]
    legend = [(f"frame: {colour_by[0]}", HAS_COLOUR), (f"frame: not {colour_by[0]}", LACKS_COLOUR)] if colour_by else ()
    title = f"t-SNE map of {min(len(mu), cells * cells)} images by their latent means: similar latents lie close"
    picture, _ = titled(to_pil_image(to_bytes(canvas)), title, legend=legend, caption="Each face sits in the free "
                        f"cell nearest its 2-D t-SNE position (perplexity 30, seed {seed}).")
    path = out / "tsne.png"
    picture.save(path)
    return path


def colour(hex_rgb: str) -> torch.Tensor:
    return torch.tensor([int(hex_rgb[k:k + 2], 16) / 255 for k in (1, 3, 5)])
