"""Data module: evaluation sees every sample once across ranks x workers; training steps agree."""

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dfcvae_dist.data.cache import CachedTrainSplit, check_fits
from dfcvae_dist.data.loader import (EvalStream, SplitSource, TrainStream, auto_workers, batches_per_epoch,
                                     make_loader, model_input)
from dfcvae_dist.errors import UserError, message


def keys_of(loader):
    return [k for batch in loader for k in batch["key"]]


def test_eval_two_ranks_two_workers_disjoint_and_complete(shard_dir):
    source = SplitSource.from_manifest(shard_dir, "train")
    seen = []
    for rank in range(2):
        keys = keys_of(make_loader(EvalStream(source, batch_size=7, rank=rank, world=2), num_workers=2))
        assert keys
        seen.append(set(keys))
        assert len(keys) == len(set(keys))
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == source.num_samples == 321


def test_eval_batches_carry_image_attrs_landmarks(shard_dir):
    batch = next(iter(make_loader(EvalStream(SplitSource.from_manifest(shard_dir, "val"), 5, 0, 1), 0)))
    assert batch["image"].shape == (5, 3, 32, 32) and batch["image"].dtype == torch.uint8
    x = model_input(batch["image"], "cpu", torch.channels_last)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, batch["image"].float() / 255)
    assert batch["attrs"].shape == (5, 40) and batch["landmarks"].shape == (5, 10)


@pytest.mark.parametrize("workers", [0, 2])
def test_training_every_rank_runs_the_same_number_of_batches(shard_dir, workers):
    source = SplitSource.from_manifest(shard_dir, "train")
    n = batches_per_epoch(source.num_samples, batch_size=16, world=2, grad_accum=1)
    counts, keys = [], []
    for rank in range(2):
        stream = TrainStream(source, 16, n, rank, 2, workers, seed=0, shuffle_buffer=50)
        batches = list(make_loader(stream, workers))
        counts.append(len(batches))
        assert all(len(b["key"]) == 16 for b in batches)
        keys.append({k for b in batches for k in b["key"]})
    assert counts == [n, n] and n == 321 // 32
    assert not keys[0] & keys[1]  # ranks read disjoint shards


def test_training_order_is_seeded_and_resumes_at_a_batch(shard_dir):
    source = SplitSource.from_manifest(shard_dir, "train")
    n = batches_per_epoch(source.num_samples, 8, 1, 1)
    stream = TrainStream(source, 8, n, 0, 1, 2, seed=5, shuffle_buffer=30)
    full = [b["key"] for b in make_loader(stream, 2)]
    stream.set_position(0, 13)
    tail = [b["key"] for b in make_loader(stream, 2)]
    assert tail == full[13:]
    stream.set_position(1, 0)
    assert [b["key"] for b in make_loader(stream, 2)] != full  # a new epoch, a new order


def test_too_few_shards_for_ranks_and_workers(shard_dir):
    source = SplitSource.from_manifest(shard_dir, "train")  # 9 shards
    with pytest.raises(UserError, match=r"9 training shard\(s\) for 4 rank\(s\) x 3 worker\(s\): need at least 12"):
        TrainStream(source, 8, 1, 0, 4, 3, 0, 10)


def test_manifest_listing_a_missing_shard(shard_dir, tmp_path):
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"train-000000\.tar: listed in .*manifest\.json but missing on disk"):
        SplitSource.from_manifest(tmp_path, "train")


def write_shard_with_corrupt_samples(path, good: int, corrupt: int, fmt: str = "png"):
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "png":
        Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="PNG")
        bad = b"not a png"
    else:
        np.save(buf, np.full((8, 8, 3), 10, np.uint8))
        wrong = io.BytesIO()
        np.save(wrong, np.zeros((8, 8), np.float32))  # a well-formed array, but not an image
        bad = wrong.getvalue()
    with wds.TarWriter(str(path)) as sink:
        for i in range(good + corrupt):
            sink.write({"__key__": f"{i:04d}", fmt: buf.getvalue() if i % 2 or i >= 2 * corrupt else bad,
                        "json": b"{}"})


@pytest.mark.parametrize("fmt", ["png", "npy"])
def test_corrupt_samples_stop_naming_shard_and_key(tmp_path, fmt):
    write_shard_with_corrupt_samples(tmp_path / "bad.tar", good=20, corrupt=10, fmt=fmt)
    stream = TrainStream(SplitSource([str(tmp_path / "bad.tar")], 30, []), 4, 5, 0, 1, 0, seed=0, shuffle_buffer=0)
    with pytest.raises(UserError, match=r"bad\.tar: sample '0000' does not decode"):
        list(make_loader(stream, 0))


