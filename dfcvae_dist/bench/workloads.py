"""The pipeline around the step: data loading (our shards vs a JPEG folder), extraction, the SVM table and
real 1- and 2-process training runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dfcvae_dist.bench.timing import make_timer
from dfcvae_dist.models import VAE

ROOT = Path(__file__).resolve().parents[2]


def steady_img_s(loader) -> float:
    """Images per second one pass of a loader delivers once its first batch has arrived (worker start-up
    excluded). Timed by hand: a pass is not a repeatable call, and its first batch must not count."""
    batches = iter(loader)
    next(batches)
    start, images = time.perf_counter(), 0
    for batch in batches:
        images += len(batch["image"] if isinstance(batch, dict) else batch)
    return images / (time.perf_counter() - start)


def shard_loader_img_s(shard_dir: Path, batch: int, batches: int, workers: int) -> float:
    """Our training stream over `shard_dir` (read, decode, batch; uint8 images) with `workers` workers."""
    from dfcvae_dist.data.loader import SplitSource, TrainStream, make_loader

    stream = TrainStream(SplitSource.from_manifest(shard_dir, "train"), batch, batches, 0, 1, workers, seed=0,
                         shuffle_buffer=0)
    return steady_img_s(make_loader(stream, workers))


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


def extraction_img_s(device: torch.device, batch: int, size: int, block_s: float) -> float:
    model = VAE(size).to(device).eval()
    x = torch.rand(batch, 3, size, size, device=device)

    @torch.no_grad()
    def encode():
        model.encode(x)

    encode()
    return batch / make_timer(encode).blocked_autorange(min_run_time=block_s).median


def svm_seconds(n: int, dim: int = 100, seed: int = 0) -> float:
    """One run of the 40-attribute SVM evaluation on n synthetic latents (80/10/10 split)."""
    from dfcvae_dist.evaluation.svm import evaluate

    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(n, dim)).astype(np.float32)
    weights = rng.normal(size=(dim, 40))
    attrs = ((mu @ weights + rng.normal(scale=3.0, size=(n, 40))) > 1.0).astype(np.uint8)
    n_train, n_val = int(n * 0.8), int(n * 0.1)
    latents = {"mu": mu, "attrs": attrs, "partition": np.repeat([0, 1, 2], [n_train, n_val, n - n_train - n_val]),
               "attribute_names": np.array([f"a{i}" for i in range(40)]), "features": np.array("latent"),
               "checkpoint": np.array(""), "weights": np.array("synthetic")}
    return make_timer(lambda: evaluate(latents)).timeit(1).median


def scaling_img_s(shard_dir: Path, steps: int, batch: int, size: int, work: Path) -> dict[str, float]:
    """Real training runs with 1 and 2 processes (same per-rank batch); img/s from each run's summary."""
    results = {}
    for nproc in (1, 2):
        run_dir = work / f"scaling-{nproc}"
        launch = [sys.executable, "-m", "dfcvae_dist.train"] if nproc == 1 else [
            str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "-m", "dfcvae_dist.train"]
        cmd = [*launch, "--config", str(ROOT / "configs" / "quickstart.yaml"), f"data.shards={shard_dir}",
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
