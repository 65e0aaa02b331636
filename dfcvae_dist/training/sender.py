"""`BackgroundSender`: the one thread that talks to the MLflow server (and one that writes TensorBoard's event
files), so the training loop never waits on the network or a disk. MLflow's own async logging keeps an
unbounded queue and has no flush deadline, and its exit handler ends a run as FINISHED (blocking on a hung
server), which is why this exists.

- The loop only enqueues (`put`); the queue is bounded: past `max_points` metric points the oldest are
  dropped, counted, and reported in one line.
- A failed call is retried with exponential backoff (1 s doubling to 30 s), not on every enqueue; the
  outage and the recovery are each reported in one line.
- `close(deadline_s)` waits at most `deadline_s` for the queue to drain (the tracker queues the run's end
  first): a hung server costs a finished run that much, never more, and one line names what was left unsent.
- `guard` (the run lock's check) is called before every send: a launch whose run directory was taken over
  sends nothing more.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from dfcvae_dist.errors import one_line

log = logging.getLogger(__name__)
MAX_CALL_FAILURES = 5


@dataclass
class Item:
    kind: str  # metrics | call
    payload: Any = None  # metrics: list of mlflow Metric; call: (name, fn)
    points: int = 0
    failures: int = 0


@dataclass
class SenderStats:
    sent: int = 0
    dropped: int = 0
    failures: int = 0
    first_error: str = ""
    outages: list[str] = field(default_factory=list)


def item_name(item: Item) -> str:
    return "metrics" if item.kind == "metrics" else item.payload[0]


class BackgroundSender:
    def __init__(self, client, run_id: str | None, max_points: int = 100_000, max_backoff_s: float = 30.0,
                 name: str = "MLflow", guard: Callable[[], None] = lambda: None):
        """`client.log_batch(run_id, metrics=[...])` sends metric points; `name` is the tracker in warnings."""
        self.client, self.run_id, self.name, self.guard = client, run_id, name, guard
        self.max_points, self.max_backoff_s = max_points, max_backoff_s
        self.queue: collections.deque[Item] = collections.deque()
        self.points = 0  # metric points in the queue
        self.cond = threading.Condition()
        self.busy = False  # an item is being sent
        self.sending = ""  # what it is
        self.failing = False
        self.stats = SenderStats()
        threading.Thread(target=self._run, daemon=True, name=f"{name.lower()}-sender").start()

    def put_metrics(self, metrics: list) -> None:
        with self.cond:
            self.queue.append(Item("metrics", list(metrics), len(metrics)))
            self.points += len(metrics)
            self._drop_oldest_points()
            self.cond.notify()

    def put_call(self, name: str, fn: Callable[[], Any], first: bool = False) -> None:
        """Tags, params, text and images, sent in order with the metrics (`first`: ahead of them). A call that
        fails `MAX_CALL_FAILURES` times in a row is dropped with a warning naming it, so that one call the
        server always refuses cannot hold back everything behind it."""
        with self.cond:
            (self.queue.appendleft if first else self.queue.append)(Item("call", (name, fn)))
            self.cond.notify()

    def close(self, deadline_s: float, setting_s: float | None = None) -> int:
        """Wait up to `deadline_s` for everything queued to be sent; the number of items left unsent.
        `setting_s`: the log.flush_timeout_s that `deadline_s` is what is left of, named in the warning."""
        end = time.monotonic() + deadline_s
        with self.cond:
            while (self.queue or self.busy) and time.monotonic() < end:
                self.cond.wait(timeout=max(0.0, min(0.5, end - time.monotonic())))
            left = len(self.queue) + int(self.busy)
            unsent = ([self.sending] if self.busy else []) + [item_name(i) for i in self.queue]
        if self.stats.dropped:
            log.warning("%s: %d metric point(s) were dropped while the server was unreachable (queue full at "
                        "%d points)", self.name, self.stats.dropped, self.max_points)
        if left:
            log.warning("%s: %d item(s) were not sent within log.flush_timeout_s=%g s (%s); the run in %s "
                        "lacks them: %s", self.name, left, deadline_s if setting_s is None else setting_s,
                        self.stats.first_error or "server not answering", self.name, ", ".join(dict.fromkeys(unsent)))
        return left

    def _drop_oldest_points(self) -> None:
        while self.points > self.max_points:
            oldest = next((item for item in self.queue if item.kind == "metrics"), None)
            if oldest is None:
                return
            self.queue.remove(oldest)
            self.points -= oldest.points
            self.stats.dropped += oldest.points

    def _take(self) -> list[Item]:
        """The next item; consecutive metric items merged up to MLflow's 1,000 per batch."""
        with self.cond:
            while not self.queue:
                self.cond.wait()
            batch = [self.queue.popleft()]
            while batch[0].kind == "metrics" and self.queue and self.queue[0].kind == "metrics" and \
                    sum(i.points for i in batch) + self.queue[0].points <= 1000:
                batch.append(self.queue.popleft())
            self.points -= sum(i.points for i in batch)
            self.busy, self.sending = True, item_name(batch[0])
            return batch

    def _send(self, batch: list[Item]) -> None:
        self.guard()
        if batch[0].kind == "metrics":
            self.client.log_batch(self.run_id, metrics=[m for item in batch for m in item.payload])
        else:
            batch[0].payload[1]()

    def _run(self) -> None:
        backoff = 1.0
        while True:
            batch = self._take()
            try:
                self._send(batch)
            except Exception as err:  # noqa: BLE001 - tracking must never stop training
                self._failed(batch, err)
                time.sleep(backoff)
                backoff = min(2 * backoff, self.max_backoff_s)
                continue
            backoff = 1.0
            self._sent(batch)

    def _failed(self, batch: list[Item], err: Exception) -> None:
        batch[0].failures += 1
        if batch[0].kind == "call" and batch[0].failures >= MAX_CALL_FAILURES:
            log.warning("%s: gave up on '%s' after %d failures (%s)", self.name, batch[0].payload[0],
                        batch[0].failures, one_line(err, 200))
            batch = []
        with self.cond:
            self.queue.extendleft(reversed(batch))  # retried first, in order
            self.points += sum(i.points for i in batch)
            self._drop_oldest_points()
            self.busy = False
            self.stats.failures += 1
            self.cond.notify_all()
        if not self.failing:
            self.stats.first_error = one_line(err, 200)
            log.warning("%s unreachable (%s); training goes on, up to %d metric points are kept and resent",
                        self.name, self.stats.first_error, self.max_points)
            self.failing = True

    def _sent(self, batch: list[Item]) -> None:
        with self.cond:
            self.busy = False
            self.stats.sent += sum(i.points for i in batch)
            self.cond.notify_all()
        if self.failing:
            log.warning("%s reachable again; sending what was kept (%d point(s) dropped so far)", self.name,
                        self.stats.dropped)
            self.failing = False
