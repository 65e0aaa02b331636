"""Shared fixtures: a small synthetic CelebA and its shards, made once per test session, and the harness
every test starts its subprocesses through (`processes`), which leaves nothing running behind a test."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


class ProcessGroups:
    """Starts subprocesses, each as the leader of a process group of its own, and SIGKILLs every group it
    started when closed: a launcher's ranks, an `mlflow server`'s workers or a loader's workers die with the
    test that started them, also when it failed or ran past pytest's timeout."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def popen(self, cmd: Sequence, **popen_kwargs) -> subprocess.Popen:
        proc = subprocess.Popen([str(c) for c in cmd], start_new_session=True, **popen_kwargs)
        self.started.append(proc)
        return proc

    def run(self, cmd: Sequence, timeout: float, input: str | None = None, **popen_kwargs) -> subprocess.CompletedProcess:
        """`subprocess.run(cmd, capture_output=True, text=True)`, but a timeout kills the whole group and fails
        the test with the end of its stderr."""
        proc = self.popen(cmd, stdin=subprocess.PIPE if input is not None else None, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **popen_kwargs)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(proc)
            out, err = proc.communicate()
            raise AssertionError(f"still running after {timeout:.0f} s, killed: {proc.args}\n{err[-3000:]}") from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        """SIGKILL the process group, even where its leader has exited and left children behind."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def __enter__(self) -> "ProcessGroups":
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.started:
            self.kill(proc)


@pytest.fixture
def processes():
    """Start a test's subprocesses through this (`processes.popen(cmd, **kw)`, `processes.run(cmd, timeout, ...)`):
    every process group it started is killed in teardown."""
    with ProcessGroups() as groups:
        yield groups


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.2):
    """Poll `condition` until it returns something true, and return that; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout:.0f} s for {what}")
        time.sleep(interval)
    return result


def run_tool(script: str, *args: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run `tools/SCRIPT` (or `-m module`) as a user would, capturing its output."""
    cmd = [sys.executable, *(["-m", script[3:]] if script.startswith("-m ") else [str(ROOT / "tools" / script)])]
    with ProcessGroups() as groups:
        proc = groups.run([*cmd, *args], timeout, cwd=kw.pop("cwd", ROOT), **kw)
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
    with ProcessGroups() as groups:
        proc = groups.run([sys.executable, "-m", "dfcvae_dist.train", "--config", ROOT / "configs" / "quickstart.yaml",
                           f"data.shards={shard_dir}", f"train.run_dir={work / 'run'}", "train.max_steps=6",
                           "train.batch_size=16", "train.val_every_steps=0", "log.enabled=false"], 600, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "run"


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(groups, root, port):
    """A real `mlflow server` on loopback, in a process group of its own: it serves from worker children."""
    server = groups.popen([Path(sys.executable).parent / "mlflow", "server", "--host", "127.0.0.1", "--port", port,
                           "--backend-store-uri", f"sqlite:///{root}/store.db", "--default-artifact-root",
                           root / "artifacts", "--workers", "1"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, cwd=root, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    wait_until(lambda: healthy(f"http://127.0.0.1:{port}"), 90, f"mlflow server on port {port} to answer /health")
    return server


def healthy(uri):
    try:
        return urllib.request.urlopen(uri + "/health", timeout=1).status == 200
    except OSError:
        return False


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
