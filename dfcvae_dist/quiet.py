"""A quiet console: messages of the libraries we drive that say nothing to our user are filtered here, each
filter with its reason (installed by every console script, `errors.cli_main`); and `held_back` keeps a
warning of ours from being said again where the caller says it once for the whole run."""

from __future__ import annotations

import contextlib
import logging

# (logger, start of the message, why it says nothing to our user)
FILTERED = [
    ("DeepSpeed", "Setting accelerator to CPU",
     "accelerate imports DeepSpeed to unwrap our model mid-run; on a CPU run DeepSpeed's guess is about a device "
     "it never uses (the trainer's first line names the run's precision and distribution)"),
    ("mlflow.pyfunc", "Validating input example against model signature",
     "MLflow checks the logged model's input example at every upload, and raises where it does not match"),
    ("mlflow.system_metrics.system_metrics_monitor", "Skip logging GPU metrics",
     "a machine without a GPU has no GPU metrics to skip; where a GPU has none, the tracker says why"),
    ("mlflow.system_metrics.system_metrics_monitor", "Started monitoring system metrics",
     "MLflow's monitor thread starting, as it does in every tracked run"),
    ("mlflow.system_metrics.system_metrics_monitor", "Stopping system metrics monitoring",
     "MLflow's monitor thread stopping at the end of every tracked run"),
    ("mlflow.system_metrics.system_metrics_monitor", "Successfully terminated system metrics monitoring",
     "MLflow's monitor thread stopped, as it does at the end of every tracked run"),
]


class DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def quiet_library_messages() -> None:
    """Install the filters of FILTERED on their loggers (once per process; the libraries keep the logger
    objects they find, so this works before or after they are imported)."""
    by_logger: dict[str, tuple[str, ...]] = {}
    for name, start, _ in FILTERED:
        by_logger[name] = by_logger.get(name, ()) + (start,)
    for name, starts in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(starts))


@contextlib.contextmanager
def held_back(logger_name: str):
    """Warnings of `logger_name` are not shown while the block runs: the caller says them itself, once."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
