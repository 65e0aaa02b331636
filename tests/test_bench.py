"""tools/bench.py --quick as a smoke test: it runs and writes JSON with every stable key (no timing asserted)."""

import json
import math

import pytest

from tests.conftest import run_tool

pytestmark = pytest.mark.slow

KEYS = ["train_step.ours_img_s", "train_step.plain_img_s", "train_step.ratio", "loader.ours_img_s",
        "loader.jpeg_img_s", "loader.ratio", "limit.matmul_gflops", "limit.conv_gflops", "limit.step_gflop_per_img",
        "limit.fraction", "extract.img_s", "extract.ratio_to_train", "svm.seconds", "svm.n", "scaling.img_s_1proc",
        "scaling.img_s_2proc"]


def test_quick_bench_writes_every_key(tmp_path):
    run_tool("bench.py", "--quick", "--json", tmp_path / "bench.json", "--svm-n", "5000")
    result = json.loads((tmp_path / "bench.json").read_text())
    for key in KEYS:
        section, name = key.split(".")
        value = result[section][name]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, key
    assert result["machine"]["cpus"] >= 1 and result["svm"]["n"] == 5000
    assert result["train_step"]["ratio"] == pytest.approx(
        result["train_step"]["ours_img_s"] / result["train_step"]["plain_img_s"])
