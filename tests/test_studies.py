"""Latent-space studies: every figure is written with the expected grid; unknown attributes are refused."""

import json

import pytest
from PIL import Image

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


def test_quality_table_for_two_models(tmp_path, trained_run, shard_dir):
    proc = run_tool("quality.py", "--checkpoint", f"a={trained_run}", "--checkpoint", f"b={trained_run}",
                    "--shards", shard_dir, "--vgg-weights", "random", "--max-images", "40", "--fid", "--out", tmp_path)
    result = json.loads((tmp_path / "quality.json").read_text())
    a = result["models"]["a"]
    assert a == {**result["models"]["b"]} and a["images"] == 40
    assert 0 < a["mse"] < 1 and -1 <= a["ssim"] <= 1 and a["blur_ratio"] > 0 and a["perceptual"] > 0
    assert "FID skipped: Inception v3 weights are not cached" in result["note"]
    assert "random(seed=0)" in result["note"] and "FID" in proc.stdout


def test_frechet_distance_of_gaussians():
    import torch

    from dfcvae_dist.evaluation.quality import frechet_distance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4000, 3, generator=g, dtype=torch.float64) * 2 + 1
    # closed form: |1|^2 * 3 + 3 * (1 + 4 - 2 * 2) = 6
    assert frechet_distance(a, b) == pytest.approx(6.0, abs=0.3)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)

