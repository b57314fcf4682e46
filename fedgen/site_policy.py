"""What a site accepts from the coordinator: its privacy floor and the audit answers it gives.

The run configuration every message carries is the coordinator's; a site trains and answers
only within its own policy, set in its ``site.toml`` (and by ``fedgen client`` flags, which
override the file for one SuperNode)::

    require_dp = true            # refuse a run without DP (ε = inf); default true
    epsilon_budget = 5.0         # the site's ε for the whole run (caps the consortium's target)
    max_delta = 1e-4             # the largest δ it trains with; default 1 / (10 x its train records)
    min_noise_multiplier = 0.5   # the smallest σ it trains with; default 0.3
    audit_queries = ["audit"]    # the audit queries it answers; [] answers none
    audit_answers = 3            # how many times it answers each query about one trained model

A message asking for less privacy is refused with one line naming the setting; the site's own
ledger (fedgen.clients.app.site_ledger) stays the authority on what it has spent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

__all__ = [
    "SitePolicy",
    "POLICY_KEYS",
    "DEFAULT_MIN_NOISE_MULTIPLIER",
    "AUDIT_QUERY_NAMES",
    "policy_setting_problem",
    "policy_from_settings",
]

# Below σ ≈ 0.3 one DP-SGD step's guarantee is close to void and subsampling barely amplifies it;
# calibrated σ for ε ≤ 10 on the demo's settings stays above 0.5.
DEFAULT_MIN_NOISE_MULTIPLIER = 0.3
DEFAULT_AUDIT_ANSWERS = 3  # one audit, plus retries after a crash or with another policy file
AUDIT_QUERY_NAMES = ("audit",)  # the queries fedgen.protocol defines
POLICY_KEYS = ("require_dp", "epsilon_budget", "max_delta", "min_noise_multiplier", "audit_queries", "audit_answers")


@dataclass(frozen=True)
class SitePolicy:
    require_dp: bool = True
    epsilon_budget: float | None = None  # None: the consortium's target
    max_delta: float | None = None  # None: 1 / (10 x the site's training records)
    min_noise_multiplier: float = DEFAULT_MIN_NOISE_MULTIPLIER
    audit_queries: tuple[str, ...] = AUDIT_QUERY_NAMES
    audit_answers: int = DEFAULT_AUDIT_ANSWERS


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _queries(value: object) -> tuple[str, ...] | None:
    """A list of query names, or (node config, which holds scalars only) a comma-separated string."""
    if isinstance(value, str):
        value = [name.strip() for name in value.split(",") if name.strip()]
    if isinstance(value, list) and all(isinstance(name, str) for name in value):
        return tuple(value)
    return None


def policy_setting_problem(key: str, value: object) -> str | None:
    """Why ``key = value`` is not a valid policy setting (None: it is)."""
    if key == "require_dp" and not isinstance(value, bool):
        return f"require_dp = {value!r} must be true or false"
    if key == "epsilon_budget" and not (_is_number(value) and value > 0):
        return f"epsilon_budget = {value!r} must be a number greater than 0"
    if key == "max_delta" and not (_is_number(value) and 0 < value < 1):
        return f"max_delta = {value!r} must be a number between 0 and 1 (exclusive)"
    if key == "min_noise_multiplier" and not (_is_number(value) and value >= 0 and math.isfinite(value)):
        return f"min_noise_multiplier = {value!r} must be a number of at least 0"
    if key == "audit_queries":
        names = _queries(value)
        if names is None:
            return f"audit_queries = {value!r} must be a list of query names ({', '.join(AUDIT_QUERY_NAMES)})"
        unknown = sorted(set(names) - set(AUDIT_QUERY_NAMES))
        if unknown:
            return f"audit_queries: unknown {', '.join(unknown)} (known: {', '.join(AUDIT_QUERY_NAMES)})"
    if key == "audit_answers" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return f"audit_answers = {value!r} must be a whole number of at least 0"
    return None


def policy_from_settings(settings: Mapping[str, object], base: SitePolicy | None = None) -> SitePolicy:
    """``base`` (default: the default policy) with the policy keys of ``settings`` applied.

    ``settings`` is site.toml's checked table or a SuperNode's node config (its other keys are
    ignored); a bad value raises ValueError with the one-line reason.
    """
    changes = {}
    for key in POLICY_KEYS:
        if key not in settings:
            continue
        value = settings[key]
        problem = policy_setting_problem(key, value)
        if problem:
            raise ValueError(problem)
        if key == "audit_queries":
            value = _queries(value)
        elif key in ("epsilon_budget", "max_delta", "min_noise_multiplier"):
            value = float(value)
        changes[key] = value
    return replace(base or SitePolicy(), **changes)
