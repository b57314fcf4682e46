"""A site's progress inside a round: which round, local epoch and step it is at.

A simulated site trains in its own process (Ray), so it tells the console through a small file
in its state folder, ``SITE_DIR/.fedgen/progress-<modality>.json``, rewritten (atomically) at
most every ``WRITE_EVERY`` seconds and after the last step. `fedgen simulate` reads the sites'
files and shows where each one is. The file holds step counts the coordinator plans anyway and
no figure of the site's data (not even the loss, which stays private under DP).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from fedgen.files import write_json

__all__ = ["SiteProgress", "progress_path", "progress_writer", "read_progress"]

WRITE_EVERY = 0.5  # seconds between rewrites of the file


@dataclass(frozen=True)
class SiteProgress:
    site: str
    modality: str
    round: int
    epoch: int  # 1-based local epoch
    epochs: int
    step: int  # optimizer steps done in this round
    steps: int  # planned steps of this round

    @property
    def done(self) -> bool:
        return self.step >= self.steps


def progress_path(state_dir: Path, modality: str) -> Path:
    return Path(state_dir) / f"progress-{modality}.json"


def progress_writer(
    path: Path, *, site: str, modality: str, round: int, epochs: int, steps_per_epoch: int
) -> Callable[[int, float], None]:
    """A ``progress(step, loss)`` callback for the training loop that keeps ``path`` current."""
    steps = epochs * steps_per_epoch
    last_write = 0.0

    def write(step: int) -> None:
        epoch = min(epochs, (step - 1) // steps_per_epoch + 1) if step else 1
        write_json(path, asdict(SiteProgress(site, modality, round, epoch, epochs, step, steps)))

    def progress(step: int, _loss: float) -> None:
        nonlocal last_write
        now = time.monotonic()
        if step >= steps or now - last_write >= WRITE_EVERY:
            write(step)
            last_write = now

    write(0)
    return progress


def read_progress(path: Path) -> SiteProgress | None:
    """The site's last written progress, or None if there is none (yet) or it cannot be read."""
    try:
        return SiteProgress(**json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
