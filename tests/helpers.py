"""Helpers the test modules share (fixtures live in conftest.py): the subprocess harness (`ProcessGroups`,
`run_tool`, `wait_until`), a real `mlflow server`, the trainer as a user launches it, Slurm job polling and
synthetic latents."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


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

    def run(self, cmd: Sequence, timeout: float, input: str | None = None,
            **popen_kwargs) -> subprocess.CompletedProcess:
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


def wait_until(condition: Callable[[], object], timeout: float, what: str | Callable[[], str], interval: float = 0.2):
    """Poll `condition` until it returns something true, and return that; fail naming `what` after `timeout` s
    (a callable `what` is asked then: a log's tail at the time of the failure)."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout:.0f} s for {what() if callable(what) else what}")
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


# The trainer as a user launches it: one process, or `accelerate launch` for several.

def base_args(shard_dir, run_dir, *overrides):
    return ["--config", str(ROOT / "configs" / "quickstart.yaml"), f"data.shards={shard_dir}",
            f"train.run_dir={run_dir}", "train.batch_size=16", "train.val_every_steps=0", "log.every_steps=1",
            "log.image_every_steps=0", "data.num_workers=1", *overrides]


def env_for(tmp_path):
    """The environment of a trainer launched in `tmp_path`: its MLflow store there, made already (MLflow's schema
    migrations cost each new store about a second of CPU; the Slurm, sweep and README tests start from none), and
    this environment's bin first on PATH: the one `ninja` that the Slurm jobs' activated environment also finds
    builds DeepSpeed's CPU extension (two ninjas' logs disagree, and each launch rebuilt it)."""
    store = tmp_path / "mlflow.db"
    if not store.exists():
        shutil.copyfile(empty_mlflow_store(), store)
        with sqlite3.connect(store) as db:  # its Default experiment where a store made here would keep it
            db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                       ((tmp_path / "mlruns" / "0").as_uri(),))
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}", "MLFLOW_DISABLE_TELEMETRY": "true",
            "PATH": path}


@functools.cache
def empty_mlflow_store() -> Path:
    import mlflow

    folder = Path(tempfile.mkdtemp(prefix="mlflow-store-"))
    atexit.register(shutil.rmtree, folder, True)
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db").search_experiments()
    return folder / "mlflow.db"


def same_weights(run_a: Path, run_b: Path, step: int) -> bool:
    """The two runs' step-`step` checkpoints hold the same weights, bit for bit (BatchNorm's statistics too)."""
    import torch
    from safetensors.torch import load_file

    a, b = (load_file(run / "checkpoints" / f"step-{step:08d}" / "weights.safetensors") for run in (run_a, run_b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def launch_cmd(nproc):
    if nproc == 1:
        return [sys.executable, "-m", "dfcvae_dist.train"]
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(nproc),
            "--num_machines", "1", "--mixed_precision", "no", "-m", "dfcvae_dist.train"]


def train(tmp_path, shard_dir, run_dir, *overrides, nproc=1, check=True, env=None, **popen_kwargs):
    with ProcessGroups() as groups:
        proc = groups.run([*launch_cmd(nproc), *base_args(shard_dir, run_dir, *overrides)], 600, cwd=tmp_path,
                          env={**env_for(tmp_path), **(env or {})}, **popen_kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def image_steps(client, run_id) -> dict[str, list[int]]:
    """The steps of each image key of a run (MLflow stores `images/KEY+step+N+...png`, plus a webp preview)."""
    steps = {}
    for artifact in client.list_artifacts(run_id, "images"):
        name = artifact.path.removeprefix("images/")
        if name.endswith(".png") and "+step+" in name:
            key, _, step = name.split("+")[:3]
            steps.setdefault(key, []).append(int(step))
    return {key: sorted(found) for key, found in steps.items()}


# Slurm jobs on the private cluster (tests/slurm_cluster.py).

RUNNING = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}


def wait_ended(cluster, job, out, timeout):
    """Wait until the job has left every running or requeued state; its final state."""
    wait_until(lambda: cluster.job_state(job) not in RUNNING, timeout, lambda: job_status(cluster, job, out), 1)
    return cluster.job_state(job)


def log_tail(out):
    return out.read_text()[-4000:] if out.exists() else ""


def job_status(cluster, job, out):
    """A job, its state and reason, and its log's tail: what a wait on it that timed out reports."""
    info = cluster.run("squeue", "-h", "-j", job, "-o", "%T %r %N", check=False).stdout.strip()
    return f"job {job} ({info or cluster.job_state(job)}):\n{log_tail(out)}"


def preempt_after_first_checkpoint(cluster, job, run_dir, out):
    """What --signal=B:USR1@N sends before the time limit, once the trainer has saved (so it is listening).
    scancel's own exit status is not the contract (it was seen to return 1 once although the signal had been
    delivered): the job's log and state are."""
    wait_until(lambda: (run_dir / "checkpoints" / "latest").exists(), 240,
               lambda: f"the first checkpoint of {job_status(cluster, job, out)}")
    return cluster.run("scancel", "--batch", "--signal=USR1", job, check=False)


# Latents as tools/extract_latents.py writes them, with a linearly decodable and a noise attribute.

def synthetic_latents(n=3000, attributes=40, seed=0):
    """Train, val and test in the proportions 4:1:1 (2000, 500, 500 for n=3000)."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(n, 10)).astype(np.float32)
    attrs = np.zeros((n, attributes), dtype=np.uint8)
    attrs[:, 0] = (mu[:, 0] + 0.5 * mu[:, 3] > 0.3)  # a linear function of the features
    attrs[:, 1] = rng.random(n) < 0.3  # noise, 70 % majority
    attrs[:, 2:] = rng.random((n, attributes - 2)) < 0.5
    val = test = n // 6
    return {"keys": np.array([f"{i:06d}" for i in range(n)]), "mu": mu, "logvar": np.zeros_like(mu), "attrs": attrs,
            "partition": np.repeat([0, 1, 2], [n - val - test, val, test]).astype(np.int8),
            "attribute_names": np.array([f"attr{i}" for i in range(attributes)]), "checkpoint": np.array("ckpt"),
            "features": np.array("latent"), "weights": np.array("trained"),
            "synthetic": np.array("false"), "loss_weights": np.array("imagenet")}  # as on CelebA with ImageNet VGG19
