"""The benchmark: interleaved rounds, a machine limit that is flagged rather than clamped, and the JSON that
`dfcvae-bench --quick` writes (structure and sanity of every figure; no timing asserted)."""

import json
import math

import pytest
import torch

from dfcvae_dist.bench.kernels import fraction_of_peak
from dfcvae_dist.bench.step import PRECISIONS
from dfcvae_dist.bench.timing import interleaved, spread
from tests.conftest import ROOT, run_tool


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
    run_tool("bench.py", "--quick", "--json", out, "--svm-n", "5000")
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
    assert positive(quick["extract"]["img_s"]) and positive(quick["svm"]["seconds"]) and quick["svm"]["n"] == 5000
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
