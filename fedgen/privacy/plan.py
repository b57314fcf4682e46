"""A site's DP-SGD plan for a run: its budget, its δ, and the σ that keeps all rounds within both.

Plain functions of the run configuration and the site's own settings, used where the site
trains (fedgen.clients.local) and where it answers audits (the δ its guarantee holds at).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedgen.config import RunConfig
from fedgen.data.site import SiteData
from fedgen.errors import FedgenError
from fedgen.privacy.accounting import (
    calibrate_noise_multiplier,
    check_delta,
    default_delta,
    planned_steps,
)

__all__ = ["PrivacyPlan", "plan_privacy", "site_budget", "site_delta", "privacy_facts"]


@dataclass(frozen=True)
class PrivacyPlan:
    """The DP-SGD parameters a site uses every round of this run (None σ = no DP)."""

    noise_multiplier: float | None
    delta: float
    sample_rate: float
    steps_per_round: int
    budget: float

    def round_entry(self) -> tuple[float, float, int]:
        return (self.noise_multiplier or 0.0, self.sample_rate, self.steps_per_round)


def site_budget(config: RunConfig, site: SiteData) -> float:
    """A site's own budget (site.toml) caps the consortium's target, never raises it."""
    if site.epsilon_budget is None:
        return config.privacy.epsilon
    return min(site.epsilon_budget, config.privacy.epsilon)


def site_delta(config: RunConfig, n_train: int) -> float:
    """The δ a site trains with: the configured one, else 1/(10 x its training records)."""
    return config.privacy.delta if config.privacy.delta is not None else default_delta(n_train)


def plan_privacy(config: RunConfig, site: SiteData, *, modality: str, n_train: int) -> PrivacyPlan:
    """Choose σ so that all planned rounds x local epochs together spend at most the budget."""
    if n_train == 0:
        raise FedgenError(f"{site.name} has no {modality} training records")
    section = getattr(config, modality)
    sample_rate, steps = planned_steps(
        n_records=n_train,
        batch_size=section.batch_size,
        epochs_per_round=section.local_epochs,
        rounds=config.federation.rounds,
    )
    steps_per_round = steps // config.federation.rounds
    budget = site_budget(config, site)
    delta = site_delta(config, n_train)
    check_delta(delta, n_train, site=site.name)
    if not math.isfinite(budget):
        return PrivacyPlan(None, delta, sample_rate, steps_per_round, budget)
    sigma = config.privacy.noise_multiplier
    if sigma is None:
        sigma = calibrate_noise_multiplier(
            target_epsilon=budget, delta=delta, sample_rate=sample_rate, steps=steps
        )
    return PrivacyPlan(sigma, delta, sample_rate, steps_per_round, budget)


def privacy_facts(config: RunConfig, site: SiteData, *, n_train: int) -> dict[str, float]:
    """The guarantee a site states beside its audit answers: its budget and its δ."""
    return {"budget": site_budget(config, site), "delta": site_delta(config, n_train)}
