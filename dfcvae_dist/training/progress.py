"""Progress on the console of the main process: rich's bar on a terminal; in a job log (Slurm, nohup, CI),
where the bar would print nothing until the end, a plain line at the first log step after every
`every_s` seconds. Both say the same in the same order: step, epoch, loss, throughput, time left. Also the
run's throughput, measured from the end of the first step (start-up apart)."""

from __future__ import annotations

import datetime
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn


class ProgressReporter:
    def __init__(self, console: Console, total_steps: int, steps_per_epoch: int, start_step: int, global_batch: int,
                 every_s: float, enabled: bool):
        self.console, self.total, self.global_batch, self.every_s = console, total_steps, global_batch, every_s
        self.steps_per_epoch, self.enabled = steps_per_epoch, enabled
        self.bar = None
        if enabled and console.is_terminal:
            self.bar = Progress(TextColumn("step {task.completed}/{task.total}"), TextColumn("{task.description}"),
                                BarColumn(), TimeRemainingColumn(), console=console)
            self.task = self.bar.add_task("", total=total_steps, completed=start_step)
            self.bar.start()
        self.warm: tuple[float, int] | None = None  # (time, step) at the end of the first step
        self.tick: tuple[float, int] = (time.perf_counter(), start_step)  # last log step, for img/s
        self.last_line = float("-inf")

    def epoch_text(self, step: int) -> str:
        """The epoch `step` belongs to, of the run's epochs (its last step is in the last epoch, not after it)."""
        epochs = -(-self.total // self.steps_per_epoch)
        return f"epoch {max(1, -(-step // self.steps_per_epoch))}/{epochs}"

    def step_done(self, step: int) -> None:
        self.warm = self.warm or (time.perf_counter(), step)
        if self.bar is not None:
            self.bar.update(self.task, completed=step)

    def img_per_s_since_last_log(self, step: int) -> float:
        now = time.perf_counter()
        rate = (step - self.tick[1]) * self.global_batch / max(now - self.tick[0], 1e-9)
        self.tick = (now, step)
        return rate

    def logged(self, step: int, loss: float, img_per_s: float) -> None:
        text = f"{self.epoch_text(step)} loss {loss:.3f} {img_per_s:.0f} img/s"
        if self.bar is not None:
            self.bar.update(self.task, description=text)
        elif self.enabled and time.perf_counter() - self.last_line >= self.every_s:
            self.last_line = time.perf_counter()
            eta = (self.total - step) * self.global_batch / img_per_s if img_per_s > 0 else 0
            self.console.print(f"step {step}/{self.total} {text} {datetime.timedelta(seconds=round(eta))} left")

    def img_per_s(self, step: int) -> float | None:
        """Throughput over the run after its first step (None for a run of one step)."""
        if self.warm is None or step <= self.warm[1]:
            return None
        return (step - self.warm[1]) * self.global_batch / (time.perf_counter() - self.warm[0])

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
