"""Shared fixtures: a small synthetic CelebA, its shards and a trained run, made once per test session (once for
all of pytest-xdist's workers), and the harness every test starts its subprocesses through (`processes`), which
leaves nothing running behind a test."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import urllib.request
from pathlib import Path

import pytest
from filelock import FileLock

from tests.helpers import ROOT, ProcessGroups, free_port, run_tool, start_server

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# A test that uses one of these is slow (`make test-fast` leaves it out): each trains, serves or boots a cluster.
SLOW_FIXTURES = {"trained_run", "mlflow_server", "cluster"}


# Modules whose module-scoped fixtures train, boot a cluster or start servers: pytest-xdist keeps each on one
# worker, so those fixtures are built once; every other test is scheduled on its own.
WHOLE_MODULES = {"test_bench", "test_image_folder", "test_logged_model", "test_losses", "test_quality", "test_report",
                 "test_studies", "test_slurm", "test_sweep"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


def pytest_configure(config):
    """Under pytest-xdist, each worker (every thread of it, numpy's BLAS pool included) and everything it starts
    runs on its own share of the cores. Torch sizes its thread pools by the CPUs a process may use
    (`cpus_available`), so the workers' processes no longer spin against each other: on 2 cores that had made
    single-process tools cost up to three times their CPU time."""
    worker, workers = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if worker and len(cpus) >= workers > 1:
        share = cpus[int(worker.removeprefix("gw")) % workers::workers]
        for thread in os.listdir("/proc/self/task"):
            with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                os.sched_setaffinity(int(thread), share)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`make test`'s `-n 2`: WHOLE_MODULES as one unit each (the largest first), the rest test by test. (xdist's
    own `--dist loadgroup` marks are lost under pytest 9, which no longer reads the node id it rewrites.)"""
    from xdist.scheduler import LoadScopeScheduling

    class WholeModules(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if Path(module).stem in WHOLE_MODULES else nodeid

    return WholeModules(config, log)


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(dir)` run by the first pytest-xdist worker that asks for `name`; the others wait for it and share
    the directory (in the session's common temp root). Without xdist, a plain session fixture."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out, done = root / name, root / f"{name}.done"
    with FileLock(root / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)  # what a worker whose build failed left
            out.mkdir()
            build(out)
            done.touch()
    return out


@pytest.fixture
def processes():
    """Start a test's subprocesses through this (`processes.popen(cmd, **kw)`, `processes.run(cmd, timeout, ...)`):
    every process group it started is killed in teardown."""
    with ProcessGroups() as groups:
        yield groups


@pytest.fixture(scope="session")
def celeba_dir(tmp_path_factory) -> Path:
    from dfcvae_dist.data.synthetic import make_synthetic_celeba

    return built_once(tmp_path_factory, "celeba", lambda out: make_synthetic_celeba(out, num=400, seed=0, workers=2))


@pytest.fixture(scope="session")
def shard_dir(celeba_dir, tmp_path_factory) -> Path:
    def build(out):
        run_tool("make_shards.py", "--celeba-root", celeba_dir, "--out", out / "paper-32", "--image-size", "32",
                 "--shard-size", "40")

    return built_once(tmp_path_factory, "shards", build) / "paper-32"


@pytest.fixture(scope="session")
def trained_run(shard_dir, tmp_path_factory) -> Path:
    """A DFC-VAE (32x32, random VGG) trained for a few steps by the real trainer: its run directory."""
    def build(work):
        with ProcessGroups() as groups:
            proc = groups.run([sys.executable, "-m", "dfcvae_dist.train", "--config",
                               ROOT / "configs" / "quickstart.yaml", f"data.shards={shard_dir}",
                               f"train.run_dir={work / 'run'}", "train.max_steps=6", "train.batch_size=16",
                               "train.val_every_steps=0", "log.enabled=false"], 600, cwd=work)
        assert proc.returncode == 0, proc.stderr[-3000:]

    return built_once(tmp_path_factory, "trained", build) / "run"


@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch):
    """An empty torch hub cache (yielded) and downloads that fail whatever the machine's network: every proxy
    variable, and the Hugging Face Hub's endpoint (HF_ENDPOINT; its cache HF_HOME empty too), points at a loopback
    port that is bound but never listens, so the connection is refused."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "huggingface"))
    # urlopen builds its opener, proxies included, on first use and keeps it: give this test its own, so the
    # refused proxy neither depends on earlier tests nor outlives this one
    monkeypatch.setattr(urllib.request, "_opener", None)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{closed.getsockname()[1]}")
        yield tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real `mlflow server` on loopback for the session (tests that hang or stop a server start their own)."""
    port = free_port()
    with ProcessGroups() as groups:
        start_server(groups, tmp_path_factory.mktemp("mlflow-server"), port)
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A private two-node Slurm cluster on this host (tests/slurm_cluster.py), one per test module using it."""
    from tests.slurm_cluster import SlurmCluster

    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()
