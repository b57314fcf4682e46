"""Errors a user can cause. The CLI shows them as one line and exits non-zero."""

__all__ = ["FedgenError"]


class FedgenError(Exception):
    """A problem with the user's input or environment, not a bug in fedgen."""
