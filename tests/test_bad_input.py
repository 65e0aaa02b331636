"""Every entry point, given a path that does not exist: exit 2, one `error:` line naming it, no traceback."""

import pytest

from dfcvae_dist.errors import one_line
from tests.conftest import run_tool

MISSING = "/nonexistent/dfcvae"


@pytest.mark.parametrize("tool,args", [
    ("make_shards.py", ["--celeba-root", MISSING, "--out", "{tmp}/o"]),
    ("make_shards.py", ["--verify", MISSING]),
    ("extract_latents.py", ["--checkpoint", MISSING, "--shards", MISSING, "--out", "{tmp}/o"]),
    ("eval_svm.py", ["--latents", MISSING, "--out", "{tmp}/o"]),
    ("explore_latents.py", ["--checkpoint", MISSING, "--latents", MISSING, "--shards", MISSING, "--out", "{tmp}/o"]),
    ("quality.py", ["--checkpoint", f"a={MISSING}", "--shards", MISSING, "--vgg-weights", "random", "--out", "{tmp}/o"]),
    ("-m dfcvae_dist.train", ["--config", MISSING]),
    ("-m dfcvae_dist.train", [f"data.shards={MISSING}", "train.run_dir={tmp}/run", "log.enabled=false"]),
], ids=lambda v: v if isinstance(v, str) else "")
def test_missing_path_is_one_clear_line(tmp_path, tool, args):
    proc = run_tool(tool, *[a.format(tmp=tmp_path) for a in args], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and MISSING in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_debug_flag_shows_the_traceback(tmp_path):
    proc = run_tool("eval_svm.py", "--latents", MISSING, "--out", tmp_path, "--debug", check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_one_line_is_the_first_line_of_a_library_message_at_most_limit_characters():
    torch_error = ValueError("Error(s) in loading state_dict:\n\tMissing key(s)")
    assert one_line(torch_error) == "Error(s) in loading state_dict:" and one_line(torch_error, limit=8) == "Error(s)"
    assert one_line(OSError()) == "OSError"  # no message: its class
    wrapped = ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                         "last):\n  File \"x.py\", line 1, in f\nValueError: x.tar: damaged\n")
    assert one_line(wrapped) == "x.tar: damaged"
