"""MLflow tracking from the main process (system metrics: also from one process per node), and TensorBoard event
files beside it (`log.trackers`), both behind one `Tracker`.

- At start the main process checks the tracking server once (a few seconds, not MLflow's 120 s with
  retries), decides (error, or warn and go on untracked) and tells every rank.
- A run resumed in its own run directory logs into the same MLflow run (its id is in the checkpoint) and skips
  steps that run had already logged, so every step appears once; one started from another run directory's
  checkpoint is a new MLflow run (the trainer tags it `resumed_from`).
- After that the loop never waits on the network: one background sender (training/sender.py) sends, with
  a bounded queue, backoff after a failure, and a deadline at the end (log.flush_timeout_s).
- The client, the experiment (artifacts beside a sqlite store) and the server check come from
  dfcvae_dist/tracking.py, as everywhere else.
- MLflow's system-metrics monitor runs in a thread of its own; its `finish()` joins without a timeout, so
  it is stopped through the sender (main process) or a thread joined with the deadline (other nodes).
- TensorBoard (`RUN_DIR/tensorboard/`) gets the same scalars and images under the same names, written by a
  sender of its own, so neither tracker can hold up the other or the loop.
- A launch whose run directory was taken over sends and writes nothing more: `guard` (the run lock's check) runs
  before every send of both senders and of the system metrics.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

from accelerate.utils import broadcast_object_list

from dfcvae_dist.config import Config
from dfcvae_dist.errors import UserError, one_line
from dfcvae_dist.tracking import (get_or_create_experiment, mlflow_client, run_page_url, server_reachable, ui_command,
                                  use_short_timeouts)
from dfcvae_dist.training.sender import BackgroundSender

log = logging.getLogger(__name__)
PROGRESS_METRIC = "train/total"
TENSORBOARD_DIR = "tensorboard"


def tracking_uri(cfg: Config) -> str | None:
    return cfg.log.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")


def code_version() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(cfg: Config) -> dict[str, str]:
    """The tags a run is created with: log.run_tags, and its parent run where log.parent_run_id names one."""
    tags = dict(tag.partition("=")[::2] for tag in cfg.log.run_tags)
    if cfg.log.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.log.parent_run_id
    return tags


class SystemMetrics:
    """MLflow's system-metrics monitor (CPU, memory, disk, network; GPU through nvidia-ml-py) in its own
    thread. With an http(s) URI one per node (local rank 0), named `system/nodeN/...` when there are several
    nodes; with sqlite or a file store (which lock badly on shared filesystems) only on the main process."""

    def __init__(self, monitor):
        self.monitor = monitor

    @classmethod
    def start_where_due(cls, cfg: Config, accelerator, run_id: str, resumed: bool,
                        guard: Callable[[], None]) -> "SystemMetrics | None":
        from mlflow import get_tracking_uri
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        use_short_timeouts()  # ranks other than the main one reach the server here first
        uri = tracking_uri(cfg) or get_tracking_uri()
        per_node = uri.startswith(("http://", "https://"))
        if not (accelerator.local_process_index == 0 if per_node else accelerator.is_main_process):
            return None
        per_node_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        nodes = max(1, accelerator.num_processes // per_node_processes)
        node_id = f"node{accelerator.process_index // per_node_processes}" if per_node and nodes > 1 else None
        monitor = SystemMetricsMonitor(run_id, sampling_interval=cfg.log.system_metrics_interval_s,
                                       resume_logging=resumed, node_id=node_id, tracking_uri=uri)
        report_missing_gpu_metrics(monitor)

        def publish_unless_taken_over(metrics, publish=monitor.publish_metrics):
            guard()
            publish(metrics)

        monitor.publish_metrics = publish_unless_taken_over
        monitor.start()
        return cls(monitor)

    def stop(self, sender: BackgroundSender | None, deadline_s: float) -> None:
        """Stop without ever waiting past the end-of-run deadline: on the main process as one more call of the
        sender (its deadline covers it), elsewhere in a thread joined for at most `deadline_s`."""
        if sender is not None:
            sender.put_call("system metrics", self.monitor.finish)
            return
        stopper = threading.Thread(target=self.monitor.finish, daemon=True, name="system-metrics-stop")
        stopper.start()
        stopper.join(deadline_s)
        if stopper.is_alive():
            log.warning("MLflow: the system-metrics monitor did not stop within log.flush_timeout_s=%g s (server "
                        "not answering); its last samples are lost", deadline_s)


def report_missing_gpu_metrics(monitor) -> None:
    """One line where a GPU is there but MLflow's GPU monitor could not start (nvidia-ml-py missing, or NVML)."""
    import torch
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

    if not torch.cuda.is_available() or any(isinstance(m, GPUMonitor) for m in monitor.monitors):
        return
    try:
        GPUMonitor()
        reason = "unknown reason"
    except Exception as err:  # noqa: BLE001 - ImportError or an NVML error: either way, only the reason matters
        reason = one_line(err, 200)
    log.warning("MLflow system metrics: no GPU metrics (%s); CPU, memory, disk and network are logged", reason)


