"""Flower's deployment processes as children of a fedgen command: started, watched, always stopped.

Flower 1.41 has no in-process API for the SuperLink or a SuperNode, so `fedgen server` and
`fedgen client` run Flower's own commands as subprocesses. Two things matter:

- Environment: Flower starts helpers (`flower-superexec`, `flwr-serverapp`, `flwr-clientapp`) by
  name, so the interpreter's own bin folder goes first on PATH, even when fedgen was started
  without activating its virtual environment. FLWR_HOME points at a folder fedgen owns (the run
  folder, the site's .fedgen folder), never at the user's ~/.flwr.
- Cleanup: every started process is stopped (SIGTERM, then SIGKILL after a grace period) when
  the block exits, whether it ends normally, on an error or on Ctrl-C.
- Dying together: each Flower command runs under a guard (``python -m fedgen.processes``, in
  its own process group) that the kernel signals when the fedgen command dies, however it
  dies (``kill -9`` included: PR_SET_PDEATHSIG). The guard is a child subreaper
  (PR_SET_CHILD_SUBREAPER), so every descendant of the Flower command — helpers that outlive
  their own parent included — stays below it, and it stops them all before it exits.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
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
GUARD_GRACE = 10.0  # the guard's own grace for the processes below it: shorter, so it finishes first
# When the fedgen command died nobody waits for a clean shutdown: the processes get this long.
ORPHAN_GRACE = 2.0
PARENT_DIED = signal.SIGHUP  # what the kernel sends the guard when the fedgen command dies
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
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
            [sys.executable, "-m", "fedgen.processes", str(os.getpid()), *command],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT if log is not None else None,
            start_new_session=True,  # Ctrl-C reaches fedgen only, which stops the guard
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


# --- the guard ------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _stop_below(grace: float) -> None:
    """SIGTERM every descendant of this process, SIGKILL what is left after ``grace`` seconds."""
    _signal_all(descendants(os.getpid()), signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap()
        if not descendants(os.getpid()):
            return
        time.sleep(0.2)
    _signal_all(descendants(os.getpid()), signal.SIGKILL)
    _reap()


def _reap() -> None:
    """Collect exited children (orphans the subreaper adopted included)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def guard(parent: int, command: list[str]) -> int:
    """Run ``command`` until it exits or ``parent`` (the fedgen command) dies, then stop every
    process below; returns the command's exit code."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    libc.prctl(PR_SET_PDEATHSIG, PARENT_DIED, 0, 0, 0)
    stopping = []

    def stop(signum, frame) -> None:
        stopping.append(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    if os.getppid() != parent:  # the fedgen command died before the guard was armed
        return 1
    child = subprocess.Popen(command)
    while child.poll() is None and not stopping:
        time.sleep(0.2)
    _stop_below(ORPHAN_GRACE if PARENT_DIED in stopping else GUARD_GRACE)
    return child.wait()


if __name__ == "__main__":
    sys.exit(guard(int(sys.argv[1]), sys.argv[2:]))
