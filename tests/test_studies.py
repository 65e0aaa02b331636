"""Latent-space studies: every figure is written with the expected grid; unknown attributes are refused."""

import numpy as np
import pytest
import torch
from PIL import Image

from dfcvae_dist.evaluation.studies import ALPHAS, interpolation_figure, samples_figure
from dfcvae_dist.models import VAE

from tests.conftest import run_tool

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def latents(trained_run, shard_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents")
    run_tool("extract_latents.py", "--checkpoint", trained_run, "--shards", shard_dir, "--out", out)
    return out / "latents.npz"


def test_every_figure_with_its_grid(tmp_path, trained_run, shard_dir, latents):
    run_tool("explore_latents.py", "--checkpoint", trained_run, "--latents", latents, "--shards", shard_dir,
             "--split", "train", "--tsne-images", "300", "--out", tmp_path, "--attributes", "Smiling,Eyeglasses")
    cell = 32 + 2  # image + padding
    sizes = {name: Image.open(tmp_path / name).size for name in
             ("samples.png", "reconstructions.png", "interpolation.png", "arithmetic.png", "tsne.png")}
    assert sizes["samples.png"] == (8 * cell + 2, 8 * cell + 2)
    assert sizes["reconstructions.png"] == (8 * cell + 2, 2 * cell + 2)
    assert sizes["interpolation.png"] == (11 * cell + 2, 4 * cell + 2)  # 3 encoded pairs + 1 random pair
    assert sizes["arithmetic.png"] == (11 * cell + 2, 4 * cell + 2)  # +v and -v rows per attribute
    assert sizes["tsne.png"] == (40 * 32, 40 * 32)
    assert Image.open(tmp_path / "attribute_correlation.png").size[0] >= 600


def test_unknown_attribute_is_named(tmp_path, trained_run, shard_dir, latents):
    proc = run_tool("explore_latents.py", "--checkpoint", trained_run, "--latents", latents, "--shards", shard_dir,
                    "--out", tmp_path, "--attributes", "Smiling,Wings", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: unknown attribute(s) Wings; known:")


class PixelAutoencoder:
    """Latent = the image's pixels, so each cell of an interpolation row is known exactly."""

    def encode(self, x):
        return x.flatten(1), x.new_zeros(len(x), 0)

    def decode(self, z):
        return z.view(-1, 3, 32, 32)


def as_saved(images):
    """What torchvision's save_image writes for images in [0, 1]: N x H x W x 3 ints."""
    return (images * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy().astype(int)


def grid_cell(path, row, col, size=32, padding=2):
    grid = np.asarray(Image.open(path).convert("RGB")).astype(int)
    top, left = padding + row * (size + padding), padding + col * (size + padding)
    return grid[top:top + size, left:left + size]


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
    a, b, c = (samples_figure(model, tmp_path / name, seed).read_bytes() for name, seed in zip("abc", (0, 0, 1)))
    assert a == b and a != c
