"""The machine's limit: the best sustained FLOP rate among a few large matmuls and VGG-like 3x3
convolutions, per dtype; a training step is then a fraction of it."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from dfcvae_dist.bench.step import PRECISIONS
from dfcvae_dist.bench.timing import rate_per_round, spread


def matmul(n: int, dtype: torch.dtype, device: torch.device) -> tuple[Callable[[], object], float]:
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return (lambda: a @ b), 2.0 * n**3


def conv3x3(batch: int, channels: int, size: int, dtype: torch.dtype,
            device: torch.device) -> tuple[Callable[[], object], float]:
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).requires_grad_(False).to(device, dtype)
    conv = conv.to(memory_format=torch.channels_last)
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    return (lambda: conv(x)), 2.0 * batch * channels * channels * 9 * size * size


def kernel_shapes(device: torch.device, quick: bool) -> dict[str, Callable]:
    """Name -> kernel factory (dtype -> (fn, flops)); GPU shapes are large enough to fill the device."""
    scale = 1 if device.type == "cpu" else 4
    n = (1024 if quick else 2048) * scale
    return {
        f"matmul {n}x{n}": lambda dtype: matmul(n, dtype, device),
        f"conv3x3 64ch 64x64 batch {8 * scale}": lambda dtype: conv3x3(8 * scale, 64, 64, dtype, device),
        f"conv3x3 256ch 16x16 batch {16 * scale}": lambda dtype: conv3x3(16 * scale, 256, 16, dtype, device),
    }


def kernel_rates(device: torch.device, precision: str, quick: bool, block_s: float) -> dict[str, Callable[[], float]]:
    """Kernel name -> one round's GFLOP/s (see timing.rate_per_round), warmed up."""
    rates = {}
    for name, make in kernel_shapes(device, quick).items():
        fn, flops = make(PRECISIONS[precision])
        rates[f"{name} {precision}"] = rate_per_round(fn, flops / 1e9, 1, block_s)
    return rates


def fraction_of_peak(step_gflop_per_img: float, img_s: list[float], kernels: dict[str, list[float]]) -> dict:
    """The step's counted FLOP rate against the best kernel, round by round (kernels and steps share rounds,
    so a busier machine lowers both). Above 1 is flagged, not clamped: the FLOP count or the peak is then
    wrong (e.g. the machine was idle for the step and busy for the kernels)."""
    peaks = [max(rates) for rates in zip(*kernels.values(), strict=True)]
    fraction = spread([step_gflop_per_img * rate / peak for rate, peak in zip(img_s, peaks, strict=True)])
    best = max(kernels, key=lambda name: np.median(kernels[name]))
    return {"fraction": fraction["median"], "fraction_iqr": fraction["iqr"], "kernel": best,
            "peak_gflops": float(np.median(kernels[best])), "above_peak": fraction["median"] > 1}