class TensorBoard:
    """Event files in `directory` (torch.utils.tensorboard), written by a `BackgroundSender` of their own. A
    resumed run hides what the interrupted launch logged after its checkpoint (SummaryWriter's `purge_step`:
    TensorBoard drops the events of those steps), so every step appears once."""

    def __init__(self, directory: Path, resumed_step: int, guard: Callable[[], None] = lambda: None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(directory), purge_step=resumed_step + 1 if resumed_step else None)
        self.sender = BackgroundSender(self, None, name="TensorBoard", guard=guard)

    @classmethod
    def start(cls, cfg: Config, resumed_step: int, guard: Callable[[], None]) -> "TensorBoard | str | None":
        """The writer; where it cannot start (tensorboard not installed, the folder not writable), an `error:`
        message (`log.on_unavailable=error`) or, after a warning, None (`warn`)."""
        directory = Path(cfg.train.run_dir) / TENSORBOARD_DIR
        try:
            return cls(directory, resumed_step, guard)
        except (ImportError, OSError) as err:
            problem = f"TensorBoard cannot write {directory} ({one_line(err, 300)})"
        if cfg.log.on_unavailable == "error":
            return f"error:{problem}; install tensorboard, fix the run directory, set log.trackers without it, or " \
                   "log.on_unavailable=warn"
        log.warning("%s: training continues without it (log.on_unavailable=warn)", problem)
        return None

    def log_batch(self, run_id, metrics: list[tuple[str, float, int]]) -> None:
        """The sender's call for metric points: (name, value, step) each."""
        for name, value, step in metrics:
            self.writer.add_scalar(name, value, step)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.sender.put_metrics([(name, float(value), step) for name, value in metrics.items()])

    def log_image(self, image, key: str, step: int) -> None:
        import numpy as np

        pixels = np.asarray(image.convert("RGB"))
        self.sender.put_call(f"image {key}", lambda: self.writer.add_image(key, pixels, step, dataformats="HWC"))

    def flush(self) -> None:
        self.sender.put_call("flush", self.writer.flush)

    def start_closing(self) -> None:
        self.sender.put_call("close", self.writer.close)

    def wait_closed(self, deadline_s: float) -> None:
        self.sender.close(deadline_s)


