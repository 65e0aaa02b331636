"""Reconstruction-quality metrics: SSIM and the blur ratio mean what they say; FID features leave Inception alone."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfcvae_dist.evaluation.quality import inception_features, reconstruction_metrics, ssim
from dfcvae_dist.losses import FeaturePerceptualLoss


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


def test_ssim_of_an_image_with_itself_is_one():
    x = images()
    assert torch.allclose(ssim(x, x), torch.ones(len(x)), atol=1e-6)


def test_ssim_falls_as_noise_rises():
    x = images()
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    scores = [ssim((x + level * noise).clamp(0, 1), x).mean().item() for level in (0.02, 0.1, 0.3)]
    assert 1 > scores[0] > scores[1] > scores[2]


def test_blurring_model_has_blur_ratio_below_one_identity_model_exactly_one():
    perceptual = FeaturePerceptualLoss(["relu1_2"], weights="random")
    batches = images(8).split(4)
    identity = reconstruction_metrics(Autoencoder(blur=1), batches, perceptual)
    blurred = reconstruction_metrics(Autoencoder(blur=5), batches, perceptual)
    assert identity["blur_ratio"] == pytest.approx(1.0) and identity["mse"] == 0 and identity["images"] == 8
    assert identity["ssim"] == pytest.approx(1.0, abs=1e-6) and identity["perceptual"] == 0
    assert blurred["blur_ratio"] < 0.5 and blurred["mse"] > 0 and blurred["ssim"] < 1 and blurred["perceptual"] > 0


def test_inception_features_are_the_pool_features_and_leave_the_callers_model_unchanged():
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    inception = inception_v3(weights=None, aux_logits=True, init_weights=False).eval()
    fc = inception.fc
    x = images(2)
    features = inception_features(inception, x)
    assert inception.fc is fc and isinstance(fc, nn.Linear) and not inception.avgpool._forward_hooks
    reference = copy.deepcopy(inception)
    reference.fc = nn.Identity()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = reference((F.interpolate(x, size=299, mode="bilinear", align_corners=False) - mean) / std)
    assert features.shape == (2, 2048)
    torch.testing.assert_close(features, expected.double(), rtol=1e-5, atol=1e-6)
