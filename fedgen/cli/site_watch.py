"""`fedgen simulate`'s view of the simulated sites inside a round: round, local epoch, steps.

The sites train in other processes and write their progress to their state folders
(``fedgen.site_progress``); this polls those files while the simulation runs. On a terminal it
draws one bar per site and modality; in a log it prints a line whenever a site starts an epoch.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedgen.artifacts import SITE_STATE_DIR
from fedgen.site_progress import SiteProgress, progress_path, read_progress

__all__ = ["showing_site_progress"]

POLL_SECONDS = 0.5
LOG_PARTS_OF_ONE_EPOCH = 4


def _describe(progress: SiteProgress) -> str:
    return f"{progress.site} {progress.modality} round {progress.round}: epoch {progress.epoch}/{progress.epochs}"


def _stage(progress: SiteProgress) -> int:
    """What a log line marks: each local epoch, or each quarter of a round of one epoch (a text
    round is one long epoch)."""
    if progress.epochs > 1:
        return progress.epoch
    return LOG_PARTS_OF_ONE_EPOCH * progress.step // max(progress.steps, 1)


@contextmanager
def showing_site_progress(site_dirs: Sequence[Path], modalities: Sequence[str], console: Console) -> Iterator[None]:
    """Show the sites' progress files while the block runs (files of an earlier run are removed first)."""
    paths = [progress_path(Path(root) / SITE_STATE_DIR, m) for m in modalities for root in site_dirs]
    for path in paths:
        path.unlink(missing_ok=True)
    stop = threading.Event()
    if console.is_terminal:
        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        tasks: dict[Path, int] = {}

        def show(path: Path, progress: SiteProgress) -> None:
            if path not in tasks:
                tasks[path] = bar.add_task("", total=progress.steps)
            bar.update(tasks[path], description=_describe(progress), completed=progress.step, total=progress.steps)
    else:
        bar, shown = None, {}

        def show(path: Path, progress: SiteProgress) -> None:
            key = (progress.round, _stage(progress))
            if shown.get(path) != key and progress.step < progress.steps:
                shown[path] = key
                console.print(f"{_describe(progress)} ({progress.step}/{progress.steps} steps)", highlight=False)

    def poll() -> None:
        while not stop.wait(POLL_SECONDS):
            for path in paths:
                progress = read_progress(path)
                if progress is not None:
                    show(path, progress)

    watcher = threading.Thread(target=poll, daemon=True)
    try:
        if bar is not None:
            bar.start()
        watcher.start()
        yield
    finally:
        stop.set()
        watcher.join()
        if bar is not None:
            bar.stop()
