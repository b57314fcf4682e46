"""DP-SGD privacy accounting: ε from a (σ, q, steps) history, σ from a target ε, δ, plans.

One accountant, Rényi DP over Opacus' default orders, used everywhere: by the site after each
round, by the server to check budgets from the ledger, and to calibrate σ before the run.
Entries use the layout of Opacus' ``RDPAccountant.history``: ``(noise_multiplier,
sample_rate, steps)``; σ = 0 marks a round trained without DP, after which ε is infinite.

Sampling follows Opacus' ``make_private`` on a ``DataLoader(batch_size=b)``: the sample rate
is ``q = 1 / ceil(n / b)`` (equal to ``b / n`` when ``b`` divides ``n``, and 1 when ``b >= n``),
and its Poisson sampler takes ``int(1 / q)`` steps an epoch. :func:`planned_steps` reproduces
both exactly, so the ε planned before a run is the ε the accountant reports after it.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Sequence

from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedgen.errors import FedgenError

__all__ = [
    "MAX_NOISE_MULTIPLIER",
    "HistoryEntry",
    "epsilon_from_history",
    "calibrate_noise_multiplier",
    "default_delta",
    "check_delta",
    "planned_steps",
]

HistoryEntry = tuple[float, float, int]  # (noise_multiplier σ, sample_rate q, steps)

# Beyond this σ the signal drowns: a target that needs more is a configuration mistake.
MAX_NOISE_MULTIPLIER = 100.0
# Calibrated ε lands in [target·(1 − tolerance), target].
CALIBRATION_RELATIVE_TOLERANCE = 0.005
# δ defaults to a tenth of 1/records: below the "one record leaks for sure" level 1/n.
DEFAULT_DELTA_FRACTION = 0.1


def epsilon_from_history(history: Sequence[HistoryEntry], *, delta: float) -> float:
    """ε of all entries composed (RDP), at ``delta``; inf if any entry had no noise."""
    # RDP is linear in steps: entries of one (σ, q) are summed once, however many rounds.
    steps_by_mechanism: Counter[tuple[float, float]] = Counter()
    for sigma, q, steps in history:
        steps_by_mechanism[float(sigma), float(q)] += int(steps)
    if any(sigma == 0 and steps > 0 for (sigma, _), steps in steps_by_mechanism.items()):
        return math.inf
    accountant = RDPAccountant()
    accountant.history = [(sigma, q, steps) for (sigma, q), steps in steps_by_mechanism.items()]
    return float(accountant.get_epsilon(delta=delta))


def calibrate_noise_multiplier(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int
) -> float:
    """The smallest σ (within the tolerance) whose ε after ``steps`` steps is at most the target."""
    assert math.isfinite(target_epsilon) and target_epsilon > 0, target_epsilon
    with warnings.catch_warnings():
        # Large trial σ put the best RDP order at the end of the range: harmless in a search.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        sigma_max_epsilon = epsilon_from_history(
            [(MAX_NOISE_MULTIPLIER, sample_rate, steps)], delta=delta
        )
        if sigma_max_epsilon > target_epsilon:
            raise FedgenError(
                f"target ε={target_epsilon:g} at δ={delta:g} needs σ > {MAX_NOISE_MULTIPLIER:g} "
                f"for {steps} steps at q={sample_rate:g}; raise ε or reduce rounds/epochs"
            )
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant="rdp",
                epsilon_tolerance=target_epsilon * CALIBRATION_RELATIVE_TOLERANCE,
            )
        )


def default_delta(n_records: int) -> float:
    """δ = 1 / (10 n): well below 1/n, the level at which leaking one whole record is allowed."""
    _check_records(n_records)
    return DEFAULT_DELTA_FRACTION / n_records


def check_delta(delta: float, n_records: int, *, site: str = "this site") -> None:
    """Refuse a δ outside (0, 1/n): δ ≥ 1/n allows leaking a whole record outright."""
    _check_records(n_records)
    if delta <= 0:
        raise FedgenError(f"δ={delta:g} must be positive for {site}")
    if delta >= 1 / n_records:
        raise FedgenError(f"δ={delta:g} must be below 1/records = {1 / n_records:g} for {site}")


def planned_steps(
    *, n_records: int, batch_size: int, epochs_per_round: int, rounds: int
) -> tuple[float, int]:
    """(sample rate q, total optimizer steps) of ``rounds`` rounds, exactly as Opacus samples."""
    _check_records(n_records)
    assert batch_size >= 1 and epochs_per_round >= 1 and rounds >= 1
    sample_rate = 1 / math.ceil(n_records / batch_size)
    return sample_rate, _steps_per_epoch(sample_rate) * epochs_per_round * rounds


def _steps_per_epoch(sample_rate: float) -> int:
    """Batches a Poisson epoch draws: Opacus' ``UniformWithReplacementSampler`` takes
    ``int(1 / q)``, which float rounding makes one short of ``1 / q`` for some q (e.g. 1/93)."""
    return int(1 / sample_rate)


def _check_records(n_records: int) -> None:
    if n_records < 1:
        raise FedgenError(f"a site needs at least one training record, got {n_records}")
