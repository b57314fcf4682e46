"""Flower's own strategies with fedgen's privacy ledger added: record ε, skip spent sites.

The averaging itself is Flower's (FedAvg / FedAdam / FedProx); the mixin only (1) writes one
ledger row per replying site per round, and one per earlier update the site lists that the
ledger lacks (its reply was lost in a coordinator crash), (2) stops asking a site whose next round would
overspend its budget, (3) aggregates ε as a maximum, never as a weighted mean, (4) fails a
round that fewer than min_sites answered (after recording those that did: their ε is spent), and
(5) keeps each text site's coarse note length for the round's checkpoint.
After the first round, a site that went offline no longer blocks the next one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
)

from fedgen.config import RunConfig
from fedgen.errors import FedgenError
from fedgen.modalities import NOTE_TOKENS
from fedgen.privacy.ledger import LedgerEntry, PrivacyLedger
from fedgen.protocol import RELEASED_KEY, TRAIN_METRICS, TRAIN_SITE, error_line

__all__ = ["make_strategy", "aggregate_site_metrics", "SiteReport", "BudgetSpent"]

NODE_POLL_SECONDS = 1.0  # how often to check whether the consortium's sites are online
# Under client-level DP every reply weighs the same (see ClientDPMixin).
UNIFORM_WEIGHT_KEY = "client-dp-weight"
UNIFORM_WEIGHT = 1.0

SiteReport = Callable[[int, str, dict[str, float]], None]


def aggregate_site_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean loss, but the worst (largest) site ε: a budget is not an average.

    Under DP sites send NaN for the loss, so the mean is NaN too: nothing is inferred from it.
    """
    metrics = [next(iter(r.metric_records.values())) for r in records]
    total = sum(float(m[weight_key]) for m in metrics)
    return MetricRecord(
        {
            "loss": sum(float(m["loss"]) * float(m[weight_key]) for m in metrics) / total,
            "epsilon-max": max(float(m["site-epsilon"]) for m in metrics),
            "sites": len(metrics),
        }
    )


class BudgetSpent(Exception):
    """Too few sites can train another round within their budgets: the federation ends early."""


class LedgerMixin:
    """Mixed in front of a Flower strategy class (see make_strategy)."""

    def __init__(self, *, ledger: PrivacyLedger, modality: str, accountant: str, report: SiteReport | None, **kwargs):
        super().__init__(train_metrics_aggr_fn=aggregate_site_metrics, **kwargs)
        self.ledger = ledger
        self.modality = modality
        self.accountant = accountant
        self.report = report
        self.round_offset = 0  # rounds already done before a resume
        self.spent_nodes: set[int] = set()
        # Timing of the last round, for the federation-overhead figure in metrics.json.
        self.round_seconds = math.nan
        self.site_train_seconds: dict[str, float] = {}
        self.site_note_tokens: dict[str, int] = {}  # text: each site's coarse note length, last round
        self._round_started = time.perf_counter()
        self.failures: list[str] = []  # why sites failed the last round (the round went on)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round_started = time.perf_counter()
        self.site_train_seconds = {}
        self.site_note_tokens = {}
        server_round += self.round_offset
        # Flower's FedAvg sizes its sample from the nodes online BEFORE it waits for
        # min_available_nodes, so a site that connects during the wait would be left out.
        while len(list(grid.get_node_ids())) < self.min_available_nodes:
            time.sleep(NODE_POLL_SECONDS)
        messages = super().configure_train(server_round, arrays, config, grid)
        # The first round waits for the whole consortium; later rounds go on with the sites
        # still online, so a site that crashed does not block the run (min_sites still applies).
        self.min_available_nodes = self.min_train_nodes
        asked = [m for m in messages if m.metadata.dst_node_id not in self.spent_nodes]
        if len(asked) < min(len(messages), self.min_train_nodes):
            raise BudgetSpent(
                f"{len(asked)} site(s) have privacy budget left for round {server_round}, fewer than "
                f"min_sites = {self.min_train_nodes}: the {self.modality} federation ends after round "
                f"{server_round - 1}"
            )
        return asked

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """Record every site that replied (its ε is spent), then average if enough replied."""
        server_round += self.round_offset
        replies = list(replies)
        ok = [m for m in replies if not m.has_error()]
        for msg in ok:
            self._record(server_round, msg)
        self.failures = sorted({error_line(m.error.reason) for m in replies if m.has_error()})
        reasons = "; ".join(self.failures) or "no reply"
        if replies and not ok:
            raise FedgenError(f"every site failed round {server_round}: {reasons}")
        if len(ok) < self.min_train_nodes:
            raise FedgenError(
                f"round {server_round}: {len(ok)} site(s) replied, fewer than min_sites = "
                f"{self.min_train_nodes} ({reasons})"
            )
        aggregated = super().aggregate_train(server_round, ok)
        self.round_seconds = time.perf_counter() - self._round_started
        return aggregated

    def _record(self, server_round: int, msg: Message) -> None:
        site = str(msg.content[TRAIN_SITE]["name"])
        m = {k: float(v) for k, v in msg.content[TRAIN_METRICS].items()}
        entry = LedgerEntry.from_metrics(site, self.modality, server_round, m, accountant=self.accountant)
        self._record_lost(entry, json.loads(str(msg.content[TRAIN_SITE].get(RELEASED_KEY, "{}"))))
        self.ledger.record(entry)
        if m["epsilon-next"] > m["budget"]:
            self.spent_nodes.add(msg.metadata.src_node_id)
        self.site_train_seconds[site] = m.get("train-seconds", math.nan)
        if math.isfinite(m.get(NOTE_TOKENS, math.nan)):  # NaN: too few notes to say
            self.site_note_tokens[site] = int(m[NOTE_TOKENS])
        if self.report is not None:
            self.report(server_round, site, m)

    def _record_lost(self, entry: LedgerEntry, released: dict[str, list]) -> None:
        """Rows for the updates the site lists but the ledger lacks: their replies were lost
        (the coordinator died after the site released them), their ε was spent all the same."""
        for modality, history in released.items():
            known = {r.release for r in self.ledger.entries(site=entry.site, modality=modality)}
            for release, (sigma, q, steps) in enumerate(history, start=1):
                if release in known or (modality, release) == (entry.modality, entry.release):
                    continue
                self.ledger.record(replace(
                    entry, modality=modality, release=release, site_epsilon=None, epsilon=None, noise_multiplier=sigma,
                    sample_rate=q, steps=steps, num_examples=entry.num_examples if modality == entry.modality else 0,
                    loss=None, lost=True,
                ))  # fmt: skip