def test_truncated_npy_member_with_a_known_header_is_named(tmp_path):
    import io

    import numpy as np
    import webdataset as wds

    buf = io.BytesIO()
    np.save(buf, np.full((8, 8, 3), 10, np.uint8))
    with wds.TarWriter(str(tmp_path / "cut.tar")) as sink:  # the good member's header is seen (and kept) first
        for key, data in (("good", buf.getvalue()), ("cut", buf.getvalue()[:-5])):
            sink.write({"__key__": key, "npy": data, "json": b"{}"})
    stream = TrainStream(SplitSource([str(tmp_path / "cut.tar")], 2, []), 2, 1, 0, 1, 0, seed=0, shuffle_buffer=0)
    with pytest.raises(UserError, match=r"cut\.tar: sample 'cut' does not decode .*187 data bytes for shape"):
        list(make_loader(stream, 0))


def test_skipping_more_corrupt_samples_than_a_batch_keeps_the_batch_count(tmp_path):
    write_shard_with_corrupt_samples(tmp_path / "bad.tar", good=20, corrupt=10)
    stream = TrainStream(SplitSource([str(tmp_path / "bad.tar")], 30, []), 4, 7, 0, 1, 0, seed=0, shuffle_buffer=0,
                         skip_corrupt=True)
    batches = list(make_loader(stream, 0))
    assert len(batches) == 7 and all(len(b["key"]) == 4 for b in batches)  # 10 corrupt > one batch of 4
    assert not {k for b in batches for k in b["key"]} & {f"{i:04d}" for i in range(0, 20, 2)}


@pytest.mark.timeout(60)  # the code before the fix read such shards forever
@pytest.mark.parametrize("workers", [0, 1])
def test_skipping_data_without_one_good_sample_stops_after_a_whole_pass_with_one_line(tmp_path, caplog, workers):
    import webdataset as wds

    for name in ("a", "b"):  # real tar files whose every image member is damaged bytes
        with wds.TarWriter(str(tmp_path / f"{name}.tar")) as sink:
            for i in range(10):
                sink.write({"__key__": f"{name}{i:03d}", "png": b"\x89PNG\r\n\x1a\n" + b"\xde\xad" * 30, "json": b"{}"})
    source = SplitSource([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], 20, [])
    stream = TrainStream(source, 4, 5, 0, 1, workers, seed=0, shuffle_buffer=8, skip_corrupt=True)
    with pytest.raises(UserError) as raised:
        list(make_loader(stream, workers))
    assert message(raised.value) == (f"{tmp_path / 'a.tar'} and 1 more shard(s): not one of their 20 samples decodes "
                                     "(data.skip_corrupt passed over them all); training stops instead of reading "
                                     "them again and again")
    if not workers:  # a worker warns in its own process; here the warnings are this one's
        skipped = [r for r in caplog.records if r.getMessage().startswith("skipped: ")]
        assert 20 <= len(skipped) < 2 * 20  # one pass, and some of the next that the shuffle buffer mixed in


def write_shard_with_every_damage(path, n: int = 24) -> set[str]:
    """npy samples; three damaged ones: no image member, invalid JSON, a truncated image. Their keys."""
    import io

    import numpy as np
    import webdataset as wds

    buf = io.BytesIO()
    damaged = {"0003": "no-image", "0010": "bad-json", "0017": "cut-npy"}
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            key = f"{i:04d}"
            buf.seek(0), buf.truncate()
            np.save(buf, np.full((8, 8, 3), i, np.uint8))
            sample = {"__key__": key, "npy": buf.getvalue(), "json": b'{"partition": 0}'}
            if damaged.get(key) == "no-image":
                del sample["npy"]
            elif damaged.get(key) == "bad-json":
                sample["json"] = b'{"partition": '
            elif damaged.get(key) == "cut-npy":
                sample["npy"] = sample["npy"][:-5]
            sink.write(sample)
    return set(damaged)


def test_every_kind_of_damaged_sample_is_skipped_and_counted_in_training_and_evaluation(tmp_path):
    damaged = write_shard_with_every_damage(tmp_path / "bad.tar")
    source = SplitSource([str(tmp_path / "bad.tar")], 24, [])
    train = list(make_loader(TrainStream(source, 3, 7, 0, 1, 0, seed=0, shuffle_buffer=0, skip_corrupt=True), 0))
    assert [len(b["key"]) for b in train] == [3] * 7 and sum(b["skipped"] for b in train) == 3
    assert not {k for b in train for k in b["key"]} & damaged
    evaluation = list(make_loader(EvalStream(source, 5, 0, 1, skip_corrupt=True), 0))
    assert sorted(k for b in evaluation for k in b["key"]) == sorted({f"{i:04d}" for i in range(24)} - damaged)
    assert sum(b["skipped"] for b in evaluation) == 3
    with pytest.raises(UserError, match=r"bad\.tar: sample '0003' does not decode \(no png/jpg/npy member\)"):
        list(make_loader(EvalStream(source, 5, 0, 1), 0))


