"""A site's training-reply metrics as clients/local.py sends them, for tests that stand in for a site."""

from __future__ import annotations


def training_metrics(**changes: float) -> dict[str, float]:
    """One site's metrics after a round: 10 records, ε 1 of a budget of 10; ``changes`` use
    underscores for the hyphens of the wire names (``site_epsilon=2.0``)."""
    metrics = {
        "num-examples": 10,
        "loss": 0.5,
        "site-epsilon": 1.0,
        "epsilon": 1.0,
        "epsilon-next": 2.0,
        "budget": 10.0,
        "delta": 1e-5,
        "different-people": 0.0,
        "release": 1,
        "noise-multiplier": 1.0,
        "sample-rate": 0.1,
        "steps": 5,
    }
    for name, value in changes.items():
        key = name.replace("_", "-")
        assert key in metrics, f"no training metric {key}"
        metrics[key] = value
    return metrics
