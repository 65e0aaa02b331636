"""MLflow tracking from the main process only.

- At start the main process checks the tracking server once (a few seconds, not MLflow's 120 s with
  retries), decides (error, or warn and go on untracked) and tells every rank.
- A resumed run logs into the same MLflow run (its id is in the checkpoint) and skips steps that run had
  already logged, so every step appears once.
- A server that fails mid-run never stops training: HTTP calls are short, failed metrics stay buffered
  and are sent with the next successful call (up to `MAX_BUFFERED` points; older ones are dropped).
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
import urllib.request
from collections import deque
from pathlib import Path

from accelerate.utils import broadcast_object_list

from dfcvae_dist.config import Config
from dfcvae_dist.errors import UserError

log = logging.getLogger(__name__)
MAX_BUFFERED = 100_000
PROGRESS_METRIC = "train/total"


def _default_timeouts() -> None:
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def tracking_uri(cfg: Config) -> str | None:
    return cfg.log.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")


def server_reachable(uri: str, timeout: float = 5.0) -> str | None:
    """None if reachable (or not a server), else the reason."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except OSError as err:
        return str(getattr(err, "reason", err))


def code_version() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def resolve_run_id(value: str) -> str:
    """An MLflow run id, or a training run directory (its COMPLETED.json / RESUME_ME.json names the run)."""
    import json

    directory = Path(value)
    if not directory.is_dir():
        if os.sep in value:
            raise UserError(f"--mlflow-run {value}: neither a run directory nor an MLflow run id")
        return value
    for marker in ("COMPLETED.json", "RESUME_ME.json"):
        path = directory / marker
        if path.is_file():
            run_id = json.loads(path.read_text()).get("mlflow_run_id")
            if not run_id:
                raise UserError(f"{path}: the run was not tracked in MLflow")
            return run_id
    raise UserError(f"{directory}: no COMPLETED.json or RESUME_ME.json, so no MLflow run to log into (a run killed "
                    "before its first marker, or not a training run directory); pass the MLflow run id instead")


class Tracker:
    """The run's MLflow logger; on ranks other than the main one (or when disabled) every call is a no-op."""

    def __init__(self, cfg: Config, accelerator, run_id: str | None = None):
        self.active = False
        self.run_id = run_id
        self.last_logged_step = -1
        self.buffer: deque = deque(maxlen=MAX_BUFFERED)
        self.failing = False
        decision = [None]
        if accelerator.is_main_process and cfg.log.enabled:
            decision = [self._start(cfg, run_id)]
        broadcast_object_list(decision, from_process=0)
        if isinstance(decision[0], str) and decision[0].startswith("error:"):
            raise UserError(decision[0][len("error:"):])
        if accelerator.is_main_process and decision[0] == "ok":
            self.active = True

    def _start(self, cfg: Config, run_id: str | None) -> str:
        _default_timeouts()
        import mlflow

        uri = tracking_uri(cfg)
        if uri:
            problem = server_reachable(uri)
            if problem:
                message = f"MLflow tracking server {uri} is unreachable ({problem})"
                if cfg.log.on_unavailable == "error":
                    return f"error:{message}; start it, fix log.tracking_uri, or set log.on_unavailable=warn"
                log.warning("%s: training continues UNTRACKED (log.on_unavailable=warn)", message)
                return "untracked"
            mlflow.set_tracking_uri(uri)
        try:
            if run_id:
                self.run = mlflow.start_run(run_id=run_id)
                history = mlflow.MlflowClient().get_metric_history(run_id, PROGRESS_METRIC)
                self.last_logged_step = max((m.step for m in history), default=-1)
            else:
                mlflow.set_experiment(cfg.log.experiment)
                self.run = mlflow.start_run(run_name=cfg.log.run_name or Path(cfg.train.run_dir).name)
            self.run_id = self.run.info.run_id
        except Exception as err:  # noqa: BLE001 - any store error at start is the user's to fix
            return f"error:MLflow at {uri or mlflow.get_tracking_uri()} failed at start: {err}"
        return "ok"

    def log_params(self, params: dict) -> None:
        if self.active:
            import mlflow

            self._safely(mlflow.log_params, {k: str(v)[:500] for k, v in params.items()})

    def set_tags(self, tags: dict) -> None:
        if self.active:
            import mlflow

            self._safely(mlflow.set_tags, {k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active or step <= self.last_logged_step:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        self.flush()

    def flush(self) -> bool:
        if not self.active or not self.buffer:
            return True
        import mlflow

        batch = list(self.buffer)
        for start in range(0, len(batch), 1000):
            chunk = batch[start:start + 1000]
            if not self._safely(mlflow.MlflowClient().log_batch, self.run_id, metrics=chunk):
                return False
            for _ in chunk:
                self.buffer.popleft()
        return True

    def log_image(self, image, name: str) -> None:
        """`image`: a (3, H, W) float tensor in [0, 1]; `name`: the artifact path."""
        if self.active:
            import mlflow
            import numpy as np

            array = (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
            self._safely(mlflow.log_image, array, artifact_file=name)

    def log_text(self, text: str, name: str) -> None:
        if self.active:
            import mlflow

            self._safely(mlflow.log_text, text, name)

    def end(self, status: str = "FINISHED") -> None:
        if self.active:
            import mlflow

            self.flush()
            self._safely(mlflow.end_run, status)
            self.active = False

    def _safely(self, fn, *args, **kwargs) -> bool:
        """Call MLflow; a failure never stops training. Warn once when an outage starts and once when
        the server answers again."""
        try:
            fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            if not self.failing:
                log.warning("MLflow unreachable (%s: %s); training goes on, metrics are buffered and resent",
                            getattr(fn, "__name__", fn), str(err).splitlines()[0][:200])
            self.failing = True
            return False
        if self.failing:
            log.warning("MLflow reachable again; sending %d buffered metric points", len(self.buffer))
            self.failing = False
        return True