class ClientDPMixin:
    """Mixed in front of one of Flower's server-side client-DP wrappers (see make_strategy).

    Flower's wrapper clips each update, lets the wrapped ledger strategy average, then adds
    Gaussian noise of std σ·C/n. This mixin makes that sound and keeps the ledger whole:
    - the average is unweighted (every reply weighs UNIFORM_WEIGHT): σ·C/n is calibrated for
      a plain mean, while an example-weighted mean lets a big site move it by more than C/n;
    - n is the number of replies actually averaged, so a round a site missed gets more noise;
    - failed replies are left out before Flower's wrapper sees them: it would otherwise skip
      the round whole, and the ledger would not record the sites that did spend their ε.
    The ledger strategy's state (round_offset, failures, timings) is read and set through it.
    """

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        ok = [m for m in replies if not m.has_error()]
        if len(ok) < self.strategy.min_train_nodes:  # the ledger strategy records them and fails
            return self.strategy.aggregate_train(server_round, replies)
        for msg in ok:
            msg.content[TRAIN_METRICS][UNIFORM_WEIGHT_KEY] = UNIFORM_WEIGHT
        self.num_sampled_clients = len(ok)
        aggregated = super().aggregate_train(server_round, ok)
        self.strategy.failures = sorted({error_line(m.error.reason) for m in replies if m.has_error()})
        return aggregated

    def __getattr__(self, name: str):
        strategy = self.__dict__.get("strategy")
        if strategy is None:
            raise AttributeError(name)
        return getattr(strategy, name)

    @property
    def round_offset(self) -> int:
        return self.strategy.round_offset

    @round_offset.setter
    def round_offset(self, value: int) -> None:
        self.strategy.round_offset = value


_STRATEGIES = {"fedavg": FedAvg, "fedadam": FedAdam, "fedprox": FedProx}


def make_strategy(config: RunConfig, *, ledger: PrivacyLedger, modality: str, report: SiteReport | None = None):
    """The configured Flower strategy with the ledger mixed in, wrapped for client-level DP
    when federation.client_dp is on."""
    fed = config.federation
    base = _STRATEGIES[fed.strategy]
    kwargs = dict(
        fraction_train=fed.fraction_train,
        fraction_evaluate=0.0,  # sites are evaluated by the audits, not every round
        min_train_nodes=min(fed.min_sites, fed.sites),
        min_available_nodes=fed.sites,
    )
    if fed.strategy == "fedadam":
        kwargs.update(eta=fed.server_lr)
    if fed.strategy == "fedprox":
        kwargs.update(proximal_mu=fed.proximal_mu)
    if fed.client_dp != "off":
        kwargs.update(weighted_by_key=UNIFORM_WEIGHT_KEY)
    strategy_class = type(f"Ledger{base.__name__}", (LedgerMixin, base), {})
    strategy = strategy_class(
        ledger=ledger, modality=modality, accountant=config.privacy.accountant, report=report, **kwargs
    )
    if fed.client_dp == "off":
        return strategy
    sampled = max(int(fed.sites * fed.fraction_train), kwargs["min_train_nodes"])
    try:
        if fed.client_dp == "fixed":
            wrapper = type("ClientDPFixedClipping", (ClientDPMixin, DifferentialPrivacyServerSideFixedClipping), {})
            return wrapper(strategy, fed.client_dp_noise_multiplier, fed.client_dp_clipping_norm, sampled)
        wrapper = type("ClientDPAdaptiveClipping", (ClientDPMixin, DifferentialPrivacyServerSideAdaptiveClipping), {})
        return wrapper(
            strategy,
            fed.client_dp_noise_multiplier,
            sampled,
            initial_clipping_norm=fed.client_dp_clipping_norm,
        )
    except ValueError as err:  # Flower's own parameter checks, e.g. adaptive σ vs sites
        raise FedgenError(f"federation.client_dp = {fed.client_dp!r}: {err}") from None
