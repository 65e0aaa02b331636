"""Image-quality metrics mean what they mean in papers: our SSIM agrees with scikit-image's, our FID pipeline
feeds FID's Inception exactly as torch-fidelity does, MS-SSIM and LPIPS say why they are n/a; the blur ratio
is ours; `dfcvae-quality` writes quality.json in the shared schema, an FID and a sample figure per sampler (N(0, I),
a Gaussian mixture fitted to the training latents), and logs into each model's MLflow run."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dfcvae_dist.cli.quality import main as quality_main
from dfcvae_dist.data.shards import manifest_digest, read_manifest
from dfcvae_dist.evaluation.samplers import extracted_train_latents
from dfcvae_dist.inference import GaussianMixtureSampler, load_trained, sample
from dfcvae_dist.evaluation.quality import (FID_WEIGHTS_FILE, LPIPS_BACKBONE_FILE, add_fid_images, fid_metric,
                                            lpips_or_reason, ms_ssim, ms_ssim_betas, ms_ssim_scales,
                                            reconstruction_metrics, ssim)
from dfcvae_dist.losses import FeaturePerceptualLoss
from dfcvae_dist.figures import cell_box, read_layout, to_bytes, upscale
from tests.helpers import run_tool


class Autoencoder(nn.Module):
    """The image itself as its latent; `decode` blurs it with a k x k box filter (k = 1: no blur)."""

    def __init__(self, blur: int):
        super().__init__()
        self.blur = blur

    def encode(self, x):
        return x, torch.zeros_like(x)

    def decode(self, z):
        return F.avg_pool2d(z, self.blur, stride=1, padding=self.blur // 2, count_include_pad=False)


def images(n=4, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_ssim_agrees_with_scikit_image_on_a_fixed_pair():
    from skimage.metrics import structural_similarity

    x = images(2, seed=3)
    y = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))).clamp(0, 1)
    reference = [structural_similarity(y[i].double().numpy(), x[i].double().numpy(), gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, data_range=1, channel_axis=0) for i in range(2)]
    torch.testing.assert_close(ssim(y, x).double(), torch.tensor(reference, dtype=torch.float64), rtol=0, atol=2e-6)


def test_ssim_of_an_image_with_itself_is_one_and_falls_as_noise_rises():
    x = images()
    assert torch.allclose(ssim(x, x), torch.ones(len(x)), atol=1e-6)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    scores = [ssim((x + level * noise).clamp(0, 1), x).mean().item() for level in (0.02, 0.1, 0.3)]
    assert 1 > scores[0] > scores[1] > scores[2]


def test_ms_ssim_uses_five_scales_from_176_px_three_at_64_px_none_at_32_px():
    assert [ms_ssim_scales(size) for size in (256, 176, 175, 64, 44, 43, 32)] == [5, 5, 3, 3, 3, None, None]
    assert sum(ms_ssim_betas(3)) == pytest.approx(1) and ms_ssim_betas(3)[0] == pytest.approx(0.0448 / 0.6305)
    x = images(2, size=64)
    assert torch.allclose(ms_ssim(x, x, 3), torch.ones(2), atol=1e-5)
    assert (ms_ssim(Autoencoder(blur=5).decode(x), x, 3) < 0.9).all()


def test_blurring_model_has_blur_ratio_below_one_identity_model_exactly_one():
    perceptual = FeaturePerceptualLoss(["relu1_2"], weights="random")
    batches = images(8).split(4)
    identity = reconstruction_metrics(Autoencoder(blur=1), batches, perceptual)
    blurred = reconstruction_metrics(Autoencoder(blur=5), batches, perceptual)
    assert identity["blur_ratio"] == pytest.approx(1.0) and identity["mse"] == 0 and identity["images"] == 8
    assert identity["ssim"] == pytest.approx(1.0, abs=1e-6) and identity["perceptual_distance"] == 0
    assert identity["ms_ssim"] is None and identity["lpips"] is None  # not asked for: n/a, never a made-up number
    assert blurred["blur_ratio"] < 0.5 and blurred["mse"] > 0 and blurred["ssim"] < 1
    assert blurred["perceptual_distance"] > 0


def test_lpips_without_its_backbone_weights_is_na_naming_the_file_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    net, note = lpips_or_reason()
    assert net is None and note.startswith(f"n/a: LPIPS needs torchvision's ImageNet AlexNet, {LPIPS_BACKBONE_FILE}")
    assert f"into {tmp_path / 'torch' / 'hub' / 'checkpoints'}/" in note


def test_lpips_computation_on_a_random_backbone_is_labelled_not_lpips():
    net, note = lpips_or_reason(random_backbone_not_lpips=True)
    assert note.startswith("NOT LPIPS")
    batches, perceptual = images(4).split(2), FeaturePerceptualLoss(["relu1_2"], weights="random")
    identity = reconstruction_metrics(Autoencoder(blur=1), batches, perceptual, net)
    blurred = reconstruction_metrics(Autoencoder(blur=5), batches, perceptual, net)
    assert identity["lpips"] == pytest.approx(0, abs=1e-7) and blurred["lpips"] > 0


def random_fid_inception(path):
    """A random state dict of FID's Inception (torch-fidelity's layout), He-scaled so features follow the input."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Layout(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True):  # built only for its keys and shapes
            return None

    torch.save({}, path.with_suffix(".empty"))
    g = torch.Generator().manual_seed(0)

    def random(key, value):
        if key.endswith("conv.weight") or key == "fc.weight":
            return torch.randn(value.shape, generator=g) * math.sqrt(2 / value[0].numel())
        if key.endswith("bn.weight"):
            return 1 + 0.1 * torch.randn(value.shape, generator=g)
        return 0.1 * torch.randn(value.shape, generator=g) if key.endswith("bias") else value

    layout = Layout("layout", ["2048"], feature_extractor_weights_path=str(path.with_suffix(".empty")))
    torch.save({key: random(key, value) for key, value in layout.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory):
    return random_fid_inception(tmp_path_factory.mktemp("fid") / FID_WEIGHTS_FILE)


def test_our_fid_pipeline_feeds_inception_exactly_as_torch_fidelity_does(fid_weights):
    """Same random weights in both; our [0, 1] floats, off the uint8 grid as decoder outputs are, must reach
    the network as the rounded uint8 image torch-fidelity reads, resized as it resizes (TF1 bilinear)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    g = torch.Generator().manual_seed(1)
    as_stored = torch.randint(1, 255, (2, 3, 32, 32), dtype=torch.uint8, generator=g)
    ours = (as_stored.float() + torch.rand(as_stored.shape, generator=g) * 0.8 - 0.4) / 255
    reference = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                            feature_extractor_weights_path=str(fid_weights)).eval()
    with torch.no_grad():
        expected = reference(as_stored)[0].double()
    metric = fid_metric(fid_weights)
    assert add_fid_images(metric, [ours], real=True) == 2
    torch.testing.assert_close(metric.real_features_sum, expected.sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metric.real_features_cov_sum, expected.T @ expected, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    """30 synthetic faces: a test split of 3 images, fewer than any --fid-samples."""
    from dfcvae_dist.cli.shards import main as make_shards
    from dfcvae_dist.data.synthetic import make_synthetic_celeba

    root = tmp_path_factory.mktemp("tiny")
    make_synthetic_celeba(root / "celeba", num=30, seed=0, workers=1)
    assert make_shards(["--celeba-root", str(root / "celeba"), "--out", str(root / "shards"), "--image-size", "32",
                        "--shard-size", "10", "--workers", "1"]) == 0
    return root / "shards"


def dcgan_checkpoint(folder):
    """A DCGAN checkpoint folder as the trainer writes one (config.yaml + weights.safetensors), random weights."""
    from safetensors.torch import save_file

    from dfcvae_dist.models.dcgan import DCGAN

    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("model:\n  name: dcgan\n  image_size: 32\n  base_channels: 8\n")
    save_file(DCGAN(latent_dim=100, base_channels=8, image_size=32).state_dict(), folder / "weights.safetensors")
    return folder


def test_quality_json_in_the_shared_schema_logged_into_each_tracked_models_run(
        tmp_path, trained_run, tiny_shards, fid_weights, mlflow_server):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run_id = client.create_run(client.create_experiment("quality")).info.run_id
    tracked = shutil.copytree(trained_run, tmp_path / "tracked")
    summary = json.loads((tracked / "COMPLETED.json").read_text())
    (tracked / "COMPLETED.json").write_text(json.dumps({**summary, "mlflow_run_id": run_id}))
    gan_checkpoint = dcgan_checkpoint(tmp_path / "gan")
    proc = run_tool("quality.py", "--checkpoint", f"vae={tracked}", "--checkpoint", f"gan={gan_checkpoint}",
                    "--shards", tiny_shards, "--vgg-weights", "random",
                    "--fid-weights", fid_weights, "--out", tmp_path / "out",
                    env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "TORCH_HOME": str(tmp_path / "torch")})
    out = tmp_path / "out"
    quality = json.loads((out / "quality.json").read_text())
    vae, gan = quality["models"]["vae"], quality["models"]["gan"]
    assert list(vae) == ["checkpoint", "family", "split", "images", "mse", "ssim", "ms_ssim", "lpips", "blur_ratio",
                         "perceptual_distance", "fid", "fid_gmm", "fid_samples", "gmm", "samples"]
    assert list(gan) == list(vae)
    assert vae["family"] == "dfcvae" and vae["images"] == 3 and 0 < vae["mse"] < 1 and vae["fid"] > 0
    assert vae["ms_ssim"] is None and vae["lpips"] is None and vae["fid_samples"] == 3
    assert vae["fid_gmm"] > 0 and vae["fid_gmm"] != vae["fid"]
    train_images = read_manifest(tiny_shards)["splits"]["train"]["num_samples"]
    assert vae["gmm"] == {"components": 10, "fit_images": train_images, "file": "gmm-vae.safetensors",
                          "fit_on": f"the train split of {tiny_shards}, encoded"}  # the run has no extracted latents
    assert gan["family"] == "dcgan" and gan["fid_samples"] == 3 and gan["fid"] > 0
    assert all(gan[key] is None for key in ("mse", "ssim", "ms_ssim", "lpips", "blur_ratio", "perceptual_distance",
                                            "fid_gmm", "gmm"))
    notes = quality["notes"]
    assert notes["fid"].startswith("FID of 3 samples from N(0, I) against 3 test images (10,000 asked; the test split "
                                   "has 3)") and str(fid_weights) in notes["fid"]
    assert notes["fid_gmm"].startswith("FID of 3 samples decoded from z drawn from a Gaussian mixture fitted to the "
                                       "model's training latents")
    assert notes["fid_gmm"].endswith("null for gan: no encoder, so no training latents to fit a mixture to")
    assert "null for gan: a GAN has no encoder" in notes["ssim"] and "below the 44 px" in notes["ms_ssim"]
    assert LPIPS_BACKBONE_FILE in notes["lpips"] and "not comparable" in notes["perceptual_distance"]
    assert f"MLflow: vae logged into run {run_id}" in proc.stdout
    assert proc.stdout.strip().splitlines()[-3:] == [  # it ends with each model's headline numbers
        "headline (test split; every number in the table above):",
        f"  vae: SSIM {vae['ssim']:.4f}, LPIPS n/a, FID {vae['fid']:.2f}",
        f"  gan: SSIM n/a, LPIPS n/a, FID {gan['fid']:.2f}"]
    metrics = client.get_run(run_id).data.metrics
    assert metrics["eval/quality/mse"] == pytest.approx(vae["mse"]) and metrics["eval/quality/fid_samples"] == 3
    assert metrics["eval/quality/fid"] == pytest.approx(vae["fid"]) and "eval/quality/lpips" not in metrics
    assert metrics["eval/quality/fid_gmm"] == pytest.approx(vae["fid_gmm"])
    assert {a.path for a in client.list_artifacts(run_id, "evaluation")} == {
        "evaluation/quality.json", "evaluation/samples-normal-vae.png", "evaluation/samples-gmm-vae.png",
        "evaluation/gmm-vae.safetensors"}
    assert gan["samples"] == {"normal": "samples-normal-gan.png"} and vae["samples"] == {
        "normal": "samples-normal-vae.png", "gmm": "samples-gmm-vae.png"}
    model, _, _ = load_trained(tracked)  # each figure: 8 x 8 of that sampler's samples of seed 0
    for kind, sampler in (("normal", None), ("gmm", GaussianMixtureSampler.load(out / "gmm-vae.safetensors"))):
        path = out / vae["samples"][kind]
        layout = read_layout(path)
        drawn = torch.from_numpy(np.asarray(Image.open(path).convert("RGB").crop(cell_box(layout, 1, 1))))
        expected = to_bytes(upscale(sample(model, 64, 0, sampler)[9:10]))[0].permute(1, 2, 0)
        assert (layout["rows"], layout["columns"]) == ([""] * 8, 8) and torch.equal(drawn, expected)


def test_missing_fid_weights_make_fid_null_with_the_file_its_url_and_where_to_put_it(tmp_path, trained_run,
                                                                                     tiny_shards):
    """The fixture's run was trained with log.enabled=false: it is skipped in one line, and FID is n/a. Only the
    N(0, I) sampler is asked for: no mixture is fitted."""
    proc = run_tool("quality.py", "--checkpoint", f"vae={trained_run}", "--shards", tiny_shards, "--vgg-weights",
                    "random", "--sampler", "normal", "--out", tmp_path,
                    env={**os.environ, "TORCH_HOME": str(tmp_path / "torch"),
                         "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri()})
    assert f"MLflow: vae skipped: {trained_run / 'COMPLETED.json'}: the run was not tracked" in proc.stdout
    assert not (tmp_path / "mlruns").exists()
    quality = json.loads((tmp_path / "quality.json").read_text())
    vae = quality["models"]["vae"]
    assert vae["fid"] is None and vae["fid_samples"] == 0 and vae["fid_gmm"] is None and vae["gmm"] is None
    assert vae["samples"] == {"normal": "samples-normal-vae.png"} and not list(tmp_path.glob("gmm-*"))
    assert quality["notes"]["fid_gmm"] == "n/a: not asked (--sampler normal)"
    note = quality["notes"]["fid"]
    assert note.startswith(f"n/a: FID needs the FID Inception weights {FID_WEIGHTS_FILE}")
    assert f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{FID_WEIGHTS_FILE}" in note
    assert f"--fid-weights PATH, or put it in {tmp_path / 'torch' / 'hub' / 'checkpoints'}/" in note


def test_a_bad_sampler_is_refused_in_one_line_before_the_work(tmp_path, capsys):
    common = ["--checkpoint", f"vae={tmp_path / 'none'}", "--shards", str(tmp_path), "--out", str(tmp_path)]
    for sampler, why in (("gmm:x", "expected normal, gmm or gmm:K (K components, at least 1)"),
                         ("gmm:0", "expected normal, gmm or gmm:K (K components, at least 1)"),
                         ("normal,gmm:5,gmm", "gmm is given twice")):
        assert quality_main([*common, "--sampler", sampler]) == 2
        assert capsys.readouterr().err.splitlines() == [f"error: --sampler {sampler.split(',')[-1]}: {why}"]


def test_training_latents_come_from_the_extraction_only_for_the_same_checkpoint_and_shards(tmp_path, tiny_shards,
                                                                                           shard_dir):
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000006"
    latents = tmp_path / "run" / "eval" / "latents" / "latents.npz"
    latents.parent.mkdir(parents=True)
    mu = np.arange(12.0).reshape(6, 2)

    def extracted(**meta):
        np.savez(latents, mu=mu, partition=np.array([0, 1, 0, 2, 0, 0]), **meta)
        return extracted_train_latents(checkpoint, tiny_shards, limit=3)

    same = {"checkpoint": np.array(str(checkpoint)),
            "shards_digest": np.array(manifest_digest(read_manifest(tiny_shards)))}
    train, source = extracted(**same)
    assert (train == mu[[0, 2, 4]]).all() and source == f"{latents} (train partition)"
    assert extracted(**{**same, "shards_digest": np.array(manifest_digest(read_manifest(shard_dir)))}) is None
    assert extracted(**{**same, "checkpoint": np.array(str(tmp_path / "other" / "step-00000006"))}) is None
    assert extracted(checkpoint=same["checkpoint"]) is None  # extracted before latents.npz named its shards
