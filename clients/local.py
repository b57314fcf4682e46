"""What a site does in one round, in plain PyTorch: plan its DP budget, train, report.

No Flower here, so tests can call it directly; clients/app.py only translates messages.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from fedgen.data.site import SiteData
from fedgen.errors import FedgenError
from fedgen.modalities import Modality
from fedgen.privacy.accounting import default_delta, planned_steps
from fedgen.privacy.plan import DIFFERENT_PEOPLE, Histories, PrivacyPlan, plan_privacy, site_account
from fedgen.site_policy import SitePolicy, policy_from_settings
from fedgen.training import ProgressCallback, train_local

__all__ = ["SiteUpdate", "train_site", "BudgetExhausted", "PolicyRefused", "check_policy", "with_node_policy"]

# How far past its budget a site may land from calibration tolerance alone.
BUDGET_SLACK = 1e-6


class BudgetExhausted(FedgenError):
    """The site refuses to train: one more round would overspend its privacy budget."""


class PolicyRefused(FedgenError):
    """The site refuses to train: the run asks for less privacy than its policy accepts."""


def with_node_policy(site: SiteData, node_config: Mapping[str, object]) -> SiteData:
    """The site with the policy settings of its SuperNode's node config (`fedgen client` flags)
    applied over its site.toml."""
    try:
        policy = policy_from_settings(node_config, base=site.policy)
    except ValueError as err:
        raise FedgenError(f"{site.name}: node config: {err}") from None
    return dataclasses.replace(site, policy=policy, epsilon_budget=policy.epsilon_budget)


def check_policy(policy: SitePolicy, plan: PrivacyPlan, *, site: str, modality: str, n_train: int) -> None:
    """Refuse, in one line the coordinator sees, a plan below the site's privacy floor."""
    refuse = f"{site} refuses to train {modality}"
    sigma = plan.noise_multiplier
    if sigma is None:
        if policy.require_dp:
            raise PolicyRefused(f"{refuse}: its policy requires DP and the run asks for ε = inf (require_dp)")
        return
    if sigma < policy.min_noise_multiplier:
        raise PolicyRefused(
            f"{refuse}: σ = {sigma:.3g} is below its floor min_noise_multiplier = {policy.min_noise_multiplier:g}"
        )
    max_delta = policy.max_delta if policy.max_delta is not None else default_delta(n_train)
    if plan.delta > max_delta * (1 + BUDGET_SLACK):
        raise PolicyRefused(f"{refuse}: δ = {plan.delta:.3g} is above its max_delta = {max_delta:.3g}")


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
    histories: Histories,
    seed: int,
    proximal_mu: float = 0.0,
    progress_for: Callable[[int, int], ProgressCallback] | None = None,
) -> SiteUpdate:
    """One local round: refuse a plan below the site's policy or one that would overspend its
    budget, else train under DP.

    ``histories`` holds the (σ, q, steps) of every round the site already released in this
    run, per modality: its ε is all of them composed (fedgen.privacy.plan). ``site`` is loaded
    with all of the run's modalities. `seed` only seeds non-private training (reproducible
    comparisons); DP noise and Poisson sampling always draw from the operating system.
    ``progress_for(epochs, steps_per_epoch)``, once the round is planned, returns the training
    loop's ``progress(step, loss)`` callback.
    """
    train_set, _ = modality.datasets(site)
    config = modality.config
    plan = plan_privacy(config, site, modality=modality.name)
    check_policy(site.policy, plan, site=site.name, modality=modality.name, n_train=len(train_set))
    account = site_account(config, site)
    history = list(histories.get(modality.name, ()))
    after = account.epsilon_after(histories, modality.name, plan.round_entry())
    if after > plan.budget * (1 + BUDGET_SLACK):
        raise BudgetExhausted(
            f"{site.name} refuses to train {modality.name}: its ε would reach {after:.3g} "
            f"(spent {account.epsilon(histories):.3g}, all modalities) past its budget {plan.budget:.3g}"
        )
    model = modality.build_model()
    modality.set_state(model, global_state)
    train_set = modality.training_set(model, train_set)
    section = modality.section
    progress = None
    if progress_for is not None:
        _, steps_per_epoch = planned_steps(
            n_records=len(train_set), batch_size=section.batch_size, epochs_per_round=1, rounds=1
        )
        progress = progress_for(section.local_epochs, steps_per_epoch)
    started = time.perf_counter()
    result = train_local(
        model,
        train_set,
        modality.per_example_loss(),
        epochs=section.local_epochs,
        batch_size=section.batch_size,
        lr=section.lr,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=section.max_grad_norm,
        delta=plan.delta,
        history=history,
        accountant=account.accountant,
        secure_mode=config.privacy.secure_mode,
        noise_multiplicity=getattr(section, "noise_multiplicity", 1),
        grad_sample_mode=section.grad_sample_mode,
        max_physical_batch_size=section.max_physical_batch_size,
        # A seed the coordinator knows would let it regenerate the DP noise: DP draws from the OS.
        seed=None if plan.noise_multiplier else seed,
        proximal_mu=proximal_mu,
        progress=progress,
    )
    released = {**histories, modality.name: list(result.history)}
    metrics = {
        "num-examples": len(train_set),
        # The training loss is a statistic of private records outside the DP guarantee:
        # under DP it stays at the site (NaN on the wire).
        "loss": math.nan if plan.noise_multiplier else result.mean_loss,
        "site-epsilon": account.epsilon(released),  # the site's ε, all modalities
        "epsilon": result.epsilon,  # this modality's rounds alone
        "epsilon-next": account.epsilon_after(released, modality.name, plan.round_entry()),
        "budget": plan.budget,
        "delta": plan.delta,
        "different-people": float(account.composition == DIFFERENT_PEOPLE),
        "release": len(result.history),  # this update is the site's n-th of this modality
        "noise-multiplier": result.noise_multiplier,
        "sample-rate": result.sample_rate,
        "steps": result.steps,
        "train-seconds": time.perf_counter() - started,  # for the federation-overhead figure
        **modality.reply_metrics(train_set),  # text: the coarse note length generation stops at
    }
    return SiteUpdate(modality.get_state(model), metrics, list(result.history))
