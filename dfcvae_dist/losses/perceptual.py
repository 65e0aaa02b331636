"""Feature perceptual loss (paper, section 3.2) on a frozen, truncated feature network (`feature_networks.py`;
VGG19 is the paper's).

Per layer l: L_l = 1 / (2 C W H) * sum_{c,w,h} (s * Phi_l(x) - s * Phi_l(x_hat))^2, averaged over the batch,
where s = `feature_scale` maps torchvision's VGG19 features to the Caffe scale of the released code
(docs/paper-fidelity.md, "Feature scale"). Target features Phi(x) are computed under no_grad in their own
pass; only x_hat runs through the network with autograd. The network runs in its own dtype (fp16 on CUDA by
default); the distances are reduced in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfcvae_dist.config import LossConfig
from dfcvae_dist.errors import UserError
from dfcvae_dist.losses.feature_networks import FeatureNetwork, resolve_dtype


class FeaturePerceptualLoss(nn.Module):
    """Per-layer feature perceptual losses between x (target) and x_hat; never trained, never wrapped by DDP."""

    def __init__(self, layers: list[str], layer_weights: list[float] | None = None, feature_scale: float = 1.0,
                 weights: str = "imagenet", seed: int = 0, dtype: torch.dtype = torch.float32,
                 network: str = "vgg19"):
        super().__init__()
        if layer_weights is not None and len(layer_weights) != len(layers):
            raise UserError(f"loss.layer_weights has {len(layer_weights)} entries for {len(layers)} layers")
        self.features = FeatureNetwork(network, layers, weights, seed, dtype)
        self.weights = dict(zip(layers, layer_weights or [1.0] * len(layers), strict=True))
        self.feature_scale = feature_scale

    @classmethod
    def from_config(cls, cfg: LossConfig, device: torch.device) -> "FeaturePerceptualLoss":
        return cls(cfg.layers, cfg.layer_weights, cfg.feature_scale, cfg.network_weights, cfg.network_seed,
                   resolve_dtype(cfg.network_dtype, device), cfg.network).to(device)

    @property
    def weights_source(self) -> str:
        return self.features.weights_source

    @property
    def dtype(self) -> torch.dtype:
        return self.features.dtype

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            target = self.features(x)
        recon = self.features(x_hat)
        scale2 = self.feature_scale**2
        return {
            name: self.weights[name] * scale2 * 0.5 * F.mse_loss(recon[name].float(), target[name].float())
            for name in self.features.layers
        }
