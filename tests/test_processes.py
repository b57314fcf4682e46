"""Flower's processes die with the fedgen command that started them, however it dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedgen.processes import descendants

# A fedgen command's stand-in: a ProcessGroup running a "Flower" command that has a child of its own.
COMMAND = """
import os, sys, time
from fedgen.processes import process_group
with process_group() as group:
    guard = group.start(["sh", "-c", "sleep 300 & sleep 300"], env=dict(os.environ))
    print(guard.pid, flush=True)
    time.sleep(300)
"""


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that never comes is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_the_flower_processes_die_with_the_fedgen_command(signum):
    fedgen = subprocess.Popen(
        [sys.executable, "-c", COMMAND], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        guard = int(fedgen.stdout.readline())
        assert wait_until(lambda: len(descendants(guard)) == 3, timeout=10)  # sh and its two sleeps
        below = [guard, *descendants(guard)]
        os.kill(fedgen.pid, signum)  # only the fedgen command's PID
        fedgen.wait(timeout=30)
        assert wait_until(lambda: not any(alive(pid) for pid in below), timeout=5), [p for p in below if alive(p)]
    finally:
        for pid in [fedgen.pid, *descendants(fedgen.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
