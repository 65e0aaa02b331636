"""The benchmark's sections, each a function returning its part of the JSON (keys are stable)."""

from __future__ import annotations

import datetime
import functools
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from dfcvae_dist.bench import SECTIONS, end_to_end, kernels, step, step_overhead, workloads
from dfcvae_dist.bench.timing import interleaved, paired_ratio, rate_per_round, spread

PAPER_EPOCHS, CELEBA_TRAIN_IMAGES = 5, 162_770  # the paper's training phase, at 64x64


@dataclass
class BenchSettings:
    device: str = "cpu"
    quick: bool = False
    batch: int = 64
    image_size: int = 64
    rounds: int = 4  # interleaved rounds of every timed step and kernel
    loader_rounds: int = 3
    block_s: float = 1.0  # seconds of calls per timed step block (at least one call)
    kernel_block_s: float = 0.5  # the same for each machine-limit kernel
    # train.compile modes of the <precision>_<mode> variants; the first one's fp32 variant is the headline
    compile_variants: list[str] = field(default_factory=lambda: ["loss", "off", "step"])
    loader_workers: list[int] = field(default_factory=lambda: [1, 2])
    loader_batches: int = 80  # batches per loader pass
    synthetic_images: int = 2000
    svm_n: int = 100_000  # latents (100-d) in the SVM figure
    e2e_runs: list[list[str]] = field(default_factory=lambda: [list(r) for r in end_to_end.CPU_RUNS])  # config, variant
    e2e_warmup_steps: int = 3
    e2e_steady_images: int = 960  # whole steps covering this many images are timed
    e2e_split_images: int = 0  # images in the end-to-end shards (0: the bench's synthetic shards)
    sections: list[str] = field(default_factory=lambda: list(SECTIONS))

    @classmethod
    def for_run(cls, device: str, quick: bool, svm_n: int | None = None,
                sections: list[str] | None = None) -> "BenchSettings":
        workers = [1, 2] if device == "cpu" else [w for w in (1, 2, 4, 8) if w <= (os.cpu_count() or 1)]
        runs = [list(r) for r in (end_to_end.CPU_RUNS if device == "cpu" else end_to_end.GPU_RUNS)]
        sections = sections or list(SECTIONS)
        if quick:
            return cls(device, True, batch=8, rounds=2, loader_rounds=2, block_s=0.05, kernel_block_s=0.05,
                       compile_variants=["off"], loader_workers=[1], loader_batches=8, synthetic_images=400,
                       svm_n=svm_n or 20_000, e2e_runs=runs[:2] if device == "cpu" else runs,  # 123 only
                       e2e_warmup_steps=1, e2e_steady_images=24,
                       sections=sections)
        if device == "cpu":
            return cls(device, False, loader_workers=workers, svm_n=svm_n or cls.svm_n, sections=sections)
        # A GPU takes tens of thousands of images a second: an epoch of the 2,000 synthetic faces would be
        # over before the loader's workers are up.
        return cls(device, False, block_s=0.2, loader_workers=workers, svm_n=svm_n or cls.svm_n, e2e_runs=runs,
                   e2e_warmup_steps=20, e2e_steady_images=40_000, e2e_split_images=50_000, sections=sections)


