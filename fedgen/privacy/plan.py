"""A site's DP-SGD plan for a run: one budget, one δ, one ε across the modalities it trains.

Every update a site releases in a run, image or text, is a use of its records. By default the
site's image and note records are the same people, so all its updates compose in one
accountant (sequential composition) and the modalities share the site's budget: each
modality's σ is calibrated so that all planned rounds of all modalities together spend it,
in the shares of ``privacy.split``. A site whose site.toml says ``different_people = true``
(its images and its notes are of different people) composes them in parallel: each modality
may spend the whole budget, and the site's ε is the largest modality's.

Plain functions of the run configuration and the site's own settings, used where the site
trains (fedgen.clients.local), where it answers audits (the δ its guarantee holds at), and by
anything that needs "this site's ε so far / after this update" (:class:`SiteAccount`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedgen.config import RunConfig
from fedgen.data.site import SiteData, split_indices
from fedgen.errors import FedgenError
from fedgen.privacy.accounting import (
    HistoryEntry,
    calibrate_composed,
    check_delta,
    default_delta,
    epsilon_from_history,
    planned_steps,
)

__all__ = [
    "SAME_PEOPLE",
    "DIFFERENT_PEOPLE",
    "Histories",
    "PrivacyPlan",
    "SiteAccount",
    "site_account",
    "plan_privacy",
    "site_budget",
    "site_delta",
    "train_records",
    "privacy_facts",
]

# How a site's modalities compose, as the ledger and the report say it.
SAME_PEOPLE = "same people"  # sequential composition: one budget shared by the modalities
DIFFERENT_PEOPLE = "different people"  # parallel composition: each modality has the whole budget

Histories = Mapping[str, Sequence[HistoryEntry]]  # modality -> its released rounds' (σ, q, steps)


@dataclass(frozen=True)
class PrivacyPlan:
    """The DP-SGD parameters a site uses every round of one modality (None σ = no DP)."""

    noise_multiplier: float | None
    delta: float
    sample_rate: float
    steps_per_round: int
    budget: float  # the site's budget for the run (all modalities)

    def round_entry(self) -> tuple[float, float, int]:
        return (self.noise_multiplier or 0.0, self.sample_rate, self.steps_per_round)


@dataclass(frozen=True)
class SiteAccount:
    """How a site's released updates in a run compose into the one ε it signs for.

    ``epsilon(histories)`` is the site's ε over every modality's released rounds;
    ``epsilon_after`` adds one more round of one modality (what a site checks before training).
    """

    site: str
    budget: float
    delta: float
    composition: str  # SAME_PEOPLE or DIFFERENT_PEOPLE
    accountant: str  # "rdp" or "prv"

    def modality_epsilon(self, history: Sequence[HistoryEntry]) -> float:
        """ε of one modality's rounds alone."""
        return epsilon_from_history(history, delta=self.delta, accountant=self.accountant)

    def epsilon(self, histories: Histories) -> float:
        """The site's ε: all modalities composed, or the largest one for different people."""
        if self.composition == DIFFERENT_PEOPLE:
            return max((self.modality_epsilon(h) for h in histories.values()), default=0.0)
        return self.modality_epsilon([entry for h in histories.values() for entry in h])

    def epsilon_after(self, histories: Histories, modality: str, entry: HistoryEntry) -> float:
        """The site's ε if it released one more round ``entry`` of ``modality``."""
        return self.epsilon({**histories, modality: [*histories.get(modality, ()), entry]})


def site_budget(config: RunConfig, site: SiteData) -> float:
    """A site's own budget (site.toml) caps the consortium's target, never raises it."""
    if site.epsilon_budget is None:
        return config.privacy.epsilon
    return min(site.epsilon_budget, config.privacy.epsilon)


def train_records(config: RunConfig, site: SiteData) -> dict[str, int]:
    """Training records per modality of the run that the site holds (after its held-out split).

    ``site`` must be loaded with all of the run's modalities; one without records is left out.
    """
    labels = {"image": site.image_labels, "text": site.text_labels}
    counts = {
        modality: len(
            split_indices(labels[modality], heldout_fraction=site.heldout_fraction, seed=config.data.split_seed)[0]
        )
        for modality in config.modalities
    }
    return {modality: n for modality, n in counts.items() if n > 0}


def site_delta(config: RunConfig, n_train: Mapping[str, int]) -> float:
    """The site's δ: the configured one, else 1/(10 x records) of its largest modality, which
    keeps δ below 1/records for every modality."""
    if config.privacy.delta is not None:
        return config.privacy.delta
    return min(default_delta(n) for n in n_train.values())


def site_account(config: RunConfig, site: SiteData) -> SiteAccount:
    """The site's account for this run (``site`` loaded with all of the run's modalities)."""
    n_train = train_records(config, site)
    if not n_train:
        raise FedgenError(f"{site.name} has no training records for {' or '.join(config.modalities)}")
    delta = site_delta(config, n_train)
    for n in n_train.values():
        check_delta(delta, n, site=site.name)
    composition = DIFFERENT_PEOPLE if site.different_people else SAME_PEOPLE
    return SiteAccount(site.name, site_budget(config, site), delta, composition, config.privacy.accountant)


def plan_privacy(config: RunConfig, site: SiteData, *, modality: str) -> PrivacyPlan:
    """Choose σ so that all planned rounds x local epochs of every modality the site trains
    spend at most its budget together (each modality alone for different people)."""
    n_train = train_records(config, site)
    if modality not in n_train:
        raise FedgenError(f"{site.name} has no {modality} training records")
    account = site_account(config, site)
    sampling = {
        name: planned_steps(
            n_records=n,
            batch_size=getattr(config, name).batch_size,
            epochs_per_round=getattr(config, name).local_epochs,
            rounds=config.federation.rounds,
        )
        for name, n in n_train.items()
    }
    sample_rate, steps = sampling[modality]
    steps_per_round = steps // config.federation.rounds
    if not math.isfinite(account.budget):
        return PrivacyPlan(None, account.delta, sample_rate, steps_per_round, account.budget)
    sigma = config.privacy.noise_multiplier
    if sigma is None:
        shares = config.privacy.split
        together = sampling if account.composition == SAME_PEOPLE else {modality: sampling[modality]}
        sigma = _calibrated(
            account.budget,
            account.delta,
            tuple(sorted((name, shares[name], q, n) for name, (q, n) in together.items())),
            account.accountant,
        )[modality]
    return PrivacyPlan(sigma, account.delta, sample_rate, steps_per_round, account.budget)


@functools.cache
def _calibrated(
    budget: float, delta: float, mechanisms: tuple[tuple[str, float, float, int], ...], accountant: str
) -> dict[str, float]:
    """calibrate_composed, once per process for the same plan: a site plans every round."""
    return calibrate_composed(
        target_epsilon=budget,
        delta=delta,
        mechanisms={name: (share, q, steps) for name, share, q, steps in mechanisms},
        accountant=accountant,
    )


def privacy_facts(config: RunConfig, site: SiteData) -> dict[str, float | str]:
    """The guarantee a site states beside its audit answers: its budget, δ and composition."""
    account = site_account(config, site)
    return {"budget": account.budget, "delta": account.delta, "composition": account.composition}
