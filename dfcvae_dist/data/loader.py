"""WebDataset pipelines for training (streaming, seeded, resumable) and evaluation (every sample once).

Training order, fixed by (seed, epoch) alone so that every rank can compute it and a resume can find its
place: the split's shard list is permuted with a (seed, epoch) generator, then split by rank and by
worker (`shards[rank::world][worker::workers]`). Each worker cycles through its shards, shuffles raw
samples in a buffer seeded by (seed, epoch, rank, worker) and yields exactly its share of the epoch's
batches; the DataLoader takes batches from its workers in turn, so batch i of an epoch comes from worker
i % workers. Every rank therefore runs the same number of batches, and resuming at batch b skips the raw
(undecoded) samples before b instead of decoding them.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import default_collate
from torchvision.io import ImageReadMode, decode_image

from dfcvae_dist.data.shards import iter_shard, read_manifest
from dfcvae_dist.lifeline import die_with_parent
from dfcvae_dist.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class SplitSource:
    """The shard URLs of one split and how many samples they hold (each, when a manifest says)."""

    urls: list[str]
    num_samples: int
    attributes: list[str]
    shard_samples: dict[str, int] | None = None

    @classmethod
    def from_manifest(cls, directory: str | Path, split: str) -> "SplitSource":
        directory = Path(directory)
        manifest = read_manifest(directory)
        if split not in manifest["splits"]:
            raise UserError(f"{directory / 'manifest.json'}: no split '{split}'")
        info = manifest["splits"][split]
        urls = [str(directory / s["name"]) for s in info["shards"]]
        missing = [u for u in urls if not Path(u).exists()]
        if missing:
            raise UserError(f"{missing[0]}: listed in {directory / 'manifest.json'} but missing on disk "
                            f"({len(missing)} shard(s) missing)")
        return cls(urls, info["num_samples"], manifest["attributes"],
                   {url: s["num_samples"] for url, s in zip(urls, info["shards"], strict=True)})

    @classmethod
    def from_pattern(cls, pattern: str, num_samples: int | None) -> "SplitSource":
        if num_samples is None:
            raise UserError(f"data.num_samples must be set when data.shards is a URL pattern ({pattern})")
        return cls(list(wds.shardlists.expand_urls(pattern)), num_samples, [])


def resolve_split(shards: str, split: str, pattern_samples: int | None = None,
                  val_pattern: str | None = None) -> SplitSource:
    """`shards` is a manifest directory, or (training only) a WebDataset URL pattern."""
    if Path(shards).is_dir():
        return SplitSource.from_manifest(shards, split)
    if split == "train":
        return SplitSource.from_pattern(shards, pattern_samples)
    if val_pattern:
        return SplitSource(list(wds.shardlists.expand_urls(val_pattern)), 0, [])
    raise UserError(f"no '{split}' split: data.shards={shards} is not a manifest directory")


def decode_sample(sample: dict) -> dict:
    """Raw tar sample -> key, uint8 image (C, H, W), attrs (0/1) and landmarks. Images stay uint8 until
    `model_input`: a quarter of the bytes to pass from the workers and to copy to the device."""
    try:
        image = _decode_image(sample)
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except (RuntimeError, ValueError) as err:
        raise CorruptSample(f"{sample.get('__url__')}: sample '{sample['__key__']}' does not decode "
                            f"({err})") from None
    return {
        "key": sample["__key__"],
        "image": image,
        "attrs": list((meta.get("attrs") or {}).values()),
        "landmarks": meta.get("landmarks") or [],
        "partition": int(meta.get("partition", -1)),
    }


def _decode_image(sample: dict) -> torch.Tensor:
    if "npy" in sample:
        return _decode_npy(sample["npy"])
    data = sample.get("png") or sample.get("jpg")
    if data is None:
        raise ValueError("no png/jpg/npy member")
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB)


# npy header bytes -> image shape. np.load parses every header with ast.literal_eval, which costs more than
# the rest of a sample's decoding; the members of a shard set share one header, so it is checked once.
_NPY_SHAPES: dict[bytes, tuple[int, ...]] = {}


def _decode_npy(data: bytes) -> torch.Tensor:
    header = data[: 10 + int.from_bytes(data[8:10], "little")] if data[6:8] == b"\x01\x00" else b""
    shape = _NPY_SHAPES.get(header)
    if shape is None:
        array = np.load(io.BytesIO(data), allow_pickle=False)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or not array.flags.c_contiguous:
            raise ValueError(f"npy member is {array.dtype} {array.shape}, not uint8 H x W x 3")
        if header:
            _NPY_SHAPES[header] = array.shape
        return torch.from_numpy(array).permute(2, 0, 1)
    if len(data) != len(header) + shape[0] * shape[1] * shape[2]:
        raise ValueError(f"npy member has {len(data) - len(header)} data bytes for shape {shape}")
    pixels = bytearray(memoryview(data)[len(header):])
    return torch.frombuffer(pixels, dtype=torch.uint8).view(shape).permute(2, 0, 1)


def model_input(images: torch.Tensor, device: torch.device | str,
                memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """A uint8 batch (N, C, H, W) -> float32 in [0, 1] on `device`, converted there."""
    return images.to(device, non_blocking=True).to(torch.float32, memory_format=memory_format).div_(255)


class CorruptSample(UserError):
    """One sample does not decode (its shard is intact)."""


def collate(samples: list[dict], skipped: int = 0) -> dict:
    """Images stacked by torch's collate (straight into shared memory in a worker); the small fields become
    one tensor each per batch, not per sample (a tensor per sample costs more than decoding the image).
    `skipped`: damaged samples passed over while this batch was assembled (data.skip_corrupt)."""
    return {
        "skipped": skipped,
        "key": [s["key"] for s in samples],
        "image": default_collate([s["image"] for s in samples]),
        "attrs": torch.from_numpy(np.array([s["attrs"] for s in samples], dtype=np.uint8)),
        "landmarks": torch.from_numpy(np.array([s["landmarks"] for s in samples], dtype=np.int16)),
        "partition": torch.from_numpy(np.array([s["partition"] for s in samples], dtype=np.int8)),
    }


def decoded(raw, skip_corrupt: bool, counter: list[int], passes: "ShardPasses | None" = None):
    """Decoded samples; a damaged one (undecodable image, missing image, invalid JSON) raises, or under
    `skip_corrupt` is passed over with a warning naming shard and key, and counted in `counter[0]`. `passes`:
    told of every sample, when `raw` reads shards over and over."""
    for sample in raw:
        try:
            good = decode_sample(sample)
        except CorruptSample as err:
            if not skip_corrupt:
                raise
            log.warning("skipped: %s", err)
            counter[0] += 1
            good = None
        if passes is not None:
            passes.decoded(sample, good is not None)
        if good is not None:
            yield good


class ShardPasses:
    """A training worker's shards, read over and over, each raw sample tagged with its pass. Told which samples
    decode, it ends the run (one line) when a whole pass gave none, or held no sample at all: skipping damaged
    samples would otherwise read on forever."""

    def __init__(self, urls: list[str]):
        self.urls = urls
        self.sizes: dict[int, int] = {}  # samples per finished pass
        self.seen: dict[int, list[int]] = {}  # pass -> [samples decoded or skipped, good ones]

    def __iter__(self):
        for n in itertools.count():
            size = 0
            for url in self.urls:
                for sample in iter_shard(url):
                    sample["__pass__"] = n
                    size += 1
                    yield sample
            if not size:
                raise UserError(f"{self.named()}: no samples")
            self.sizes[n] = size

    def decoded(self, sample: dict, good: bool) -> None:
        counts = self.seen.setdefault(sample["__pass__"], [0, 0])
        counts[0] += 1
        counts[1] += good
        for n, (done, good_ones) in list(self.seen.items()):  # a shuffle buffer mixes passes: any may end here
            if done == self.sizes.get(n):
                if not good_ones:
                    raise UserError(f"{self.named()}: not one of their {done} samples decodes (data.skip_corrupt "
                                    "passed over them all); training stops instead of reading them again and again")
                del self.seen[n]

    def named(self) -> str:
        more = f" and {len(self.urls) - 1} more shard(s)" if len(self.urls) > 1 else ""
        return f"{self.urls[0]}{more}"


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class TrainStream(torch.utils.data.IterableDataset):
    """Exactly `batches_per_epoch` batches of `batch_size` per rank and epoch, from position (epoch, batch)."""

    def __init__(self, source: SplitSource, batch_size: int, batches_per_epoch: int, rank: int, world: int,
                 num_workers: int, seed: int, shuffle_buffer: int, skip_corrupt: bool = False):
        self.source, self.batch_size, self.batches_per_epoch = source, batch_size, batches_per_epoch
        self.rank, self.world = rank, world
        self.seed, self.shuffle_buffer, self.skip_corrupt = seed, shuffle_buffer, skip_corrupt
        self.epoch, self.start_batch = 0, 0
        self.set_workers(num_workers)

    def set_workers(self, num_workers: int) -> None:
        """Each of `num_workers` workers (0 reads like 1) reads shards of its own: ranks x workers <= shards."""
        workers = max(1, num_workers)
        if len(self.source.urls) < self.world * workers:
            raise UserError(f"{len(self.source.urls)} training shard(s) for {self.world} rank(s) x {workers} "
                            f"worker(s): need at least {self.world * workers} (write smaller shards with "
                            "--shard-size, or use fewer workers)")
        self.num_workers = workers

    def set_position(self, epoch: int, batch: int) -> None:
        self.epoch, self.start_batch = epoch, batch

    def rank_shards(self, epoch: int | None = None) -> list[str]:
        """This rank's shards in `epoch` (default: the current one), in reading order."""
        epoch = self.epoch if epoch is None else epoch
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.source.urls))
        return [self.source.urls[i] for i in order[self.rank::self.world]]

    def worker_shards(self, worker: int) -> list[str]:
        return self.rank_shards()[worker::self.num_workers]

    def __iter__(self):
        # The DataLoader asks worker 0 first, so after a resume at batch b worker 0 must serve the stream
        # that owns batch b: physical worker w serves virtual stream (w + b) % workers.
        workers = self.num_workers
        worker = (_worker()[0] + self.start_batch) % workers
        own = len(range(worker, self.batches_per_epoch, workers))
        done = len(range(worker, self.start_batch, workers))
        passes = ShardPasses(self.worker_shards(worker))
        raw = iter(passes)
        if self.shuffle_buffer > 1:
            seed = int(np.random.SeedSequence([self.seed, self.epoch, self.rank, worker]).generate_state(1)[0])
            raw = wds.filters.shuffle(bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, seed=seed)(raw)
        remaining = own - done
        if remaining <= 0:
            return
        skipped = [0]
        if self.skip_corrupt:  # positions count good samples, so the way to batch `done` is to decode up to it
            samples = decoded(raw, True, skipped, passes)
            for _ in itertools.islice(samples, done * self.batch_size):
                pass
            skipped[0] = 0  # counted before the checkpoint
        else:
            samples = decoded(itertools.islice(raw, done * self.batch_size, None), False, skipped)
        # The worker's shards cycle, so with skips it reads on until its share is full: every rank runs the
        # same number of batches.
        for batch in iter(lambda: list(itertools.islice(samples, self.batch_size)), []):
            yield collate(batch, skipped[0])
            skipped[0], remaining = 0, remaining - 1
            if remaining == 0:
                return