class Tracker:
    """The run's MLflow logger (and TensorBoard writer) on the main process; on other ranks (or disabled, or
    untracked) every call is a no-op. Start-up talks to the server directly (bounded by short timeouts);
    everything after goes through the `BackgroundSender`. Runs are created and ended with MlflowClient and an
    explicit run id, never as MLflow's "active run", whose exit handler would mark a crashed run FINISHED."""

    def __init__(self, cfg: Config, accelerator, run_id: str | None = None, resumed_step: int = 0,
                 guard: Callable[[], None] = lambda: None):
        self.active = False  # MLflow logs from this process
        self.run_id = run_id
        self.run_name = ""
        self.model_card = None  # a model_logging.ModelCard, set by the trainer: what log_model's models show
        self.last_logged_step = -1
        self.flush_timeout_s = cfg.log.flush_timeout_s
        self.artifact_uri = ""
        self.experiment_id: str | None = None  # known on the main process of a tracked run
        self.system_metrics: SystemMetrics | None = None
        self.tensorboard: TensorBoard | None = None
        decision = [None, None]
        if accelerator.is_main_process and cfg.log.uses("tensorboard"):  # first: a refusal leaves no MLflow run
            started = TensorBoard.start(cfg, resumed_step, guard)
            decision[0] = started if isinstance(started, str) else None
            self.tensorboard = None if isinstance(started, str) else started
        if accelerator.is_main_process and cfg.log.uses("mlflow") and decision[0] is None:
            decision = [self._start(cfg, run_id), self.run_id]
        broadcast_object_list(decision, from_process=0)
        if isinstance(decision[0], str) and decision[0].startswith("error:"):
            raise UserError(decision[0][len("error:"):])
        if accelerator.is_main_process and decision[0] == "ok":
            self.active = True
            self.sender = BackgroundSender(self.client, self.run_id, guard=guard)
        try:
            if decision[0] == "ok" and cfg.log.system_metrics:
                self.system_metrics = SystemMetrics.start_where_due(cfg, accelerator, decision[1],
                                                                    resumed=bool(run_id), guard=guard)
        except BaseException:  # the run exists: it ends as it really ended
            self.end("FAILED")
            raise

    def _start(self, cfg: Config, run_id: str | None) -> str:
        uri = tracking_uri(cfg)
        problem = server_reachable(uri) if uri else None
        if problem:
            message = f"MLflow tracking server {uri} is unreachable ({problem})"
            if cfg.log.on_unavailable == "error":
                return f"error:{message}; start it, fix log.tracking_uri, or set log.on_unavailable=warn"
            log.warning("%s: training continues UNTRACKED (log.on_unavailable=warn)", message)
            return "untracked"
        try:
            self.client = mlflow_client(uri)
        except UserError as err:  # an unusable store: every rank hears it
            return f"error:{err}"
        try:
            if run_id:
                self.client.update_run(run_id, status="RUNNING")
                history = self.client.get_metric_history(run_id, PROGRESS_METRIC)
                self.last_logged_step = max((m.step for m in history), default=-1)
                run = self.client.get_run(run_id)
            else:
                experiment_id = get_or_create_experiment(self.client, cfg.log.experiment)
                run = self.client.create_run(experiment_id, run_name=cfg.log.run_name or Path(cfg.train.run_dir).name,
                                             tags=run_tags(cfg))
                self.run_id = run.info.run_id
            self.artifact_uri, self.run_name = run.info.artifact_uri, run.info.run_name
            self.experiment_id = run.info.experiment_id
        except Exception as err:  # noqa: BLE001 - any store error at start is the user's to fix
            return f"error:MLflow at {self.client.tracking_uri} failed at start: {one_line(err, 300)}"
        return "ok"

    def run_page(self) -> str | None:
        """The run's page in MLflow's UI, and how to serve it for a local store (None where not tracked)."""
        if self.experiment_id is None:
            return None
        uri = self.client.tracking_uri
        command = ui_command(uri)
        return run_page_url(uri, self.experiment_id, self.run_id) + (f" (serve it: {command})" if command else "")

    def log_params(self, params: dict) -> None:
        if self.active:
            from mlflow.entities import Param

            items = [Param(k, str(v)[:500]) for k, v in params.items()]
            for start in range(0, len(items), 100):  # MLflow's limit per batch
                chunk = items[start:start + 100]
                self.sender.put_call("params", lambda chunk=chunk: self.client.log_batch(self.run_id, params=chunk))

    def set_tags(self, tags: dict) -> None:
        if self.active:
            from mlflow.entities import RunTag

            items = [RunTag(k, str(v)) for k, v in tags.items()]
            self.sender.put_call("tags", lambda: self.client.log_batch(self.run_id, tags=items))

    @property
    def logging(self) -> bool:
        """Some tracker logs from this process (what is worth drawing images for)."""
        return self.active or self.tensorboard is not None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.log_metrics(metrics, step)
        if not self.active or step <= self.last_logged_step:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.sender.put_metrics([Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_image(self, image, key: str, step: int) -> None:
        """`image`: a PIL image, one entry of the run's image `key` at `step` (the UI's step slider)."""
        if self.tensorboard is not None:
            self.tensorboard.log_image(image, key, step)
        if self.active:
            self.sender.put_call(f"image {key}", lambda: self.client.log_image(self.run_id, image, key=key, step=step,
                                                                                synchronous=True))

    def log_inputs(self, datasets: list) -> None:
        """MLflow dataset inputs (`mlflow.entities.DatasetInput`): the data the run was trained and evaluated on."""
        if self.active and datasets:
            self.sender.put_call("dataset inputs", lambda: self.client.log_inputs(self.run_id, datasets=datasets))

    def log_text(self, text: str, name: str) -> None:
        if self.active:
            self.sender.put_call("text", lambda: self.client.log_text(self.run_id, text, name))

    def checkpointed(self) -> None:
        """A checkpoint was written: what TensorBoard holds up to it goes to disk (a kill loses no more)."""
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def end(self, status: str = "FINISHED") -> None:
        """End the run as it really ended (FINISHED, KILLED or FAILED), waiting at most log.flush_timeout_s in
        all."""
        deadline = time.monotonic() + self.flush_timeout_s
        tensorboard, self.tensorboard = self.tensorboard, None
        if tensorboard is not None:  # closes beside MLflow's sending: a hung disk costs MLflow no time
            tensorboard.start_closing()
        if self.system_metrics is not None:
            self.system_metrics.stop(self.sender if self.active else None, max(0.0, deadline - time.monotonic()))
            self.system_metrics = None
        if self.active:
            self.active = False
            # first: with a backlog at the deadline, the run's real status matters more than its last points
            self.sender.put_call("end", lambda: self.client.set_terminated(self.run_id, status), first=True)
            self.sender.close(max(0.0, deadline - time.monotonic()), self.flush_timeout_s)
        if tensorboard is not None:
            tensorboard.wait_closed(max(0.0, deadline - time.monotonic()))

    def log_model(self, checkpoint: Path, step: int, final: bool, which: str) -> None:
        """The checkpoint as an MLflow LoggedModel of this run at `step`, uploaded by the sender; `which`
        (log.model): the final model, every checkpoint, or none. Named and described by `model_card`: the final
        one `<family>-<run name>`, others with their checkpoint folder's name added."""
        if self.active and (which == "checkpoints" or (final and which == "final")):
            from dfcvae_dist.model_logging import ModelCard, ModelUpload

            try:
                upload = ModelUpload(self.client, self.run_id, checkpoint, step,
                                     self.model_card or ModelCard(self.run_name), final)
            except OSError as err:  # tracking never stops training
                log.warning("MLflow: the model of %s is not logged (%s)", checkpoint, err)
                return
            self.sender.put_call("model", upload)
