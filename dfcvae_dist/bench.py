"""Measurements behind tools/bench.py: every figure is taken in the same run, warm-up excluded, medians
over repeats, so ratios compare like with like on this machine."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dfcvae_dist.losses import FeaturePerceptualLoss, vae_loss
from dfcvae_dist.losses.perceptual import IMAGENET_MEAN, IMAGENET_STD, VGG19_LAYERS, load_vgg19
from dfcvae_dist.models import VAE, init_weights

PAPER_LAYERS = ["relu1_2", "relu2_1", "relu3_1"]


def timed(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of `fn()` over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


class PlainReference(nn.Module):
    """A DFC-VAE loss the way most public implementations write it: VGG19's full `features` stack (all 16
    convolutions) in fp32, x and x_hat through it in two separate passes (x detached), no truncation."""

    def __init__(self):
        super().__init__()
        vgg, _ = load_vgg19("random", seed=0)
        self.features = vgg.features.requires_grad_(False).eval()
        self.taps = {VGG19_LAYERS[n] for n in PAPER_LAYERS}
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def taps_of(self, x):
        out, h = [], (x - self.mean) / self.std
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.taps:
                out.append(h)
        return out

    def forward(self, x, x_hat):
        return sum(F.mse_loss(a, b) for a, b in zip(self.taps_of(x_hat), self.taps_of(x.detach())))


def train_step_fn(batch: int, size: int, plain: bool, channels_last: bool = False, compile_loss: bool = False):
    torch.manual_seed(0)
    model = init_weights(VAE(size), "normal")
    loss = PlainReference() if plain else FeaturePerceptualLoss(PAPER_LAYERS, feature_scale=57.6, weights="random")
    if compile_loss:
        loss.compile()
    optimizer = torch.optim.Adam(model.parameters(), 5e-4)
    x = torch.rand(batch, 3, size, size)
    if channels_last:
        model, loss, x = model.to(memory_format=torch.channels_last), loss.to(memory_format=torch.channels_last), \
            x.contiguous(memory_format=torch.channels_last)

    def step():
        x_hat, mu, logvar = model(x)
        total = loss(x, x_hat) if plain else vae_loss(x, x_hat, mu, logvar, 1.0, 0.8, loss)["total"]
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    return step


def step_flops_per_image(batch: int, size: int, plain: bool = False) -> float:
    step = train_step_fn(batch, size, plain=plain)
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / batch


def matmul_gflops(n: int, repeats: int) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / timed(lambda: a @ b, repeats) / 1e9


def conv_gflops(batch: int, channels: int, size: int, repeats: int) -> float:
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).requires_grad_(False)
    x = torch.randn(batch, channels, size, size)
    flops = 2 * batch * channels * channels * 9 * size * size
    return flops / timed(lambda: conv(x), repeats) / 1e9


def extraction_img_s(batch: int, size: int, repeats: int) -> float:
    model = VAE(size).eval()
    x = torch.rand(batch, 3, size, size)

    def encode():
        with torch.no_grad():
            model.encode(x)

    return batch / timed(encode, repeats)


def steady_img_s(loader, repeats: int = 2) -> float:
    """Images per second a loader delivers once its first batch has arrived (worker start-up excluded),
    median over passes."""
    rates = []
    for _ in range(repeats):
        batches = iter(loader)
        next(batches)
        start, images = time.perf_counter(), 0
        for batch in batches:
            images += len(batch["image"] if isinstance(batch, dict) else batch)
        rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates)


def shard_loader_img_s(shard_dir: Path, batch: int, batches: int) -> float:
    """One worker: our training stream over `shard_dir` (read, decode, batch; uint8 images)."""
    from dfcvae_dist.data.loader import SplitSource, TrainStream, make_loader

    stream = TrainStream(SplitSource.from_manifest(shard_dir, "train"), batch, batches, 0, 1, 1, seed=0,
                         shuffle_buffer=0)
    return steady_img_s(make_loader(stream, 1))


def jpeg_folder_img_s(jpeg_dir: Path, batch: int, n: int, image_size: int) -> float:
    """One worker: an ImageFolder-style dataset of aligned JPEGs with crop + resize + to_tensor per sample."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    from dfcvae_dist.data.celeba import PAPER_BOX

    class JpegFolder(torch.utils.data.Dataset):
        def __init__(self, files):
            self.files = files

        def __len__(self):
            return len(self.files)

        def __getitem__(self, i):
            with Image.open(self.files[i]) as img:
                img = img.convert("RGB").crop(PAPER_BOX).resize((image_size, image_size), Image.Resampling.BICUBIC)
            return TF.to_tensor(img)

    files = sorted(jpeg_dir.glob("*.jpg"))[:n]
    return steady_img_s(torch.utils.data.DataLoader(JpegFolder(files), batch_size=batch, num_workers=1))


def svm_seconds(n: int, dim: int = 100, seed: int = 0) -> float:
    from dfcvae_dist.evaluation.svm import evaluate

    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(n, dim)).astype(np.float32)
    weights = rng.normal(size=(dim, 40))
    attrs = ((mu @ weights + rng.normal(scale=3.0, size=(n, 40))) > 1.0).astype(np.uint8)
    n_train, n_val = int(n * 0.8), int(n * 0.1)
    latents = {"mu": mu, "attrs": attrs, "partition": np.repeat([0, 1, 2], [n_train, n_val, n - n_train - n_val]),
               "attribute_names": np.array([f"a{i}" for i in range(40)]), "features": np.array("latent"),
               "checkpoint": np.array(""), "weights": np.array("synthetic")}
    start = time.perf_counter()
    evaluate(latents)
    return time.perf_counter() - start


def scaling_img_s(shard_dir: Path, steps: int, batch: int, size: int, work: Path) -> dict[str, float]:
    """Real training runs with 1 and 2 processes (same per-rank batch); img/s from each run's summary."""
    root = Path(__file__).resolve().parents[1]
    results = {}
    for nproc in (1, 2):
        run_dir = work / f"scaling-{nproc}"
        launch = [sys.executable, "-m", "dfcvae_dist.train"] if nproc == 1 else [
            str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "-m", "dfcvae_dist.train"]
        cmd = [*launch, "--config", str(root / "configs" / "quickstart.yaml"), f"data.shards={shard_dir}",
               f"train.run_dir={run_dir}", f"train.max_steps={steps}", f"train.batch_size={batch}",
               f"model.image_size={size}", "train.val_every_steps=0", "log.enabled=false",
               "checkpoint.every_steps=0", "train.resume=none", "data.num_workers=1"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
        if proc.returncode != 0:
            raise RuntimeError(f"scaling run with {nproc} process(es) failed:\n{proc.stderr[-3000:]}")
        results[f"img_s_{nproc}proc"] = json.loads((run_dir / "COMPLETED.json").read_text())["img_per_s"]
    return results


def allreduce_mb_per_step(size: int) -> float:
    """Gradient bytes DDP all-reduces per optimizer step (fp32 gradients of the trained model)."""
    return sum(p.numel() for p in VAE(size).parameters()) * 4 / 1e6


def temporary_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="dfcvae-bench-"))
