"""Offline reconstruction-quality metrics, so DFC-VAE and PVAE compare by numbers: pixel MSE, SSIM, a blur
ratio (variance of the Laplacian of reconstructions over that of the inputs: 1 = as sharp, < 1 = blurrier)
and the feature perceptual distance; FID only where Inception weights are available."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dfcvae_dist.imagenet import imagenet_normalize


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM per image (Gaussian window, constants of Wang et al. for images in [0, 1])."""
    coords = torch.arange(window, dtype=x.dtype) - window // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum()).to(x.device)
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, window, window)
    blur = lambda t: F.conv2d(t, kernel, groups=x.shape[1])  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def laplacian_variance(x: torch.Tensor) -> torch.Tensor:
    gray = x.mean(1, keepdim=True)
    kernel = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]], device=x.device).view(1, 1, 3, 3)
    return F.conv2d(gray, kernel).flatten(1).var(1)


@torch.no_grad()
def reconstruction_metrics(model, batches, perceptual) -> dict[str, float]:
    """Means over all images of `batches` (tensors in [0, 1]); reconstructions from the mean latent."""
    sums = {"mse": 0.0, "ssim": 0.0, "blur_ratio_num": 0.0, "blur_ratio_den": 0.0, "perceptual": 0.0}
    n = 0
    for x in batches:
        mu, _ = model.encode(x)
        x_hat = model.decode(mu)
        sums["mse"] += F.mse_loss(x_hat, x, reduction="none").flatten(1).mean(1).sum().item()
        sums["ssim"] += ssim(x_hat, x).sum().item()
        sums["blur_ratio_num"] += laplacian_variance(x_hat).sum().item()
        sums["blur_ratio_den"] += laplacian_variance(x).sum().item()
        sums["perceptual"] += sum(perceptual(x, x_hat).values()).item() * x.shape[0]
        n += x.shape[0]
    return {"images": n, "mse": sums["mse"] / n, "ssim": sums["ssim"] / n,
            "blur_ratio": sums["blur_ratio_num"] / max(sums["blur_ratio_den"], 1e-12),
            "perceptual": sums["perceptual"] / n}


def inception_or_reason():
    """torchvision's Inception v3 for FID, or the reason it is not available (offline, not cached)."""
    from torchvision.models import Inception_V3_Weights, inception_v3

    try:
        return inception_v3(weights=Inception_V3_Weights.IMAGENET1K_V1, aux_logits=True).eval(), None
    except (OSError, RuntimeError) as err:
        return None, (f"FID skipped: Inception v3 weights are not cached and cannot be downloaded ({err}); place "
                      f"{Inception_V3_Weights.IMAGENET1K_V1.url.rsplit('/', 1)[1]} in torch's hub cache to enable it")


@torch.no_grad()
def inception_features(inception, images: torch.Tensor, batch: int = 100) -> torch.Tensor:
    """2048-d pool features of Inception v3 for images in [0, 1] (resized to 299, ImageNet-normalised).
    Read by a hook on the pool layer that is removed afterwards, so the caller's model keeps its `fc`."""
    pooled = []
    hook = inception.avgpool.register_forward_hook(lambda module, args, out: pooled.append(out.flatten(1)))
    try:
        for x in images.split(batch):
            inception(imagenet_normalize(F.interpolate(x, size=299, mode="bilinear", align_corners=False)))
    finally:
        hook.remove()
    return torch.cat(pooled).double()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)) between two feature sets (N x D)."""
    from scipy import linalg

    a, b = a.numpy(), b.numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.from_numpy(a).T.cov().numpy(), torch.from_numpy(b).T.cov().numpy()
    root = linalg.sqrtm(cov_a @ cov_b)
    root = root.real if hasattr(root, "real") else root
    return float(((mu_a - mu_b) ** 2).sum() + (cov_a + cov_b - 2 * root).trace())
