"""Latent-space studies: every figure reads without the code (a title, labelled rows and columns, faces upscaled
by nearest neighbour to at least 128 px, a legend where colour means something); unknown attributes are refused."""

import numpy as np
import pytest
import torch
from PIL import Image

from dfcvae_dist.evaluation.studies import (ALPHA_LABELS, ALPHAS, HAS_COLOUR, LACKS_COLOUR, interpolation_figure,
                                            samples_figure)
from dfcvae_dist.figures import cell_box, read_layout
from dfcvae_dist.models import VAE

from tests.helpers import run_tool

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def latents(trained_run, shard_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents")
    run_tool("extract_latents.py", "--checkpoint", trained_run, "--shards", shard_dir, "--out", out)
    return out / "latents.npz"


def test_every_figure_is_titled_labelled_and_upscaled(tmp_path, trained_run, shard_dir, latents):
    run_tool("explore_latents.py", "--checkpoint", trained_run, "--latents", latents, "--shards", shard_dir,
             "--split", "train", "--tsne-images", "300", "--out", tmp_path, "--attributes", "Smiling,Eyeglasses")
    layouts = {name: read_layout(tmp_path / f"{name}.png") for name in
               ("samples", "reconstructions", "interpolation", "arithmetic")}
    for name, layout in layouts.items():
        assert layout["cell_px"] == 128 and layout["title"], name  # 32x32 faces, 4 x 4 pixels each
        assert Image.open(tmp_path / f"{name}.png").size == tuple(layout["size"])
    assert (layouts["samples"]["rows"], layouts["samples"]["columns"]) == ([""] * 8, 8)
    assert layouts["reconstructions"]["rows"] == ["input", "reconstruction"]
    assert layouts["interpolation"]["rows"] == ["images 1 → 2", "images 3 → 4", "images 5 → 6", "random z₁ → z₂"]
    assert layouts["arithmetic"]["rows"] == ["Smiling: without, + α·v", "Smiling: with, − α·v",
                                             "Eyeglasses: without, + α·v", "Eyeglasses: with, − α·v"]
    assert layouts["interpolation"]["column_labels"] == layouts["arithmetic"]["column_labels"] == ALPHA_LABELS
    assert ALPHA_LABELS[0] == "α = 0.0" and ALPHA_LABELS[-1] == "α = 1.0"
    tsne = np.asarray(Image.open(tmp_path / "tsne.png").convert("RGB"))
    assert tsne.shape[0] > 40 * 40 and tsne.shape[1] == 40 * 40  # 32 px faces in a 3 px frame and 1 px of white
    for colour in (HAS_COLOUR, LACKS_COLOUR):  # the frames (Smiling or not) and their legend
        assert (tsne == [int(colour[k:k + 2], 16) for k in (1, 3, 5)]).all(-1).sum() > 1000, colour
    assert Image.open(tmp_path / "attribute_correlation.png").size[0] >= 600


def test_unknown_attribute_is_named(tmp_path, trained_run, shard_dir, latents):
    proc = run_tool("explore_latents.py", "--checkpoint", trained_run, "--latents", latents, "--shards", shard_dir,
                    "--out", tmp_path, "--attributes", "Smiling,Wings", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown attribute(s) Wings; known:")


class PixelAutoencoder:
    """Latent = the image's pixels, so each cell of an interpolation row is known exactly."""

    def encode(self, x):
        return x.flatten(1), x.new_zeros(len(x), 0)

    def decode(self, z):
        return z.view(-1, 3, 32, 32)


def as_saved(images):
    """What a figure shows of images in [0, 1]: N x H x W x 3 ints, each pixel drawn as 4 x 4 (32 px -> 128 px)."""
    images = torch.nn.functional.interpolate(images, scale_factor=4, mode="nearest")
    return (images * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy().astype(int)


def grid_cell(path, row, col):
    return np.asarray(Image.open(path).convert("RGB").crop(cell_box(read_layout(path), row, col))).astype(int)


def test_interpolation_rows_go_linearly_from_one_encoded_image_to_the_other(tmp_path):
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    path = interpolation_figure(PixelAutoencoder(), images, tmp_path, seed=0)
    for pair in range(3):
        left, right = images[2 * pair], images[2 * pair + 1]
        assert (grid_cell(path, pair, 0) == as_saved(left[None])[0]).all()
        assert (grid_cell(path, pair, len(ALPHAS) - 1) == as_saved(right[None])[0]).all()
        assert np.abs(grid_cell(path, pair, 5) - as_saved(((left + right) / 2)[None])[0]).max() <= 1


def test_same_seed_gives_identical_samples_another_seed_other_samples(tmp_path):
    torch.manual_seed(0)
    model = VAE(32, latent_dim=16, base_channels=8).eval()
    for name in "abc":
        (tmp_path / name).mkdir()
    a, b, c = (samples_figure(model, tmp_path / name, seed).read_bytes()
               for name, seed in zip("abc", (0, 0, 1), strict=True))
    assert a == b and a != c