def provenance() -> dict:
    """When and from which commit of the code a run was made (uncommitted changes: `dirty`). A copy of the working
    tree without its git directory takes the commit from DFCVAE_COMMIT (benchmarks/gpu-check.sh sets it)."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(workloads.ROOT), *args], capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git("rev-parse", "HEAD") or os.environ.get("DFCVAE_COMMIT"),
            "dirty": bool(status) if status is not None else None}


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def variant_name(precision: str, compile_mode: str) -> str:
    return f"{precision}_{step.COMPILE_NAMES[compile_mode]}"


def timed_rounds(s: BenchSettings) -> tuple[dict, dict, dict, dict]:
    """Our step in every precision worth timing here and each of `s.compile_variants`, the trainer's defaults on
    this device, the plain fp32 reference, and the machine-limit kernels of each precision, all interleaved in the
    same rounds. Returns (variant -> img/s per round, precision -> kernel -> GFLOP/s per round, skipped
    precision -> why, variant -> its settings)."""
    device = torch.device(s.device)
    skipped = {p: reason for p in step.PRECISIONS if (reason := step.slow_precision_reason(device, p))}
    measured = [p for p in step.PRECISIONS if p not in skipped]
    variants = step.step_variants(device, measured, s.compile_variants)
    steps = {"plain": rate_per_round(step.plain_step(device, s.batch, s.image_size), s.batch, 2, s.block_s)}
    for name, variant in variants.items():  # warm-up: compiling, and under CUDA graphs recording at the second call
        steps[name] = rate_per_round(step.train_step(device, s.batch, s.image_size, variant), s.batch, 3, s.block_s)
    limits = {p: kernels.kernel_rates(device, p, s.quick, s.kernel_block_s) for p in measured}
    rates = interleaved({**steps, **{k: fn for p in measured for k, fn in limits[p].items()}}, s.rounds)
    settings = {name: v.settings() for name, v in variants.items()}
    return ({n: rates[n] for n in steps}, {p: {k: rates[k] for k in limits[p]} for p in measured}, skipped, settings)


def train_step_section(s: BenchSettings, rates: dict[str, list[float]], skipped: dict[str, str],
                       settings: dict[str, dict]) -> dict:
    """img/s of each variant, its paired ratio to the plain reference, its settings and FLOPs per image;
    `headline` is the like-for-like one (fp32)."""
    device = torch.device(s.device)
    flops = {layers: step.step_flops_per_image(device, s.batch, s.image_size, layers=layers) / 1e9
             for layers in {v["layers"] for v in settings.values()}}
    variants = {name: {"img_s": spread(r)} for name, r in rates.items()}
    for name in variants.keys() - {"plain"}:
        variants[name].update(ratio_to_plain=paired_ratio(rates[name], rates["plain"]), settings=settings[name],
                              gflop_per_img=flops[settings[name]["layers"]])
    plain = step.step_flops_per_image(device, s.batch, s.image_size, plain=True) / 1e9
    variants["plain"].update(settings={"precision": "fp32"}, gflop_per_img=plain)
    return {"headline": variant_name("fp32", s.compile_variants[0]), "variants": variants, "skipped": skipped,
            "gflop_per_img": flops["123"], "plain_gflop_per_img": plain, "flop_ratio": plain / flops["123"]}


def limit_section(train: dict, step_rates: dict[str, list[float]], kernel_rates: dict[str, dict]) -> dict:
    """Each variant's counted FLOP rate as a fraction of the best kernel in its model's precision."""
    fractions = {}
    for name, rates in step_rates.items():
        variant = train["variants"][name]
        fractions[name] = kernels.fraction_of_peak(variant["gflop_per_img"], rates,
                                                   kernel_rates[variant["settings"]["precision"]])
    return {"kernel_gflops": {p: {k: spread(v) for k, v in ks.items()} for p, ks in kernel_rates.items()},
            "fractions": fractions, **fractions[train["headline"]],
            "above_peak": sorted(name for name, f in fractions.items() if f["above_peak"])}


def loader_section(s: BenchSettings, work: Path) -> dict:
    """Our npy shards with N workers, png shards and an ImageFolder-style JPEG folder with one, interleaved."""
    def ours(fmt: str, workers: int):
        return lambda: workloads.shard_loader_img_s(work / f"shards-{fmt}", s.batch, s.loader_batches, workers)

    contestants = {f"npy_{w}": ours("npy", w) for w in s.loader_workers}
    contestants["png_1"] = ours("png", 1)
    contestants["jpeg_1"] = lambda: workloads.jpeg_folder_img_s(work / "celeba" / "img_align_celeba", s.batch,
                                                                s.synthetic_images, s.image_size)
    rates = interleaved(contestants, s.loader_rounds)
    return {"npy_img_s_by_workers": {str(w): spread(rates[f"npy_{w}"]) for w in s.loader_workers},
            "png_img_s": spread(rates["png_1"]), "jpeg_img_s": spread(rates["jpeg_1"]),
            "ratio_to_jpeg": paired_ratio(rates["npy_1"], rates["jpeg_1"]),
            "png_ratio_to_jpeg": paired_ratio(rates["png_1"], rates["jpeg_1"])}


def paper_phase_section(train: dict, loader: dict) -> dict:
    """Wall time of the paper's training (5 epochs of CelebA's train split) in one process here: the fastest
    step variant with the 123 loss, unless the loader at its best worker count is slower."""
    ours = {n: v["img_s"]["median"] for n, v in train["variants"].items()
            if n != "plain" and v["settings"]["layers"] == "123"}
    fastest = max(ours, key=ours.get)
    workers = max(loader["npy_img_s_by_workers"], key=lambda w: loader["npy_img_s_by_workers"][w]["median"])
    loader_img_s = loader["npy_img_s_by_workers"][workers]["median"]
    img_s = min(ours[fastest], loader_img_s)
    images = PAPER_EPOCHS * CELEBA_TRAIN_IMAGES
    return {"images": images, "variant": fastest, "loader_workers": int(workers), "img_s": img_s,
            "bound_by": "train_step" if ours[fastest] <= loader_img_s else "loader", "hours": images / img_s / 3600}


def scaling_section(s: BenchSettings, work: Path) -> dict:
    base = {"allreduce_mb_per_step": workloads.allreduce_mb_per_step(s.image_size)}
    if s.quick:
        return {**base, "skipped": "--quick: real training runs take a minute (tests/test_train.py runs them)"}
    if s.device == "cuda" and torch.cuda.device_count() < 2:
        return {**base, "skipped": f"{torch.cuda.device_count()} GPU: the 2-process run needs two"}
    return {**workloads.scaling_img_s(work / "shards-npy", 12, 32, s.image_size, work), **base}


def make_data(s: BenchSettings, work: Path) -> None:
    from dfcvae_dist.data import shards
    from dfcvae_dist.data.synthetic import make_synthetic_celeba

    make_synthetic_celeba(work / "celeba", s.synthetic_images, seed=0)
    names, samples = shards.celeba_samples(work / "celeba")
    for fmt in ("png", "npy"):
        shards.make_shards(names, samples, work / f"shards-{fmt}", shards.ShardSettings(s.image_size, "paper", fmt, 50),
                           workers=2)


def run(s: BenchSettings, say=print, save: Callable[[dict], None] = lambda r: None) -> dict:
    """The sections of `s.sections` in one process, on synthetic data in a temporary directory; `save` gets the
    results so far after each one (a run cut short keeps them)."""
    r = {"machine": machine(), "provenance": provenance(), "settings": asdict(s)}
    start = time.perf_counter()
    say = functools.partial(lambda say, text: say(f"[{time.perf_counter() - start:4.0f}s] {text}"), say)
    with tempfile.TemporaryDirectory(prefix="dfcvae-bench-") as tmp:
        work = Path(tmp)
        say("making synthetic data ...")
        make_data(s, work)
        if "train_step" in s.sections:
            say("training step (ours and the plain reference) and machine-limit kernels, interleaved ...")
            step_rates, kernel_rates, skipped, settings = timed_rounds(s)
            r["train_step"] = train_step_section(s, step_rates, skipped, settings)
            r["limit"] = limit_section(r["train_step"], step_rates, kernel_rates)
            save(r)
        if "loader" in s.sections:
            say("data loading ...")
            r["loader"] = loader_section(s, work)
            if "train_step" in r:
                r["paper_phase"] = paper_phase_section(r["train_step"], r["loader"])
            save(r)
        if "extract" in s.sections:
            say("extraction ...")
            r["extract"] = extract_section(s, r.get("train_step"))
            save(r)
        if "svm" in s.sections:
            say("SVM ...")
            r["svm"] = {"seconds": workloads.svm_seconds(s.svm_n), "n": s.svm_n}
            save(r)
        if "scaling" in s.sections:
            say("scaling: 1 and 2 processes ...")
            r["scaling"] = scaling_section(s, work)
            save(r)
        if "step_overhead" in s.sections:
            say("step overhead: host syncs and collectives per step of a 2-process run ...")
            r["step_overhead"] = step_overhead_section(s, work)
            save(r)
        if "end_to_end" in s.sections:
            r["end_to_end"] = {}
            end_to_end_section(s, work, r["end_to_end"], say, lambda: save(r))
    return r


def extract_section(s: BenchSettings, train: dict | None) -> dict:
    ext = workloads.extraction_img_s(torch.device(s.device), 256, s.image_size, s.block_s)
    if train is None:
        return {"img_s": ext}
    return {"img_s": ext, "ratio_to_train": ext / train["variants"][train["headline"]]["img_s"]["median"]}


def end_to_end_section(s: BenchSettings, work: Path, out: dict, say, save: Callable[[], None]) -> None:
    """The real trainer on shards on local disk, one process per (config, variant) of `s.e2e_runs`, filling `out`.
    On CPU the 123 loss with data.cache=memory is set against the step alone, timed just before and just after
    it (`ratio_to_step`); on a GPU every variant of the 123 loss against its default (`ratio_to_default`)."""
    device = torch.device(s.device)
    shards = work / "shards-npy"
    if s.e2e_split_images:
        say(f"end to end: writing {s.e2e_split_images:,} images of npy shards ...")
        shards = end_to_end.write_shards(work / "celeba", work / "shards-e2e", s.e2e_split_images, s.image_size,
                                         workers=os.cpu_count() or 1)
    out.update(runs={}, skipped={}, failed={})
    paired = ("dfcvae-123", "cache_memory") if device.type == "cpu" else None
    step_rate = rate_per_round(step.train_step(device, s.batch, s.image_size), s.batch, 1, 3 * s.block_s) \
        if paired and list(paired) in s.e2e_runs else None
    for config, variant in s.e2e_runs:
        name = end_to_end.run_name(config, variant)
        say(f"end to end: {name} ...")
        before = step_rate() if step_rate and (config, variant) == paired else None
        result = end_to_end.run(config, variant, shards, work, s.batch, s.image_size, s.e2e_warmup_steps,
                                s.e2e_steady_images)
        if "img_s" in result:
            out["runs"][name] = result
            if before is not None:
                around = [before, step_rate()]
                out["step_img_s"] = around
                out["ratio_to_step"] = result["img_s"] / (sum(around) / 2)
        else:
            out["skipped" if "skipped" in result else "failed"][name] = result.get("skipped") or result["failed"]
        save()
    default = out["runs"].get(end_to_end.run_name("dfcvae-123", "default"))
    if device.type == "cuda" and default:
        out["ratio_to_default"] = {name: r["img_s"] / default["img_s"] for name, r in out["runs"].items()
                                   if name.startswith("dfcvae-123/")}


def step_overhead_section(s: BenchSettings, work: Path) -> dict:
    if s.quick:
        return {"host_syncs": None, "collectives": None, "host_to_device_copies": None,
                "skipped": "--quick: a 2-process run (tests/test_train.py asserts the same counts)"}
    nproc = 2 if s.device == "cpu" else min(2, torch.cuda.device_count())  # one process per GPU
    profile = step_overhead.measure(work / "shards-npy", work, image_size=s.image_size, nproc=nproc)
    return {k: v for k, v in profile.items() if k != "per_step"}
