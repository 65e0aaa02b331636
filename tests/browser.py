"""Headless Chromium (Debian's `chromium`; `make test` installs it when run as root) driven over the DevTools
protocol on a pipe, no port: open a page, wait until its rendered DOM satisfies a condition, take a screenshot.
Polling in real time, not `--dump-dom` after a virtual-time budget: MLflow's charts render when they come into
view, which a virtual-time dump caught in about half the tries."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import time
from pathlib import Path

from tests.helpers import ProcessGroups, wait_until

CHROMIUM = shutil.which("chromium")


class Chromium:
    def __init__(self, groups: ProcessGroups, profile: Path, reply_timeout: float = 30):
        commands_read, self.commands = os.pipe()  # chromium reads its commands on fd 3
        self.events, events_write = os.pipe()  # and writes replies and events on fd 4
        # its ends above 4, so that the redirections to 3 and 4 overwrite neither (bash: dash takes fds < 10 only)
        commands_read, events_write = (above_4(fd) for fd in (commands_read, events_write))
        profile.mkdir(parents=True, exist_ok=True)
        self.log = profile / "chromium.log"  # its messages, for a failure to quote
        with self.log.open("w") as log:
            self.proc = groups.popen(["bash", "-c", f"exec {CHROMIUM} --headless --no-sandbox --disable-gpu "
                                      f"--user-data-dir={profile} --remote-debugging-pipe about:blank "
                                      f"3<&{commands_read} 4>&{events_write}"],
                                     pass_fds=(commands_read, events_write), stdout=log, stderr=log)
        os.close(commands_read)
        os.close(events_write)
        self.reply_timeout, self.last_id, self.buffer = reply_timeout, 0, b""

    def call(self, method: str, session: str | None = None, **params):
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params,
                   **({"sessionId": session} if session else {})}
        try:
            os.write(self.commands, json.dumps(message).encode() + b"\0")
        except BrokenPipeError:
            self.died()
        while (reply := self.read())["id" if "id" in reply else "method"] != self.last_id:
            pass  # an event, or a late reply
        if "error" in reply:
            raise AssertionError(f"chromium: {method}: {reply['error']}")
        return reply["result"]

    def read(self) -> dict:
        deadline = time.monotonic() + self.reply_timeout
        while b"\0" not in self.buffer:
            if not select.select([self.events], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise AssertionError(f"chromium did not answer within {self.reply_timeout:.0f} s")
            chunk = os.read(self.events, 1 << 16)
            if not chunk:
                self.died()
            self.buffer += chunk
        message, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(message)

    def died(self):
        lines = [line for line in self.log.read_text().splitlines() if "dbus" not in line]  # no bus in a container
        raise AssertionError(f"chromium exited ({self.proc.wait(10)}):\n" + "\n".join(lines[-20:]))

    def open(self, url: str, width: int = 1600, height: int = 1200) -> "Page":
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        page = Page(self, self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"])
        page.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        page.call("Page.navigate", url=url)
        return page

    def close(self) -> None:
        for fd in (self.commands, self.events):
            os.close(fd)


def above_4(fd: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 5)
    os.close(fd)
    return moved


class Page:
    def __init__(self, browser: Chromium, session: str):
        self.browser, self.session = browser, session

    def call(self, method: str, **params):
        return self.browser.call(method, self.session, **params)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (JSON-serialisable)."""
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str):
        return wait_until(lambda: self.evaluate(expression), timeout, what, interval=0.3)

    def text(self) -> str:
        return self.evaluate("document.body.innerText") or ""

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path
