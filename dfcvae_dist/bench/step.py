"""The training step as the trainer runs it (truncated VGG, targets under no_grad, channels-last, autocast,
optionally the compiled loss) and a plain reference step, on any device, in any precision."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dfcvae_dist.bench.timing import sustained_seconds
from dfcvae_dist.imagenet import PAPER_LAYERS, imagenet_normalize
from dfcvae_dist.losses import FeaturePerceptualLoss, load_network, vae_loss
from dfcvae_dist.losses.feature_networks import vgg_relu_nodes
from dfcvae_dist.models import VAE, init_weights

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FEATURE_SCALE = 57.6  # the trainer's scale for random VGG weights; it does not change the cost


class PlainReference(nn.Module):
    """A DFC-VAE loss the way most public implementations write it: VGG19's full `features` stack (all 16
    convolutions) in fp32, x and x_hat through it in two separate passes (x detached), no truncation."""

    def __init__(self):
        super().__init__()
        vgg, _ = load_network("vgg19", "random", seed=0)
        self.features = vgg.features.requires_grad_(False).eval()
        self.taps = {int(vgg_relu_nodes("vgg19")[n].removeprefix("features.")) for n in PAPER_LAYERS["123"]}

    def taps_of(self, x):
        out, h = [], imagenet_normalize(x)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.taps:
                out.append(h)
        return out

    def forward(self, x, x_hat):
        return sum(F.mse_loss(a, b) for a, b in zip(self.taps_of(x_hat), self.taps_of(x.detach())))


def train_step(device: torch.device, batch: int, size: int, precision: str = "fp32", compiled: bool = False,
               plain: bool = False) -> Callable[[], None]:
    """One optimizer step of a 64-channel-base VAE on a fixed random batch. Ours: loss network in
    `precision` (the trainer's loss.network_dtype), the model under autocast (its train.mixed_precision; fp16
    with a gradient scaler), everything channels-last. Plain: the reference loss in fp32, contiguous."""
    torch.manual_seed(0)
    dtype = PRECISIONS[precision]
    model = init_weights(VAE(size), "normal").to(device)
    x = torch.rand(batch, 3, size, size, device=device)
    if plain:
        loss = PlainReference().to(device)
    else:
        loss = FeaturePerceptualLoss(list(PAPER_LAYERS["123"]), feature_scale=FEATURE_SCALE, weights="random",
                                     dtype=dtype).to(device)
        model, loss = model.to(memory_format=torch.channels_last), loss.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        if compiled:
            loss.compile()
    optimizer = torch.optim.Adam(model.parameters(), 5e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            x_hat, mu, logvar = model(x)
            total = loss(x, x_hat) if plain else vae_loss(x, x_hat, mu, logvar, 1.0, 0.8, loss)["total"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def step_flops_per_image(device: torch.device, batch: int, size: int, plain: bool = False) -> float:
    """FLOPs of one eager fp32 step (forward, backward, optimizer) per image, as torch counts them."""
    step = train_step(device, batch, size, plain=plain)
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / batch


def slow_precision_reason(device: torch.device, precision: str, n: int = 512, slower: float = 4.0) -> str | None:
    """Why a training step in `precision` is not worth timing here, or None. Some CPUs emulate fp16/bf16
    matmuls tens to hundreds of times slower than fp32: measured, not assumed, since newer CPUs do not."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        supported = precision == "fp16" or torch.cuda.is_bf16_supported()
        return None if supported else f"{precision} is not supported by {torch.cuda.get_device_name(device)}"
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    fp32 = sustained_seconds(lambda: a @ b, 0.2)
    low_a, low_b = a.to(PRECISIONS[precision]), b.to(PRECISIONS[precision])
    ratio = sustained_seconds(lambda: low_a @ low_b, 0.2) / fp32
    if ratio < slower:
        return None
    return f"{precision} matmul is {ratio:.0f}x slower than fp32 on this CPU ({n}x{n}): not worth a training step"