def test_a_resumed_stream_starts_after_the_good_samples_already_used(tmp_path):
    write_shard_with_every_damage(tmp_path / "bad.tar")
    source = SplitSource([str(tmp_path / "bad.tar")], 24, [])
    stream = TrainStream(source, 3, 7, 0, 1, 0, seed=0, shuffle_buffer=0, skip_corrupt=True)
    whole = [b["key"] for b in make_loader(stream, 0)]
    for start in (2, 4, 6):  # after 6, 12 and 18 good samples: past one, two and three damaged ones
        stream.set_position(0, start)
        assert [b["key"] for b in make_loader(stream, 0)] == whole[start:]


# Both worker-signal tests run a loader in a child process: the first checks how it exits, the second
# signals its workers the way a launcher or Slurm signals a whole process group or step.
WORKER_FAILS_AND_EXCEPTION_OUTLIVES_MAIN = """
import torch
from dfcvae_dist.data.loader import make_loader

class Failing(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield torch.zeros(1)
        raise ValueError("damaged")

kept = []
try:
    for _ in make_loader(Failing(), 1):
        pass
except ValueError as err:
    kept.append(err)  # as when the error sits in a reference cycle: the loader is shut down only at exit
"""

RANK_SIGNALLED_WITH_ITS_WORKERS = """
import signal, sys, torch
from dfcvae_dist.data.loader import make_loader

signals = []
signal.signal(signal.SIGTERM, lambda *_: signals.append("TERM"))  # like the trainer's stop flag
signal.signal(signal.SIGINT, lambda *_: signals.append("INT"))

class Numbers(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from (torch.tensor([i]) for i in range(20))

print("ready", flush=True)
served = sum(len(list(make_loader(Numbers(), 2))) for _ in range(15))  # new workers each time, as each epoch
print(served, len(signals) > 0, flush=True)
sys.stdin.readline()  # the test stops signalling first: at exit Python restores the default handlers
"""


def run_child(code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], text=True, stdout=subprocess.PIPE, **kwargs)


def test_a_failed_worker_does_not_keep_its_rank_from_exiting():
    proc = run_child(WORKER_FAILS_AND_EXCEPTION_OUTLIVES_MAIN)
    try:
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


