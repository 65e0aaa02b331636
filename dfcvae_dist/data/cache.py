"""`data.cache`: a rank's training shards read once and held as one uint8 tensor, batches gathered by index.

The rank holds the shards it streams in the first epoch (`TrainStream.rank_shards(0)`), so ranks hold disjoint
parts of the split, as they read disjoint shards when streaming. Each epoch is a permutation of the rank's samples
seeded by (seed, epoch, rank), drawn again as often as the rank's batches need, so a position (epoch, batch) is
all a resume needs. This order is not streaming's: a rank keeps its shards every epoch and shuffles all of its
samples (streaming deals the shards out anew each epoch and shuffles within a buffer).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from dfcvae_dist.data.loader import TrainStream, decoded, make_loader
from dfcvae_dist.data.shards import iter_shard
from dfcvae_dist.errors import UserError

CACHE_SHARE = 0.8  # of the free memory a cache may take: training needs the rest


class ShardImages(torch.utils.data.Dataset):
    """Item i: the keys and decoded images of shard i, stacked (uint8, N x C x H x W), and the damaged samples passed
    over.
    A map-style dataset: a loader's workers decode shards in parallel and it returns them in order."""

    def __init__(self, urls: list[str], skip_corrupt: bool):
        self.urls, self.skip_corrupt = urls, skip_corrupt

    def __len__(self) -> int:
        return len(self.urls)

    def __getitem__(self, i: int) -> dict:
        skipped = [0]
        samples = list(decoded(iter_shard(self.urls[i]), self.skip_corrupt, skipped))
        return {"url": self.urls[i], "key": [s["key"] for s in samples], "skipped": skipped[0],
                "image": torch.stack([s["image"] for s in samples]) if samples else None}


class CachedTrainSplit:
    """What `TrainStream` yields (set_position, then batches with `key`, `image` and `skipped`), from memory."""

    def __init__(self, stream: TrainStream, where: str, device: torch.device, image_size: int, num_workers: int,
                 local_processes: int = 1):
        source = stream.source
        if source.shard_samples is None:
            raise UserError(f"data.cache={where} needs data.shards to be a manifest directory: a URL pattern does not "
                            "say how many samples each shard holds")
        self.where, self.batch_size, self.batches_per_epoch = where, stream.batch_size, stream.batches_per_epoch
        self.seed, self.rank, self.epoch, self.start_batch = stream.seed, stream.rank, 0, 0
        urls = stream.rank_shards(0)
        capacity = sum(source.shard_samples[u] for u in urls)
        target = torch.device(device) if where == "device" else torch.device("cpu")
        check_fits(where, capacity * 3 * image_size ** 2, target, local_processes if target.type == "cpu" else 1)
        started = time.perf_counter()
        self.images = torch.empty((capacity, 3, image_size, image_size), dtype=torch.uint8, device=target,
                                  pin_memory=self.pinned(target, device))
        self.keys: list[str] = []
        self.skipped = self.fill(urls, stream.skip_corrupt, num_workers)
        self.count = len(self.keys)
        self.images = self.images[:self.count]
        self.fill_s = time.perf_counter() - started
        if self.count == 0:
            raise UserError(f"data.cache={where}: rank {self.rank}'s training shards hold no readable sample")

    @staticmethod
    def pinned(target: torch.device, device: torch.device) -> bool:
        """Host memory is pinned for a CUDA device: copies from it do not block the host."""
        return target.type == "cpu" and torch.device(device).type == "cuda"

    def fill(self, urls: list[str], skip_corrupt: bool, num_workers: int) -> int:
        """Read the shards into `images` and `keys`; return the damaged samples passed over."""
        skipped = 0
        for shard in make_loader(ShardImages(urls, skip_corrupt), num_workers):
            skipped += shard["skipped"]
            filled, n = len(self.keys), len(shard["key"])
            if filled + n > len(self.images):
                raise UserError(f"{shard['url']}: holds more samples than its manifest says (check the shards with "
                                f"tools/make_shards.py --verify {Path(shard['url']).parent})")
            if n:
                self.images[filled:filled + n].copy_(shard["image"])
                self.keys += shard["key"]
        return skipped

    def describe(self) -> str:
        place = "device memory" if self.where == "device" else "host memory"
        return (f"data.cache={self.where}: {self.count:,} training images ({size_text(self.images.nbytes)}) of rank "
                f"{self.rank} in {place}, read in {self.fill_s:.1f} s")

    def set_position(self, epoch: int, batch: int) -> None:
        self.epoch, self.start_batch = epoch, batch

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's sample indices: permutations of the rank's samples, as many as its batches need."""
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        need = self.batches_per_epoch * self.batch_size
        return np.concatenate([rng.permutation(self.count) for _ in range(-(-need // self.count))])[:need]

    def __iter__(self):
        order = self.order(self.epoch)
        index = torch.from_numpy(order)
        if self.images.is_cuda:  # from pinned memory: the copy does not wait for the queued steps
            index = index.pin_memory().to(self.images.device, non_blocking=True)
        for b in range(self.start_batch, self.batches_per_epoch):
            rows = slice(b * self.batch_size, (b + 1) * self.batch_size)
            # damaged samples were passed over once, when the cache was filled: counted with the run's first batch
            yield {"key": [self.keys[i] for i in order[rows]], "image": self.gather(index[rows]),
                   "skipped": self.skipped if (self.epoch, b) == (0, 0) else 0}

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        if not self.images.is_pinned():
            return self.images.index_select(0, index)
        out = torch.empty((len(index), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=True)
        return torch.index_select(self.images, 0, index, out=out)


def free_bytes(target: torch.device) -> tuple[int, str]:
    """Free memory where a cache would go, and where that is."""
    if target.type == "cuda":
        return torch.cuda.mem_get_info(target)[0], f"{target} has"
    return host_available_bytes(), "this node has"


def host_available_bytes() -> int:
    """What the kernel says can be allocated without swapping (MemAvailable), else the free pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(where: str, need: int, target: torch.device, holders: int, free: int | None = None) -> None:
    """Refuse a cache of `need` bytes per rank, held by `holders` ranks in the same memory, that would take more than
    CACHE_SHARE of the free memory (measured unless given)."""
    free, place = free_bytes(target) if free is None else (free, f"{target} has")
    if need * holders <= CACHE_SHARE * free:
        return
    per_rank = f" ({size_text(need)} per rank x {holders} processes on this node)" if holders > 1 else ""
    other = "data.cache=memory, " if where == "device" else ""
    raise UserError(f"data.cache={where}: the training images take {size_text(need * holders)}{per_rank}, but {place} "
                    f"{size_text(free)} free (a cache may take {CACHE_SHARE:.0%} of it): use {other}data.cache=none, "
                    "or smaller images")


def size_text(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
