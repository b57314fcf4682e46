"""Console hygiene: fedgen prints its own progress; library chatter is hidden unless asked for."""

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import Progress

__all__ = ["quiet_libraries", "progress_bar"]


def quiet_libraries() -> None:
    """Hide Flower's deprecation notices and transformers' load/save progress bars: they say
    nothing a fedgen user can act on (`--verbose` keeps them)."""
    import transformers

    logging.getLogger("flwr").setLevel(logging.ERROR)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


@contextmanager
def progress_bar(enabled: bool, *, total: int, description: str) -> Iterator[Callable[[int], None]]:
    """A transient rich progress bar when enabled, yielding ``advance(n)``; a no-op otherwise."""
    if not enabled:
        yield lambda steps: None
        return
    with Progress(transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda steps: bar.advance(task, steps)
