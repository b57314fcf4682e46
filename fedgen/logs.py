"""Console hygiene: fedgen prints its own progress; library chatter is hidden unless asked for."""

import logging
import warnings

__all__ = ["quiet_libraries"]


def quiet_libraries() -> None:
    """Hide Flower's deprecation notices and transformers' load/save progress bars: they say
    nothing a fedgen user can act on (`--verbose` keeps them)."""
    import transformers

    logging.getLogger("flwr").setLevel(logging.ERROR)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
