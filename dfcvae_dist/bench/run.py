"""The benchmark's sections, each a function returning its part of the JSON (keys are stable)."""

from __future__ import annotations

import functools
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dfcvae_dist.bench import kernels, step, step_overhead, workloads
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

    @classmethod
    def for_run(cls, device: str, quick: bool, svm_n: int | None = None) -> "BenchSettings":
        workers = [1, 2] if device == "cpu" else [w for w in (1, 2, 4, 8) if w <= (os.cpu_count() or 1)]
        if quick:
            return cls(device, True, batch=16, rounds=2, loader_rounds=2, block_s=0.05, kernel_block_s=0.05,
                       compile_variants=["off"], loader_workers=[1], loader_batches=8, synthetic_images=400,
                       svm_n=svm_n or 20_000)
        block_s = 1.0 if device == "cpu" else 0.2
        return cls(device, False, block_s=block_s, loader_workers=workers, svm_n=svm_n or cls.svm_n)


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


def run(s: BenchSettings, say=print) -> dict:
    """Every section in one process, on synthetic data in a temporary directory."""
    r = {"machine": machine(), "settings": asdict(s)}
    start = time.perf_counter()
    say = functools.partial(lambda say, text: say(f"[{time.perf_counter() - start:4.0f}s] {text}"), say)
    with tempfile.TemporaryDirectory(prefix="dfcvae-bench-") as tmp:
        work = Path(tmp)
        say("making synthetic data ...")
        make_data(s, work)
        say("training step (ours and the plain reference) and machine-limit kernels, interleaved ...")
        step_rates, kernel_rates, skipped, settings = timed_rounds(s)
        r["train_step"] = train_step_section(s, step_rates, skipped, settings)
        r["limit"] = limit_section(r["train_step"], step_rates, kernel_rates)
        say("data loading ...")
        r["loader"] = loader_section(s, work)
        r["paper_phase"] = paper_phase_section(r["train_step"], r["loader"])
        say("extraction and SVM ...")
        ext = workloads.extraction_img_s(torch.device(s.device), 256, s.image_size, s.block_s)
        headline = r["train_step"]["variants"][r["train_step"]["headline"]]["img_s"]["median"]
        r["extract"] = {"img_s": ext, "ratio_to_train": ext / headline}
        r["svm"] = {"seconds": workloads.svm_seconds(s.svm_n), "n": s.svm_n}
        say("scaling: 1 and 2 processes ...")
        r["scaling"] = scaling_section(s, work)
        say("step overhead: host syncs and collectives per step of a 2-process run ...")
        r["step_overhead"] = step_overhead_section(s, work)
    return r


def step_overhead_section(s: BenchSettings, work: Path) -> dict:
    if s.quick:
        return {"host_syncs": None, "collectives": None, "host_to_device_copies": None,
                "skipped": "--quick: a 2-process run (tests/test_train.py asserts the same counts)"}
    nproc = 2 if s.device == "cpu" else min(2, torch.cuda.device_count())  # one process per GPU
    profile = step_overhead.measure(work / "shards-npy", work, image_size=s.image_size, nproc=nproc)
    return {k: v for k, v in profile.items() if k != "per_step"}
