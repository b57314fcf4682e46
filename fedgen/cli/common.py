"""What every fedgen command shares: one-line user errors, consoles, common options and helpers.

A user mistake (FedgenError) is shown as one line on stderr with exit code 1; anything else is
a bug and stays loud.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from fedgen.errors import FedgenError

__all__ = [
    "EXIT_USER_ERROR",
    "EXIT_REFUSED",
    "Group",
    "ConfigOption",
    "console",
    "err_console",
    "parse_epsilon",
    "echo_line",
    "INSECURE_WARNING",
    "coordinator_certs",
]

err_console = Console(stderr=True)
console = Console()

EXIT_USER_ERROR = 1
EXIT_REFUSED = 3  # `fedgen release` of a run the gate refused (or whose files changed since the audit)
EXIT_INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C


class Group(TyperGroup):
    """Turns FedgenError anywhere below into one line and a non-zero exit, and an interrupt into one word."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FedgenError as err:
            # escaped: a message quoting Flower ("[code: 2004] ...") is not Rich markup
            err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:  # Ctrl-C (or SIGTERM) outside a command's own handling: no traceback
            err_console.print("[bold red]interrupted[/]")
            raise typer.Exit(EXIT_INTERRUPTED) from None


def parse_epsilon(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        eps = float(value)
    except ValueError:
        raise FedgenError(f"--epsilon must be a number or 'inf', got {value!r}") from None
    if not eps > 0 or math.isnan(eps):
        raise FedgenError(f"--epsilon must be positive, got {value}")
    return eps


ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="Run configuration (TOML); defaults are the demo's.")
]


def echo_line(line: str) -> None:
    """Pass a Flower process's output line through, unwrapped and unstyled."""
    console.print(line, markup=False, highlight=False, soft_wrap=True)


INSECURE_WARNING = (
    "[bold red]WARNING: --insecure: no TLS and no node authentication. Model updates travel in "
    "clear text and ANY machine that reaches the port can join as a site. Use it only for a "
    "local test.[/]"
)


def coordinator_certs(certs_dir: Path | None, insecure: bool):
    """The coordinator's credentials from --certs, or None for an explicit --insecure."""
    from fedgen.certs import load_certs

    if insecure == (certs_dir is not None):
        raise FedgenError("give --certs DIR (from `fedgen certs`), or --insecure for a local test")
    return load_certs(certs_dir) if certs_dir is not None else None
