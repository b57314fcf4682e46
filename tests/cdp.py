"""A headless Chromium driven over the DevTools protocol, for tests of fedgen's HTML pages.

Chromium speaks the protocol on a pipe (``--remote-debugging-pipe``: it reads commands from
file descriptor 3 and writes replies and events to 4, each a JSON text ended by a NUL byte),
so nothing listens on a port and nothing beyond the standard library and Debian's chromium
package is needed. Clicks and typing go through the browser's input pipeline
(``Input.dispatchMouseEvent``, ``Input.insertText``), as a person's would.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

CHROMIUM = "chromium"
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--window-size=1200,900",
)  # fmt: skip
COMMAND_FD, EVENT_FD = 3, 4  # fixed by Chromium's --remote-debugging-pipe
HIGH_FD = 10  # the pipe ends are moved above 4 first, so placing them cannot clobber one another
TIMEOUT = 60.0


class BrowserError(RuntimeError):
    pass


class Chromium:
    """One headless Chromium with a fresh profile; ``open`` a page, then drive it."""

    def __init__(self, profile: Path, *, timeout: float = TIMEOUT):
        executable = shutil.which(CHROMIUM)
        if executable is None:
            raise BrowserError("chromium is not on PATH: install it (Debian: apt-get install -y chromium)")
        self.timeout = timeout
        self.events: list[dict] = []
        self._next_id = 0
        self._buffer = b""
        self._session: str | None = None
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()

        def place_pipe_ends() -> None:  # in the child, before exec
            read_end = fcntl.fcntl(commands_read, fcntl.F_DUPFD, HIGH_FD)
            write_end = fcntl.fcntl(replies_write, fcntl.F_DUPFD, HIGH_FD)
            os.dup2(read_end, COMMAND_FD)
            os.dup2(write_end, EVENT_FD)

        self.process = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
            pass_fds=(COMMAND_FD, EVENT_FD),
            preexec_fn=place_pipe_ends,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(commands_read)
        os.close(replies_write)

    # ----------------------------------------------------------------- protocol

    def _send(self, method: str, params: dict | None, session: str | None) -> int:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode("utf-8") + b"\0")
        return self._next_id

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._replies], [], [], left)[0]:
                raise BrowserError("chromium did not answer in time")
            chunk = os.read(self._replies, 1 << 16)
            if not chunk:
                raise BrowserError("chromium closed the pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, *, browser: bool = False) -> dict:
        """Send a command (to the page, or to the browser) and return its result."""
        wanted = self._send(method, params, None if browser else self._session)
        deadline = time.monotonic() + self.timeout
        while True:
            message = self._receive(deadline)
            if message.get("id") == wanted:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def wait_for(self, event: str, predicate=lambda params: True, *, since: int = 0) -> dict:
        """The params of the first event ``event`` that satisfies ``predicate``, among the events
        from number ``since`` on (already seen or arriving)."""
        deadline = time.monotonic() + self.timeout
        seen = since
        while True:
            for message in self.events[seen:]:
                if message["method"] == event and predicate(message.get("params", {})):
                    return message["params"]
            seen = len(self.events)
            message = self._receive(deadline)
            if "method" in message:
                self.events.append(message)

    # ----------------------------------------------------------------- pages

    def open(self, url: str, *, downloads: Path | None = None) -> None:
        """Open ``url`` in a new tab and wait until it has loaded; downloads go to ``downloads``."""
        if downloads is not None:
            params = {"behavior": "allow", "downloadPath": str(downloads), "eventsEnabled": True}
            self.call("Browser.setDownloadBehavior", params, browser=True)
        target = self.call("Target.createTarget", {"url": "about:blank"}, browser=True)["targetId"]
        self._session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True}, browser=True)[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.call(f"{domain}.enable")
        before = len(self.events)
        self.call("Page.navigate", {"url": url})
        self.wait_for("Page.loadEventFired", since=before)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (an exception is a BrowserError)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        """A left click, through the input pipeline, at the centre of the element ``selector``."""
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return [r.left + r.width / 2, r.top + r.height / 2]; })()"
        )
        if box is None:
            raise BrowserError(f"no element {selector}")
        for kind in ("mousePressed", "mouseReleased"):
            self.call(
                "Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1], "button": "left", "clickCount": 1}
            )

    def type(self, selector: str, text: str) -> None:
        self.click(selector)
        self.call("Input.insertText", {"text": text})

    def set_files(self, selector: str, paths: list[Path]) -> None:
        """Choose files in an <input type=file>, as the file dialog would."""
        found = self.call("Runtime.evaluate", {"expression": f"document.querySelector({json.dumps(selector)})"})
        if found["result"].get("subtype") != "node":
            raise BrowserError(f"no element {selector}")
        self.call("DOM.setFileInputFiles", {"objectId": found["result"]["objectId"], "files": [str(p) for p in paths]})

    def problems(self) -> list[str]:
        """Script errors, console errors and log errors (e.g. a blocked load) seen so far."""
        found = []
        for message in self.events:
            params = message.get("params", {})
            if message["method"] == "Runtime.exceptionThrown":
                found.append(str(params.get("exceptionDetails", {}).get("text")))
            elif message["method"] == "Runtime.consoleAPICalled" and params.get("type") == "error":
                found.append(str(params.get("args")))
            elif message["method"] == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                found.append(str(params["entry"].get("text")))
        return found

    def requested_urls(self) -> list[str]:
        return [m["params"]["request"]["url"] for m in self.events if m["method"] == "Network.requestWillBeSent"]

    def close(self) -> None:
        try:
            self.call("Browser.close", browser=True)
            self.process.wait(timeout=self.timeout)
        except (BrowserError, OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            os.close(self._commands)
            os.close(self._replies)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
