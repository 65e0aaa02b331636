"""Feature perceptual loss (paper, section 3.2) on a frozen, truncated torchvision VGG19.

Per layer l: L_l = 1 / (2 C W H) * sum_{c,w,h} (s * Phi_l(x) - s * Phi_l(x_hat))^2, averaged over the batch,
where s = `feature_scale` maps torchvision's features to the Caffe scale of the released code
(docs/paper-fidelity.md, "Feature scale"). Target features Phi(x) are computed under no_grad in their own
pass; only x_hat runs through VGG with autograd. VGG runs in its own dtype (fp16 on CUDA by default); the distances are
reduced in fp32.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import VGG19_Weights, vgg19
from torchvision.models.vgg import cfgs as vgg_cfgs

from dfcvae_dist.config import VGG_LAYER_NAMES, LossConfig
from dfcvae_dist.errors import UserError
from dfcvae_dist.imagenet import imagenet_normalize

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def vgg19_layer_indices() -> dict[str, int]:
    """`relu{block}_{i}` -> index in torchvision's `vgg19().features`, from torchvision's own layer list
    (each number is a conv + ReLU, each 'M' a max-pool)."""
    indices, index, block, conv = {}, 0, 1, 0
    for item in vgg_cfgs["E"]:
        if item == "M":
            index, block, conv = index + 1, block + 1, 0
        else:
            conv += 1
            indices[f"relu{block}_{conv}"] = index + 1
            index += 2
    assert list(indices) == VGG_LAYER_NAMES
    return indices


VGG19_LAYERS = vgg19_layer_indices()


def imagenet_cache_path() -> Path:
    url = VGG19_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]


def load_vgg19(source: str, seed: int = 0) -> tuple[nn.Module, str]:
    """A VGG19 and a description of its weights: 'imagenet', 'random(seed=N)' or 'file:PATH'."""
    if source == "random":
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = vgg19(weights=None)
        log.warning("VGG19 loss network has RANDOM weights (seed %d): results are not the paper's", seed)
        return model, f"random(seed={seed})"
    if source == "imagenet":
        try:
            return vgg19(weights=VGG19_Weights.IMAGENET1K_V1), "imagenet"
        except (OSError, RuntimeError) as err:  # URLError is an OSError
            raise UserError(
                f"VGG19 ImageNet weights are not cached and cannot be downloaded ({err}). Place the file "
                f"{VGG19_Weights.IMAGENET1K_V1.url.rsplit('/', 1)[1]} at {imagenet_cache_path()} (fetch it on a "
                "machine with internet: `python tools/fetch_vgg19.py --out vgg19.pth`, then copy it there), or "
                "set loss.vgg_weights=/path/to/vgg19.pth"
            ) from None
    path = Path(source)
    if not path.is_file():
        raise UserError(f"loss.vgg_weights: '{source}' is neither imagenet, random nor an existing file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling refusal or corrupt file
        raise UserError(f"{path}: not a loadable VGG19 state dict ({err})") from None
    model = vgg19(weights=None)
    if not any(k.startswith("features.") for k in state):
        state = {f"features.{k}": v for k, v in state.items()}
        missing = model.load_state_dict(state, strict=False).missing_keys
        missing = [k for k in missing if k.startswith("features.")]
    else:
        try:
            missing = model.load_state_dict(state, strict=True).missing_keys
        except RuntimeError as err:
            raise UserError(f"{path}: does not match torchvision's VGG19 ({str(err).splitlines()[0]})") from None
    if missing:
        raise UserError(f"{path}: does not match torchvision's VGG19 (missing {missing[0]})")
    return model, f"file:{path}"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


class VGG19Features(nn.Module):
    """VGG19 `features` truncated after the deepest requested layer; returns {layer: activation}."""

    def __init__(self, layers: list[str], source: str = "imagenet", seed: int = 0):
        super().__init__()
        self.layers = list(layers)
        self.index = {VGG19_LAYERS[name]: name for name in self.layers}
        model, self.weights_source = load_vgg19(source, seed)
        self.features = model.features[: max(self.index) + 1]
        self.requires_grad_(False).eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.features[0].weight.dtype

    def train(self, mode: bool = True) -> "VGG19Features":
        return super().train(False)  # always eval: the loss network is frozen

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = imagenet_normalize(x).to(self.dtype)
        out = {}
        for index, module in enumerate(self.features):
            h = module(h)
            if index in self.index:
                out[self.index[index]] = h
        return out


class FeaturePerceptualLoss(nn.Module):
    """Per-layer feature perceptual losses between x (target) and x_hat; never trained, never wrapped by DDP."""

    def __init__(self, layers: list[str], layer_weights: list[float] | None = None, feature_scale: float = 1.0,
                 weights: str = "imagenet", seed: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        if layer_weights is not None and len(layer_weights) != len(layers):
            raise UserError(f"loss.layer_weights has {len(layer_weights)} entries for {len(layers)} layers")
        self.vgg = VGG19Features(layers, weights, seed).to(dtype)
        self.weights = dict(zip(layers, layer_weights or [1.0] * len(layers)))
        self.feature_scale = feature_scale

    @classmethod
    def from_config(cls, cfg: LossConfig, device: torch.device) -> "FeaturePerceptualLoss":
        loss = cls(cfg.layers, cfg.layer_weights, cfg.feature_scale, cfg.vgg_weights, cfg.vgg_seed,
                  resolve_dtype(cfg.vgg_dtype, device)).to(device)
        if cfg.compile:
            loss.compile()
        return loss

    @property
    def weights_source(self) -> str:
        return self.vgg.weights_source

    @property
    def dtype(self) -> torch.dtype:
        return self.vgg.dtype

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            target = self.vgg(x.to(self.dtype))
        recon = self.vgg(x_hat.to(self.dtype))
        scale2 = self.feature_scale**2
        return {
            name: self.weights[name] * scale2 * 0.5 * F.mse_loss(recon[name].float(), target[name].float())
            for name in self.vgg.layers
        }
