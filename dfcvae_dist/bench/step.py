"""The training step as the trainer runs it (truncated VGG, targets under no_grad, channels-last, autocast, the
trainer's Adam and gradient norm, `train.compile` off, loss or step) and a plain reference step, on any device, in
any precision."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dfcvae_dist.bench.timing import sustained_seconds
from dfcvae_dist.config import OptimConfig
from dfcvae_dist.imagenet import PAPER_LAYERS, imagenet_normalize
from dfcvae_dist.losses import FeaturePerceptualLoss, load_network, vae_loss
from dfcvae_dist.losses.feature_networks import vgg_relu_nodes
from dfcvae_dist.models import VAE, init_weights
from dfcvae_dist.training.compiled import CompiledStep
from dfcvae_dist.training.recipes import adam

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FEATURE_SCALE = 57.6  # the trainer's scale for random VGG weights; it does not change the cost
COMPILE_NAMES = {"off": "eager", "loss": "compiled", "step": "step"}  # in variant names; compiled: the loss only


@dataclass(frozen=True)
class StepVariant:
    """One way a user runs our step: the model's autocast (`train.mixed_precision`), the loss network's dtype
    (`loss.network_dtype`), `train.compile` and the paper's loss (`123` or `345`)."""

    precision: str = "fp32"
    network_dtype: str = "fp32"
    compile: str = "off"
    layers: str = "123"

    def settings(self) -> dict:
        return asdict(self)


def step_variants(device: torch.device, precisions: list[str], compile_modes: list[str]) -> dict[str, StepVariant]:
    """`<precision>_<eager|compiled|step>`: model and loss network in one precision, in each compile mode; and what
    the trainer runs by default on this device (fp32 model, loss network fp16 on CUDA, fp32 on CPU, no compiling),
    as `default` and with `train.compile=step` (`default_step`) where that is not already among them, and with the
    345 loss (`default_345`)."""
    variants = {f"{p}_{COMPILE_NAMES[mode]}": StepVariant(p, p, mode) for p in precisions for mode in compile_modes}
    network = "fp16" if device.type == "cuda" else "fp32"
    defaults = {"default": StepVariant("fp32", network), "default_step": StepVariant("fp32", network, "step"),
                "default_345": StepVariant("fp32", network, layers="345")}
    known = set(variants.values())
    return {**variants, **{name: v for name, v in defaults.items()
                           if v not in known and (v.compile in compile_modes or v.compile == "off")}}


class PlainReference(nn.Module):
    """A DFC-VAE loss the way most public implementations write it: VGG19's full `features` stack (all 16
    convolutions) in fp32, x and x_hat through it in two separate passes (x detached), no truncation."""

    def __init__(self):
        super().__init__()
        vgg, _ = load_network("vgg19", "random", seed=0, head=False)
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
        return sum(F.mse_loss(a, b) for a, b in zip(self.taps_of(x_hat), self.taps_of(x.detach()), strict=True))


def plain_step(device: torch.device, batch: int, size: int) -> Callable[[], None]:
    """One optimizer step of the plain reference: its loss in fp32, contiguous, torch's default Adam."""
    torch.manual_seed(0)
    model = init_weights(VAE(size), "normal").to(device)
    x = torch.rand(batch, 3, size, size, device=device)
    loss = PlainReference().to(device)
    optimizer = torch.optim.Adam(model.parameters(), 5e-4)

    def step():
        x_hat, _, _ = model(x)
        optimizer.zero_grad(set_to_none=True)
        loss(x, x_hat).backward()
        optimizer.step()

    return step


def train_step(device: torch.device, batch: int, size: int, variant: StepVariant = StepVariant()) -> Callable[[], None]:
    """One optimizer step of a 64-channel-base VAE on a fixed random batch, as the trainer takes it in `variant`:
    the model under autocast (fp16 with a gradient scaler), everything channels-last, the trainer's Adam (fused on
    CUDA; capturable with a tensor learning rate under train.compile=step) and its gradient norm."""
    torch.manual_seed(0)
    dtype, fp16 = PRECISIONS[variant.precision], variant.precision == "fp16"
    model = init_weights(VAE(size), "normal").to(device, memory_format=torch.channels_last)
    x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    loss = FeaturePerceptualLoss(list(PAPER_LAYERS[variant.layers]), feature_scale=FEATURE_SCALE, weights="random",
                                 dtype=PRECISIONS[variant.network_dtype]).to(device, memory_format=torch.channels_last)
    if variant.compile == "loss":
        loss.compile()
    optimizer = adam(model, OptimConfig(), device, compiled=variant.compile == "step" and not fp16)
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    params = list(model.parameters())

    def losses(images):
        x_hat, mu, logvar = model(images)
        return vae_loss(images, x_hat, mu, logvar, 1.0, 0.8, loss)

    compiled = None
    if variant.compile == "step":
        compiled = CompiledStep(losses, params, optimizer, None, batch, graphs=device.type == "cuda", updates=not fp16)

    def step():
        if compiled:
            compiled.begin()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            total = (compiled.losses if compiled else losses)(x)["total"]
        scaler.scale(total).backward()
        if compiled and compiled.updates:
            compiled.grad_norm()
            compiled.optimizer_step()
        else:
            scaler.unscale_(optimizer)
            torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def step_flops_per_image(device: torch.device, batch: int, size: int, plain: bool = False,
                         layers: str = "123") -> float:
    """FLOPs of one eager fp32 step (forward, backward, optimizer) per image, as torch counts them."""
    step = plain_step(device, batch, size) if plain else train_step(device, batch, size, StepVariant(layers=layers))
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
