"""The run directory contract, and the one way this project writes a file atomically.

    RUN_DIR/
      config.yaml                      the resolved config of the newest launch
      RESUME_ME.json | COMPLETED.json  how the newest launch ended (read by slurm/train.sbatch)
      ranks/rank-N.json                per-rank parameter digest and first-epoch shards
      checkpoints/latest               the name of the newest complete checkpoint
      checkpoints/best                 the name of the best validated one (checkpoint.keep_best)
      checkpoints/step-NNNNNNNN/       trainer_state.json, weights.safetensors, config.yaml, accelerate's files

Nothing here imports accelerate, DeepSpeed or MLflow: serving code reads run directories too.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

from dfcvae_dist.errors import UserError

CONFIG_FILE = "config.yaml"
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "weights.safetensors"
RESUME_MARKER = "RESUME_ME.json"  # stopped early at a checkpoint: resume me
DONE_MARKER = "COMPLETED.json"
LOCK_FILE = ".lock"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
STEP_DIR = re.compile(r"^step-(\d+)$")
log = logging.getLogger(__name__)


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write to; on success it is fsynced and renamed to `path`, on any
    failure removed. A reader therefore sees the old file or the whole new one, never a part. A full disk
    becomes one line naming the file and the free space."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise UserError(f"writing {path} failed: {disk_full(path.parent)}") from None
        raise


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def disk_full(directory: Path) -> str:
    return f"No space left on device: {shutil.disk_usage(directory).free / 2**20:.1f} MiB free on {directory}"


def atomic_write(path: Path, data: str | bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)


def write_end_marker(run_dir: Path, stopped_early: bool, summary: dict) -> None:
    """Leave exactly one of RESUME_ME.json / COMPLETED.json."""
    keep, drop = (RESUME_MARKER, DONE_MARKER) if stopped_early else (DONE_MARKER, RESUME_MARKER)
    atomic_write(Path(run_dir) / keep, json.dumps(summary, indent=1))
    (Path(run_dir) / drop).unlink(missing_ok=True)


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    if not Path(directory).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(directory).iterdir() if (m := STEP_DIR.match(p.name)) and
             (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """`auto`: the run's newest complete checkpoint (`latest`, or the highest step when `latest` is missing
    or names an incomplete one; None if there is none); `none`; or a checkpoint or run directory path."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if path.is_dir() and not (path / STATE_FILE).exists() and (path / CHECKPOINTS).is_dir():
            path = find_checkpoint(path, "auto")
        if path is None or not (Path(path) / STATE_FILE).is_file():
            raise UserError(f"train.resume: {resume} is not a complete checkpoint (no {STATE_FILE})")
        return Path(path)
    directory = Path(run_dir) / CHECKPOINTS
    latest = directory / LATEST
    if latest.is_file():
        named = directory / latest.read_text().strip()
        if (named / STATE_FILE).is_file():
            return named
    found = complete_checkpoints(directory)
    return found[-1] if found else None


def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `checkpoints/best` names, if it names a complete one."""
    pointer = Path(run_dir) / CHECKPOINTS / BEST
    if not pointer.is_file():
        return None
    named = pointer.parent / pointer.read_text().strip()
    return named if (named / STATE_FILE).is_file() else None


class RunLock:
    """One owner per run directory, also across the nodes of a shared filesystem: `RUN_DIR/.lock` holds
    {host, pid, slurm_job_id, heartbeat_at, token}, is created whole or not at all (a hard link of a written
    file), and its heartbeat is refreshed every `heartbeat_s` by a thread of the owner.

    A second launch stops at once, naming the owner, unless the lock is the owner's no more: its heartbeat
    is older than `stale_s` (the owner's node died), its process is gone from this host (a SIGKILL), or it
    belongs to this same Slurm job (a requeue). Those are taken over with a warning."""

    def __init__(self, run_dir: Path, heartbeat_s: float = 10.0, stale_s: float = 120.0):
        self.path = Path(run_dir) / LOCK_FILE
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.token = uuid.uuid4().hex
        self.stopped = threading.Event()
        self.writing = threading.Lock()  # a heartbeat never rewrites a lock that release() just removed
        self.held = False

    def owner_record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "heartbeat_at": time.time(), "token": self.token}

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while not self._create():
            owner = self._read()
            reason = self._takeover_reason(owner)
            if reason is None:
                age = time.time() - owner.get("heartbeat_at", 0)
                job = f", Slurm job {owner['slurm_job_id']}" if owner.get("slurm_job_id") else ""
                raise UserError(f"{self.path.parent} is in use by another run (host {owner.get('host')}, pid "
                                f"{owner.get('pid')}{job}, heartbeat {age:.0f} s ago): wait for it, stop it, or "
                                "choose another train.run_dir")
            log.warning("taking over the lock of %s: %s", self.path.parent, reason)
            if self._read().get("token") == owner.get("token"):  # not a lock another taker just made
                self.path.unlink(missing_ok=True)
        self.held = True
        atexit.register(self.release)
        threading.Thread(target=self._beat, daemon=True, name="run-lock-heartbeat").start()

    def release(self) -> None:
        """Remove the lock if it is still ours (a stale-lock taker may have replaced it)."""
        if not self.held:
            return
        self.held = False
        self.stopped.set()
        with self.writing:
            if self._read().get("token") == self.token:
                self.path.unlink(missing_ok=True)

    def _create(self) -> bool:
        tmp = self.path.with_name(f"{LOCK_FILE}.{self.token}.tmp")
        atomic_write(tmp, json.dumps(self.owner_record()))
        try:
            os.link(tmp, self.path)  # fails if the lock exists: creation and content are one step
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def live_owner(self) -> dict | None:
        """The record of a live process holding this lock, else None. Read-only: taking the lock to test it
        could make a trainer starting that instant refuse the directory."""
        owner = self._read() if self.path.exists() else None
        return owner if owner and self._takeover_reason(owner) is None else None

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _takeover_reason(self, owner: dict) -> str | None:
        if not owner:  # being replaced, or damaged: only an old file is stale
            age = time.time() - self.path.stat().st_mtime if self.path.exists() else self.stale_s + 1
            return f"the lock is unreadable and {age:.0f} s old" if age > self.stale_s else None
        job = os.environ.get("SLURM_JOB_ID")
        if job and owner.get("slurm_job_id") == job:
            return f"it belongs to this Slurm job ({job}), restarted"
        if owner.get("host") == socket.gethostname() and not _alive(owner.get("pid")):
            return f"its process {owner.get('pid')} is gone"
        age = time.time() - owner.get("heartbeat_at", 0)
        if age > self.stale_s:
            return f"its heartbeat is {age:.0f} s old (host {owner.get('host')}, pid {owner.get('pid')})"
        return None

    def _beat(self) -> None:
        while not self.stopped.wait(self.heartbeat_s):
            with self.writing:
                token = self._read().get("token")
                if token is None or self.stopped.is_set():  # unreadable for a moment (NFS): beat next time
                    continue
                if token != self.token:
                    log.warning("%s was taken over by another launch", self.path)
                    return
                atomic_write(self.path, json.dumps(self.owner_record()))


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True