MAX_AUTO_WORKERS = 8


def auto_workers(cpus: int, local_processes: int, shards: int, world: int) -> tuple[int, str]:
    """`data.num_workers=auto`: this process's share of the `cpus` it may use, one left for the process itself, at
    most MAX_AUTO_WORKERS and at most what `shards` allow (a TrainStream needs ranks x workers <= shards). Returns
    the count and, when the shards cap it, a line saying so."""
    share = min(MAX_AUTO_WORKERS, max(0, cpus // max(1, local_processes) - 1))
    allowed = max(1, shards // world)
    if share <= allowed:
        return share, ""
    return allowed, (f"data.num_workers=auto: {allowed} worker(s) per rank, not {share}: {shards} training shard(s) "
                     f"for {world} rank(s) (write smaller shards with --shard-size for more)")


class EvalStream(torch.utils.data.IterableDataset):
    """Every sample of the split exactly once across ranks and workers (shards split by rank, then worker)."""

    def __init__(self, source: SplitSource, batch_size: int, rank: int, world: int, skip_corrupt: bool = False):
        self.source, self.batch_size, self.rank, self.world = source, batch_size, rank, world
        self.skip_corrupt = skip_corrupt

    def shards_for(self, worker: int, workers: int) -> list[str]:
        return self.source.urls[self.rank::self.world][worker::workers]

    def __iter__(self):
        worker, workers = _worker()
        skipped = [0]
        raw = (s for url in self.shards_for(worker, workers) for s in iter_shard(url))
        samples = decoded(raw, self.skip_corrupt, skipped)
        while batch := list(itertools.islice(samples, self.batch_size)):
            yield collate(batch, skipped[0])
            skipped[0] = 0


def read_images(directory: str | Path, split: str, n: int) -> dict:
    """The first `n` samples of a split in one process (float images, attrs, keys) for figures and metrics."""
    batches = []
    for batch in make_loader(EvalStream(SplitSource.from_manifest(directory, split), 256, 0, 1), 0):
        batches.append(batch)
        if sum(len(b["key"]) for b in batches) >= n:
            break
    if not batches:
        raise UserError(f"{directory}: the {split} split is empty")
    return {"image": model_input(torch.cat([b["image"] for b in batches])[:n], "cpu"),
            "attrs": torch.cat([b["attrs"] for b in batches])[:n], "key": [k for b in batches for k in b["key"]][:n]}


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class _Loader(torch.utils.data.DataLoader):
    """Workers leave a launcher's SIGTERM/SIGINT (sent to the whole process group or Slurm step) to their
    rank, which stops at an agreed step and needs batches until then. They are forked with both signals
    blocked, so none can kill a worker while it starts; `_worker_init` then lets them obey their rank only."""

    def __iter__(self):
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _worker_init(rank_pid: int, _: int) -> None:
    """Exit on a stop signal only when the rank sends it (the DataLoader's and multiprocessing's shutdown,
    which would otherwise wait for the worker forever); die with the rank, also with a rank killed between
    forking this worker and this call (e.g. at an epoch's start): an orphan would wait on its queue forever."""
    die_with_parent()
    if os.getppid() != rank_pid:
        os._exit(0)
    threading.Thread(target=_exit_on_signal_from, args=(rank_pid,), daemon=True, name="obey-rank").start()


def _exit_on_signal_from(rank_pid: int) -> None:
    while signal.sigwaitinfo(STOP_SIGNALS).si_pid != rank_pid:
        pass
    os._exit(0)


def make_loader(stream: torch.utils.data.IterableDataset, num_workers: int,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """`pin_memory`: for a CUDA device, so that the copy to it (non_blocking) does not block the host."""
    if num_workers:
        # The default strategy hands each batch tensor over as a file descriptor, with an authenticated
        # socket handshake per tensor that contends for the worker's GIL: one worker measured 4,900 img/s
        # with it and 8,000 with shared-memory files by name. torch_shm_manager removes those files when
        # the processes end, also when they are killed.
        torch.multiprocessing.set_sharing_strategy("file_system")
    # Its own generator: a DataLoader otherwise draws its base seed from the global torch RNG, which would
    # shift the model's sampling noise whenever a loader is (re)created, e.g. after a resume.
    return _Loader(stream, batch_size=None, num_workers=num_workers, persistent_workers=False,
                   prefetch_factor=4 if num_workers else None, generator=torch.Generator().manual_seed(0),
                   worker_init_fn=functools.partial(_worker_init, os.getpid()) if num_workers else None,
                   pin_memory=pin_memory)


def batches_per_epoch(num_samples: int, batch_size: int, world: int, grad_accum: int) -> int:
    """Micro-batches per rank per epoch: whole optimizer steps over the split, the same on every rank."""
    steps = num_samples // (batch_size * world * grad_accum)
    if steps < 1:
        raise UserError(f"training split has {num_samples} samples, fewer than one global batch "
                        f"({batch_size} x {world} ranks x {grad_accum} accumulation)")
    return steps * grad_accum