def test_workers_ignore_a_launchers_sigterm_and_sigint_from_their_first_instant():
    # A launcher or Slurm signals the rank's whole process group (or step) while workers may be starting.
    proc = run_child(RANK_SIGNALLED_WITH_ITS_WORKERS, start_new_session=True, stdin=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 120
        while not select.select([proc.stdout], [], [], 0.003)[0]:
            assert time.monotonic() < deadline, "the loader stalled under the signals"
            os.killpg(proc.pid, signal.SIGTERM if time.monotonic() % 0.02 < 0.01 else signal.SIGINT)
        assert proc.stdout.readline().split() == ["600", "True"]
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


# A rank killed between forking a worker and the worker's init (at an epoch's start, when the DataLoader forks
# new workers): the orphan, handed to init before it could ask to die with its rank, must end at its init.
RANK_KILLED_BEFORE_ITS_WORKER_ARMED = """
import os, sys, time
import torch
from dfcvae_dist.data.loader import make_loader

rank = os.fork()
if rank == 0:
    worker_init = make_loader(torch.utils.data.TensorDataset(torch.zeros(1)), 1).worker_init_fn  # the rank's
    worker = os.fork()
    if worker == 0:
        rank_pid = os.getppid()
        while os.getppid() == rank_pid:
            time.sleep(0.01)
        worker_init(0)  # what the DataLoader's worker runs first
        open(sys.argv[1], "w").write("carried on")
        os._exit(0)
    print(worker, flush=True)
    os._exit(0)  # the rank dies before its worker armed itself
os.waitpid(rank, 0)
"""


def test_a_worker_whose_rank_died_before_its_init_ends_there(tmp_path):
    marker = tmp_path / "carried-on"
    proc = subprocess.run([sys.executable, "-c", RANK_KILLED_BEFORE_ITS_WORKER_ARMED, str(marker)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    worker = int(proc.stdout.split()[0])

    def gone() -> bool:
        try:
            return Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True

    deadline = time.monotonic() + 30
    while not gone():
        assert time.monotonic() < deadline, f"orphaned worker {worker} still running"
        time.sleep(0.05)
    assert not marker.exists()


def write_even_shards(directory, shards: int = 8, per_shard: int = 12) -> SplitSource:
    """`shards` npy shards of `per_shard` 8x8 images each, every image a different colour."""
    import io

    import numpy as np
    import webdataset as wds

    urls = []
    for s in range(shards):
        urls.append(str(directory / f"train-{s:06d}.tar"))
        with wds.TarWriter(urls[-1]) as sink:
            for i in range(per_shard):
                buf = io.BytesIO()
                np.save(buf, np.full((8, 8, 3), s * per_shard + i, np.uint8))
                sink.write({"__key__": f"{s:02d}-{i:02d}", "npy": buf.getvalue(), "json": b"{}"})
    return SplitSource(urls, shards * per_shard, [], {url: per_shard for url in urls})


def epoch_keys(stream, epoch: int, workers: int = 0, start: int = 0) -> list[str]:
    stream.set_position(epoch, start)
    return [k for batch in (stream if isinstance(stream, CachedTrainSplit) else make_loader(stream, workers))
            for k in batch["key"]]


def test_a_cached_epoch_sees_the_samples_a_streamed_epoch_sees_and_resumes_at_a_batch(tmp_path):
    # 2 ranks x 2 workers: each worker streams 2 shards, all of their samples (unshuffled: a shuffle buffer could
    # hold some back and pass on the first samples of the worker's next cycle through its shards instead)
    source = write_even_shards(tmp_path)
    n = batches_per_epoch(source.num_samples, 6, world=2, grad_accum=1)
    streams = [TrainStream(source, 6, n, rank, 2, 2, seed=3, shuffle_buffer=0) for rank in range(2)]
    caches = [CachedTrainSplit(stream, "memory", torch.device("cpu"), 8, num_workers=2) for stream in streams]
    for stream, cache in zip(streams, caches, strict=True):
        streamed, cached = epoch_keys(stream, 0, workers=2), epoch_keys(cache, 0)
        assert len(cached) == len(streamed) == 48 and set(cached) == set(streamed)  # the rank's first-epoch shards
        assert cache.images.dtype == torch.uint8 and cache.images.shape == (48, 3, 8, 8)
        assert epoch_keys(cache, 1) != cached and set(epoch_keys(cache, 1)) == set(cached)  # reshuffled each epoch
        assert epoch_keys(cache, 1, start=5) == epoch_keys(cache, 1)[30:]  # a resume at batch 5 goes on from there
    assert not set(epoch_keys(caches[0], 0)) & set(epoch_keys(caches[1], 0))  # ranks hold disjoint shards
    batch = next(iter(caches[0]))
    assert [int(image[0, 0, 0]) for image in batch["image"]] == [  # each image is its key's
        12 * int(key[:2]) + int(key[3:]) for key in batch["key"]]


def test_a_cache_fills_every_batch_of_a_rank_whose_shards_hold_fewer_samples(tmp_path):
    source = write_even_shards(tmp_path, shards=3, per_shard=5)  # rank 0 holds 2 shards (10 samples), rank 1 one
    stream = TrainStream(source, 4, 3, 1, 2, 1, seed=0, shuffle_buffer=0)
    keys = epoch_keys(CachedTrainSplit(stream, "memory", torch.device("cpu"), 8, num_workers=0), 0)
    assert len(keys) == 12 and set(keys) == {k for u in stream.rank_shards(0) for k in
                                             (f"{int(u[-10:-4]):02d}-{i:02d}" for i in range(5))}


def test_a_cache_that_does_not_fit_is_refused_in_one_line_with_the_estimate_and_the_free_memory():
    with pytest.raises(UserError) as refused:
        check_fits("memory", int(2.0e9), torch.device("cpu"), holders=4, free=int(7.5e9))
    assert str(refused.value) == (
        "data.cache=memory: the training images take 8.00 GB (2.00 GB per rank x 4 processes on this node), but cpu "
        "has 7.50 GB free (a cache may take 80% of it): use data.cache=none, or smaller images")
    check_fits("memory", int(2.0e9), torch.device("cpu"), holders=4, free=int(10.1e9))  # fits
    with pytest.raises(UserError, match=r"^data.cache=device: the training images take 2.00 GB, but cuda:0 has 1.50 GB "
                                        r"free .*: use data.cache=memory, data.cache=none, or smaller images$"):
        check_fits("device", int(2.0e9), torch.device("cuda:0"), holders=1, free=int(1.5e9))


@pytest.mark.parametrize("cpus,local,shards,world,expected", [
    (16, 1, 100, 1, 8),  # capped at 8
    (16, 2, 100, 2, 7),  # this process's share, one CPU left for it
    (2, 2, 100, 2, 0),  # no CPU to spare: loading in the process
    (16, 1, 9, 4, 2),  # 4 ranks x 2 workers <= 9 shards
])
def test_auto_workers_takes_this_processs_share_of_the_cpus_within_what_the_shards_allow(cpus, local, shards, world,
                                                                                        expected):
    workers, note = auto_workers(cpus, local, shards, world)
    assert workers == expected
    assert (note == "data.num_workers=auto: 2 worker(s) per rank, not 8: 9 training shard(s) for 4 rank(s) (write "
                    "smaller shards with --shard-size for more)") if shards == 9 else note == ""
