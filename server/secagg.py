"""SecAgg+ for fedgen's federations: the coordinator sees only the sum of the sites' updates.

Flower 1.41 has SecAgg+ only in its legacy API: `SecAggPlusWorkflow` runs inside a
`DefaultWorkflow` on a `LegacyContext` and drives a legacy `flwr.server.strategy.Strategy`
(configure_fit / aggregate_fit on unnamed `Parameters`); on the sites `secaggplus_mod` wraps a
train handler that speaks the legacy `fitins.*` / `fitres.*` records. This module adapts both
ends, so the same ledger strategy (server/strategy.py) and the same site training
(clients/app.py) run with or without it:

- `start_secagg` is `Strategy.start` with the training replies summed under SecAgg+; the
  ledger strategy still records every site (its metrics travel in the clear, its arrays never)
  and checkpoints still come from evaluate_fn.
- on the sites, fedgen.clients.secagg lets one ClientApp train handler answer both.

SecAgg+ itself computes the example-weighted mean (each site masks [n/max_weight,
n/max_weight * params]); the ledger strategy then averages identical arrays, a no-op for FedAvg
and FedProx and FedAdam's server step on top of the secure mean. Parameters are clipped to
±CLIPPING_RANGE and quantised to 2^22 levels before masking.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import ServerConfig
from flwr.server.compat import LegacyContext
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedgen.errors import FedgenError
from fedgen.protocol import (
    ARRAY_KEYS,
    RELEASED_KEY,
    SITE_KEY,
    TRAIN_ARRAYS,
    TRAIN_CONFIG,
    TRAIN_METRICS,
    TRAIN_SITE,
)

__all__ = ["start_secagg"]

NUM_SHARES = 1.0  # every sampled site holds a share of every other site's keys
RECONSTRUCTION_THRESHOLD = 0.5  # half the shares rebuild a dropped site's mask (at least 2)
CLIPPING_RANGE = 8.0  # |parameter| above this is clipped before quantisation
DROPPED_OUT = "sent no masked update (dropped out of SecAgg+)"

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


class _LedgerStrategyAdapter(LegacyStrategy):
    """A Message-API strategy seen through the legacy Strategy interface SecAgg+ drives."""

    def __init__(
        self,
        strategy: Strategy,
        grid: Grid,
        initial_arrays: ArrayRecord,
        train_config: ConfigRecord,
        evaluate_fn: EvaluateFn | None,
    ):
        self.strategy = strategy
        self.grid = grid
        self.initial_arrays = initial_arrays
        self.keys = list(initial_arrays.keys())
        self.dtypes = [a.numpy().dtype for a in initial_arrays.values()]
        self.train_config = train_config
        self.evaluate_fn = evaluate_fn
        self.sent: dict[int, Message] = {}
        self.aggregated_round = 0

    def _arrays(self, parameters: Parameters) -> ArrayRecord:
        """Names and dtypes back (SecAgg+ dequantises to float64)."""
        ndarrays = parameters_to_ndarrays(parameters)
        return ArrayRecord(
            {k: Array(np.asarray(a, dtype=t)) for k, a, t in zip(self.keys, ndarrays, self.dtypes, strict=True)}
        )

    def initialize_parameters(self, client_manager) -> Parameters:
        return ndarrays_to_parameters(self.initial_arrays.to_numpy_ndarrays())

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager):
        messages = self.strategy.configure_train(
            server_round, self._arrays(parameters), ConfigRecord(dict(self.train_config)), self.grid
        )
        self.sent = {m.metadata.dst_node_id: m for m in messages}
        run_id = self.grid.run.run_id
        return [
            (
                GridClientProxy(node_id=node, grid=self.grid, run_id=run_id),
                FitIns(parameters, {**m.content[TRAIN_CONFIG], ARRAY_KEYS: self.keys}),
            )
            for node, m in self.sent.items()
        ]

    def aggregate_fit(self, server_round: int, results: list, failures: list):
        """Every result carries the secure mean; the ledger strategy records the sites."""
        replies = [self._reply(proxy.node_id, fitres) for proxy, fitres in results]
        replied = {proxy.node_id for proxy, _ in results}
        replies += [
            Message(Error(code=0, reason=DROPPED_OUT), reply_to=m) for n, m in self.sent.items() if n not in replied
        ]
        arrays, _ = self.strategy.aggregate_train(server_round, replies)
        self.aggregated_round = server_round
        if arrays is None:
            return None, {}
        return ndarrays_to_parameters(arrays.to_numpy_ndarrays()), {}

    def _reply(self, node: int, fitres: FitRes) -> Message:
        metrics = dict(fitres.metrics)
        site, released = str(metrics.pop(SITE_KEY)), str(metrics.pop(RELEASED_KEY))
        content = RecordDict(
            {
                TRAIN_ARRAYS: self._arrays(fitres.parameters),
                TRAIN_METRICS: MetricRecord(metrics),
                TRAIN_SITE: ConfigRecord({"name": site, RELEASED_KEY: released}),
            }
        )
        return Message(content=content, reply_to=self.sent[node])

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []  # sites are evaluated by the audits, not every round

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        """Checkpoints come from here (round 0 and after every round, as in Strategy.start)."""
        if server_round > self.aggregated_round:
            # SecAgg+ halted before aggregate_fit: nothing was averaged and no site recorded.
            raise FedgenError(
                f"round {server_round}: secure aggregation halted (too few sites completed "
                "SecAgg+); sites that trained keep that round's ε in their own ledgers"
            )
        if self.evaluate_fn is not None:
            self.evaluate_fn(server_round, self._arrays(parameters))


def start_secagg(
    strategy: Strategy,
    *,
    grid: Grid,
    initial_arrays: ArrayRecord,
    num_rounds: int,
    timeout: float | None,
    train_config: ConfigRecord,
    evaluate_fn: EvaluateFn | None = None,
    max_weight: float,
) -> None:
    """`strategy.start(...)` with SecAgg+: the same rounds, ledger and evaluate_fn calls.

    max_weight must be at least the largest site's example count (a larger one costs
    precision: each site's weight is quantised as n / max_weight).
    """
    adapter = _LedgerStrategyAdapter(strategy, grid, initial_arrays, train_config, evaluate_fn)
    context = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=num_rounds, round_timeout=timeout), strategy=adapter)
    fit = SecAggPlusWorkflow(
        num_shares=NUM_SHARES,
        reconstruction_threshold=RECONSTRUCTION_THRESHOLD,
        max_weight=max_weight,
        clipping_range=CLIPPING_RANGE,
        timeout=timeout,
    )
    DefaultWorkflow(fit_workflow=fit)(grid, legacy)
