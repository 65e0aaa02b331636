"""Shared fixtures: a small synthetic CelebA and its shards, made once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def run_tool(script: str, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run `tools/SCRIPT` (or `-m module`) as a user would, capturing its output."""
    cmd = [sys.executable, *(["-m", script[3:]] if script.startswith("-m ") else [str(ROOT / "tools" / script)])]
    proc = subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, cwd=kw.pop("cwd", ROOT), **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def celeba_dir(tmp_path_factory) -> Path:
    from dfcvae_dist.data.synthetic import make_synthetic_celeba

    out = tmp_path_factory.mktemp("celeba")
    make_synthetic_celeba(out, num=400, seed=0, workers=2)
    return out


@pytest.fixture(scope="session")
def shard_dir(celeba_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "paper-32"
    run_tool("make_shards.py", "--celeba-root", celeba_dir, "--out", out, "--image-size", "32", "--shard-size", "40")
    return out


@pytest.fixture(scope="session")
def trained_run(shard_dir, tmp_path_factory) -> Path:
    """A DFC-VAE (32x32, random VGG) trained for a few steps by the real trainer: its run directory."""
    work = tmp_path_factory.mktemp("trained")
    proc = subprocess.run([sys.executable, "-m", "dfcvae_dist.train", "--config", str(ROOT / "configs" / "quickstart.yaml"),
                           f"data.shards={shard_dir}", f"train.run_dir={work / 'run'}", "train.max_steps=6",
                           "train.batch_size=16", "train.val_every_steps=0", "log.enabled=false"],
                          cwd=work, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "run"
