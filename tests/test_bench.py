"""The benchmark: interleaved rounds, a machine limit that is flagged rather than clamped, and the JSON that
`dfcvae-bench --quick` writes (structure and sanity of every figure; no timing asserted)."""

import json
import math
import subprocess

import pytest
import torch

from dfcvae_dist.bench.kernels import fraction_of_peak
from dfcvae_dist.bench.step import PRECISIONS
from dfcvae_dist.bench.timing import interleaved, spread
from tests.helpers import ROOT, run_tool


def test_contestants_alternate_order_every_round():
    calls = []
    rates = interleaved({"ours": lambda: calls.append("ours") or 2.0, "plain": lambda: calls.append("plain") or 1.0},
                        rounds=4)
    assert calls == ["ours", "plain", "plain", "ours", "ours", "plain", "plain", "ours"]
    assert rates == {"ours": [2.0] * 4, "plain": [1.0] * 4}


def test_spread_is_median_and_interquartile_range():
    s = spread([4.0, 1.0, 3.0, 2.0])
    assert (s["median"], s["iqr"], s["min"], s["max"]) == (2.5, 1.5, 1.0, 4.0)


def test_fraction_above_the_peak_is_flagged_not_clamped():
    kernels = {"matmul": [100.0, 80.0], "conv": [90.0, 120.0]}  # GFLOP/s per round
    result = fraction_of_peak(2.0, [60.0, 30.0], kernels)  # 120 and 60 GFLOP/s against peaks 100 and 120
    assert result["fraction"] == pytest.approx((1.2 + 0.5) / 2) and not result["above_peak"]
    assert result["kernel"] == "conv" and result["peak_gflops"] == pytest.approx(105.0)
    above = fraction_of_peak(2.0, [80.0, 90.0], kernels)
    assert above["fraction"] == pytest.approx((1.6 + 1.5) / 2) and above["above_peak"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_one_clear_line():
    proc = run_tool("bench.py", "--device", "cuda", "--quick", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --device cuda: torch sees no CUDA device on this machine; run with --device cpu"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    run_tool("bench.py", "--quick", "--json", out, "--svm-n", "2000")
    return json.loads(out.read_text())


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def assert_spread(s: dict, rounds: int, name: str):
    assert len(s["rounds"]) == rounds and all(map(positive, s["rounds"])), name
    assert s["min"] <= s["median"] <= s["max"] and 0 <= s["iqr"] <= s["max"] - s["min"], name


@pytest.mark.slow
def test_quick_step_figures_per_round_for_every_variant(quick):
    t, rounds = quick["train_step"], quick["settings"]["rounds"]
    assert rounds >= 2 and {"plain", "fp32_eager", t["headline"]} <= set(t["variants"])
    for name, v in t["variants"].items():
        assert_spread(v["img_s"], rounds, name)
        if name != "plain":
            assert_spread(v["ratio_to_plain"], rounds, name)
    measured = {v["settings"]["precision"] for name, v in t["variants"].items() if name.split("_")[0] in PRECISIONS}
    assert measured | set(t["skipped"]) == set(PRECISIONS) and not measured & set(t["skipped"])
    assert all(reason.strip() for reason in t["skipped"].values())
    assert positive(t["gflop_per_img"]) and t["plain_gflop_per_img"] > t["gflop_per_img"]
    assert t["variants"]["fp32_eager"]["gflop_per_img"] == t["gflop_per_img"]
    assert t["variants"]["default_345"]["settings"] == {"precision": "fp32", "network_dtype": "fp32", "compile": "off",
                                                       "layers": "345"}  # the trainer's default on CPU, 345 loss
    assert t["variants"]["default_345"]["gflop_per_img"] > t["gflop_per_img"]  # relu5_1 is deeper than relu3_1


@pytest.mark.slow
def test_quick_machine_limit_names_its_kernel_and_flags_every_variant_above_it(quick):
    lim, variants = quick["limit"], quick["train_step"]["variants"]
    fp32_kernels = lim["kernel_gflops"]["fp32"]
    assert lim["kernel"] in fp32_kernels
    assert lim["peak_gflops"] == pytest.approx(fp32_kernels[lim["kernel"]]["median"])
    assert set(lim["fractions"]) == set(variants)
    for name, f in lim["fractions"].items():
        assert positive(f["fraction"]) and f["above_peak"] == (f["fraction"] > 1), name
    assert lim["above_peak"] == sorted(name for name, f in lim["fractions"].items() if f["fraction"] > 1)
    assert lim["fraction"] == lim["fractions"][quick["train_step"]["headline"]]["fraction"]


@pytest.mark.slow
def test_quick_loader_paper_phase_and_step_overhead_left_to_the_trainer_test(quick):
    lo, pp = quick["loader"], quick["paper_phase"]
    assert set(lo["npy_img_s_by_workers"]) == {str(w) for w in quick["settings"]["loader_workers"]}
    for s in [*lo["npy_img_s_by_workers"].values(), lo["png_img_s"], lo["jpeg_img_s"], lo["ratio_to_jpeg"]]:
        assert_spread(s, quick["settings"]["loader_rounds"], "loader")
    assert pp["images"] == 5 * 162_770 and pp["variant"] in quick["train_step"]["variants"]
    assert pp["bound_by"] in {"train_step", "loader"}
    assert pp["hours"] == pytest.approx(pp["images"] / pp["img_s"] / 3600)
    assert positive(quick["extract"]["img_s"]) and positive(quick["svm"]["seconds"]) and quick["svm"]["n"] == 2000
    assert quick["step_overhead"]["host_syncs"] is None and "skipped" in quick["step_overhead"]


def keys(tree: dict, prefix: str = "") -> set[str]:
    """Dotted paths of every key, except inside the per-variant, per-kernel and per-worker maps."""
    out = set()
    for k, v in tree.items():
        out.add(prefix + k)
        if isinstance(v, dict) and k not in {"variants", "fractions", "kernel_gflops", "npy_img_s_by_workers",
                                             "skipped", "settings", "machine"}:
            out |= keys(v, f"{prefix}{k}.")
    return out


@pytest.mark.slow
def test_committed_cpu_results_are_a_full_run_with_the_quick_runs_keys(quick):
    full = json.loads((ROOT / "benchmarks" / "cpu-2core.json").read_text())
    assert not full["settings"]["quick"] and {"fp32_compiled", "fp32_eager"} <= set(full["train_step"]["variants"])
    skipped_when_quick = ("scaling.", "step_overhead.")  # --quick leaves both to the tests that run them
    quick_keys = {k for k in keys(quick) if not k.startswith(skipped_when_quick)}
    assert quick_keys <= keys(full)
    assert positive(full["scaling"]["img_s_1proc"]) and positive(full["scaling"]["img_s_2proc"])
    assert full["step_overhead"]["host_syncs"] == 0 and full["step_overhead"]["collectives"] == 0


@pytest.mark.slow
def test_quick_end_to_end_trains_with_a_shipped_config_and_sets_the_cached_trainer_against_the_step(quick):
    e2e = quick["end_to_end"]
    assert set(e2e["runs"]) == {"dfcvae-123/cache_memory", "dfcvae-123/default"}
    assert e2e["skipped"] == {} and e2e["failed"] == {}
    for name, run in e2e["runs"].items():
        assert run["config"] == "dfcvae-123" and run["device"] == "cpu" and run["warmup_steps"] == 1, name
        assert run["steady_steps"] == 3 and run["global_batch"] == 8 and positive(run["img_s"]), name
        assert run["img_s"] == pytest.approx(run["steady_steps"] * run["global_batch"] / run["steady_s"]), name
        assert 0 < run["first_step_s"] <= run["warmup_s"] and positive(run["startup_s"]), name
        assert run["process_s"] > run["startup_s"] + run["warmup_s"] + run["steady_s"], name
    assert positive(e2e["runs"]["dfcvae-123/cache_memory"]["cache_fill_s"])
    assert e2e["runs"]["dfcvae-123/default"]["cache_fill_s"] is None
    assert len(e2e["step_img_s"]) == 2 and all(map(positive, e2e["step_img_s"]))  # just before and just after
    assert e2e["ratio_to_step"] == pytest.approx(e2e["runs"]["dfcvae-123/cache_memory"]["img_s"] /
                                                 (sum(e2e["step_img_s"]) / 2))
    assert len(quick["provenance"]["commit"]) == 40 and quick["provenance"]["date"][:2] == "20"


@pytest.mark.slow
def test_an_end_to_end_variant_this_version_cannot_configure_is_skipped_with_its_one_line(tmp_path, shard_dir,
                                                                                         monkeypatch):
    from dfcvae_dist.bench import end_to_end

    monkeypatch.setitem(end_to_end.VARIANTS, "lever", ["train.lever=on"])  # as train.compile before it existed
    result = end_to_end.run("dfcvae-123", "lever", shard_dir, tmp_path, 8, 32, warmup_steps=1, steady_images=16)
    assert result == {"skipped": "error: command-line override 'train.lever=on': unknown key 'train.lever'"}


@pytest.mark.slow
def test_the_profile_of_the_real_trainer_counts_kernels_and_busy_time_on_cpu(tmp_path, shard_dir):
    run_tool("-m dfcvae_dist.bench.profile", "--out", tmp_path / "profile.json", "--steps", "2", "--warmup-steps", "1",
             "--config", "quickstart", f"data.shards={shard_dir}", f"train.run_dir={tmp_path / 'run'}",
             "train.batch_size=8", "model.base_channels=8", "model.latent_dim=16", "log.enabled=false",
             "train.val_every_steps=0", "train.resume=none", cwd=tmp_path)
    summary = json.loads((tmp_path / "profile.json").read_text())
    assert summary["device"] == "cpu" and summary["steps"] == 2 and summary["kernels_per_step"] >= 100
    assert 0.5 < summary["busy_share"] <= 1 and positive(summary["window_s"])
    assert "aten::convolution_backward" in {k["name"] for k in summary["top"]}


def test_a_gpu_trace_is_summarised_as_kernels_per_step_and_the_busy_share_of_the_window():
    from dfcvae_dist.bench.profile import WINDOW, summarize

    def event(name, cat, ts, dur):
        return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "tid": 1}

    trace = {"traceEvents": [event(WINDOW, "user_annotation", 100, 100),
                             event("gemm", "kernel", 90, 20),  # starts before the window: busy from 100, not counted
                             event("gemm", "kernel", 120, 20), event("relu", "kernel", 130, 20),  # overlapping
                             event("Memcpy HtoD", "gpu_memcpy", 170, 10), event("gemm", "kernel", 195, 10),
                             event("aten::mm", "cpu_op", 100, 100)]}
    summary = summarize(trace, "cuda", steps=2)
    assert summary["kernels_per_step"] == 1.5 and summary["window_s"] == 100e-6
    assert summary["busy_share"] == pytest.approx((10 + 30 + 10 + 5) / 100)
    assert summary["top"][0] == {"name": "gemm", "per_step": 1.0, "ms_per_step": 15e-3}


def test_the_gpu_check_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", ROOT / "benchmarks" / "gpu-check.sh"]).returncode == 0
