"""What a site does in one round, in plain PyTorch: plan its DP budget, train, report.

No Flower here, so tests can call it directly; clients/app.py only translates messages.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from fedgen.config import RunConfig
from fedgen.data.site import SiteData
from fedgen.errors import FedgenError
from fedgen.modalities import Modality
from fedgen.privacy.accounting import (
    calibrate_noise_multiplier,
    check_delta,
    default_delta,
    epsilon_from_history,
    planned_steps,
)
from fedgen.privacy.dp import train_local

__all__ = ["PrivacyPlan", "plan_privacy", "site_delta", "SiteUpdate", "train_site", "BudgetExhausted"]

# How far past its budget a site may land from calibration tolerance alone.
BUDGET_SLACK = 1e-6


class BudgetExhausted(FedgenError):
    """The site refuses to train: one more round would overspend its privacy budget."""


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


@dataclass(frozen=True)
class SiteUpdate:
    state: dict[str, torch.Tensor]
    metrics: dict[str, float]  # what crosses the wire besides the weights
    history: list[tuple[float, float, int]]


def train_site(
    modality: Modality,
    site: SiteData,
    global_state: dict[str, torch.Tensor],
    *,
    history: list[tuple[float, float, int]],
    seed: int,
    proximal_mu: float = 0.0,
    progress=None,
) -> SiteUpdate:
    """One local round: refuse if the budget would be overspent, else train under DP.

    `seed` only seeds non-private training (reproducible comparisons); DP noise and Poisson
    sampling always draw from the operating system.
    """
    train_set, _ = modality.datasets(site)
    plan = plan_privacy(modality.config, site, modality=modality.name, n_train=len(train_set))
    spent = epsilon_from_history(history, delta=plan.delta) if history else 0.0
    after = epsilon_from_history([*history, plan.round_entry()], delta=plan.delta)
    if after > plan.budget * (1 + BUDGET_SLACK):
        raise BudgetExhausted(
            f"{site.name} refuses to train {modality.name}: ε would reach {after:.3g} "
            f"(spent {spent:.3g}) past its budget {plan.budget:.3g}"
        )
    model = modality.build_model()
    modality.set_state(model, global_state)
    section = modality.section
    started = time.perf_counter()
    result = train_local(
        model,
        train_set,
        modality.per_example_loss(),
        epochs=section.local_epochs,
        batch_size=section.batch_size,
        lr=section.lr,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=modality.config.privacy.max_grad_norm,
        delta=plan.delta,
        history=history,
        noise_multiplicity=getattr(section, "noise_multiplicity", 1),
        grad_sample_mode=section.grad_sample_mode,
        max_physical_batch_size=section.max_physical_batch_size,
        # A seed the coordinator knows would let it regenerate the DP noise: DP draws from the OS.
        seed=None if plan.noise_multiplier else seed,
        proximal_mu=proximal_mu,
        progress=progress,
    )
    next_round = epsilon_from_history([*result.history, plan.round_entry()], delta=plan.delta)
    metrics = {
        "num-examples": len(train_set),
        # The training loss is a statistic of private records outside the DP guarantee:
        # under DP it stays at the site (NaN on the wire).
        "loss": math.nan if plan.noise_multiplier else result.mean_loss,
        "epsilon": result.epsilon,
        "epsilon-next": next_round,
        "budget": plan.budget,
        "delta": plan.delta,
        "noise-multiplier": result.noise_multiplier,
        "sample-rate": result.sample_rate,
        "steps": result.steps,
        "train-seconds": time.perf_counter() - started,  # for the federation-overhead figure
    }
    return SiteUpdate(modality.get_state(model), metrics, list(result.history))
