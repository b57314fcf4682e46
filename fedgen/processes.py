"""Flower's deployment processes as children of a fedgen command: started, watched, always stopped.

Flower 1.41 has no in-process API for the SuperLink or a SuperNode, so `fedgen server` and
`fedgen client` run Flower's own commands as subprocesses. Two things matter:

- Environment: Flower starts helpers (`flower-superexec`, `flwr-serverapp`, `flwr-clientapp`) by
  name, so the interpreter's own bin folder goes first on PATH, even when fedgen was started
  without activating its virtual environment. FLWR_HOME points at a folder fedgen owns (the run
  folder, the site's .fedgen folder), never at the user's ~/.flwr.
- Cleanup: every started process is stopped (SIGTERM, then SIGKILL after a grace period) when
  the block exits, whether it ends normally, on an error or on Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from fedgen.errors import FedgenError

__all__ = [
    "flower_env",
    "flower_command",
    "toml_literal",
    "free_port",
    "ProcessGroup",
    "process_group",
    "stop_process",
    "STOP_GRACE",
    "LOOPBACK",
]

STOP_GRACE = 15.0  # seconds a Flower process gets to shut down before SIGKILL
FLWR_HOME = "FLWR_HOME"
LOOPBACK = "127.0.0.1"


def flower_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """The environment for Flower's commands: this interpreter's bin first, our own FLWR_HOME."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    env[FLWR_HOME] = str(Path(flwr_home).resolve())
    env.update(extra)
    return env


def flower_command(name: str) -> str:
    """The path of a Flower console script installed next to this interpreter."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.is_file() else name


def toml_literal(value: str, *, what: str) -> str:
    """A TOML literal string for Flower's `key=value` options (no escapes, so no single quote)."""
    if "'" in value or "\n" in value:
        raise FedgenError(f"{what} {value!r} must not contain a single quote or a line break")
    return f"'{value}'"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free right now (the OS picks it; a race is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ProcessGroup:
    """The subprocesses one fedgen command started; `stop_all` ends them, newest first."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen] = []

    def start(
        self,
        command: Sequence[str],
        *,
        env: dict[str, str],
        log: IO | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen:
        process = subprocess.Popen(
            list(command),
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT if log is not None else None,
        )
        self.processes.append(process)
        return process

    def stop_all(self, *, grace: float = STOP_GRACE) -> None:
        for process in reversed(self.processes):
            stop_process(process, grace=grace)


def stop_process(process: subprocess.Popen, *, grace: float = STOP_GRACE) -> int:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL; returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


@contextmanager
def process_group() -> Iterator[ProcessGroup]:
    """Yield a ProcessGroup whose processes are stopped however the block exits.

    SIGTERM is turned into KeyboardInterrupt meanwhile, so `kill PID` cleans up like Ctrl-C.
    """
    group = ProcessGroup()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield group
    finally:
        group.stop_all()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
