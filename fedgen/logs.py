"""Console hygiene: fedgen prints its own progress; library chatter is hidden unless asked for."""

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["quiet_libraries", "progress_bar", "clock"]


def quiet_libraries() -> None:
    """Hide Flower's deprecation notices and transformers' load/save progress bars: they say
    nothing a fedgen user can act on (`--verbose` keeps them)."""
    import transformers

    logging.getLogger("flwr").setLevel(logging.ERROR)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


# Plain progress lines when the output is not a terminal (a log file, CI): one per this share.
PLAIN_LINE_EVERY = 0.1


def _estimate(done: int, total: int, elapsed: float) -> str:
    if not done:
        return "estimating"
    left = elapsed / done * (total - done)
    return f"~{clock(left)} left"


def clock(seconds: float) -> str:
    """m:ss, or h:mm:ss from an hour on."""
    seconds = int(round(seconds))
    return (
        f"{seconds // 60}:{seconds % 60:02d}"
        if seconds < 3600
        else f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    )


@contextmanager
def progress_bar(
    enabled: bool, *, total: int, description: str, unit: str = "", console: Console | None = None
) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)`` for ``total`` units of work; a no-op when not ``enabled``.

    On a terminal: a transient bar with done/total ``unit``, the time spent and an estimate of
    the time left. Otherwise (a log file): a line every tenth of the work with the same figures.
    """
    if not enabled:
        yield lambda steps: None
        return
    console = console or Console(stderr=True)
    if console.is_terminal:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(unit),
            TimeElapsedColumn(),
            TextColumn("~"),
            TimeRemainingColumn(),
            TextColumn("left"),
        )
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda steps: bar.advance(task, steps)
        return
    started, done, next_line = time.monotonic(), 0, 0
    every = max(1, math.ceil(total * PLAIN_LINE_EVERY))

    def advance(steps: int) -> None:
        nonlocal done, next_line
        done += steps
        if done >= next_line or done >= total:
            elapsed = time.monotonic() - started
            console.print(
                f"{description}: {done}/{total} {unit} in {clock(elapsed)}, {_estimate(done, total, elapsed)}",
                highlight=False,
                soft_wrap=True,
            )
            next_line = (done // every + 1) * every

    yield advance
