"""DP-SGD privacy accounting: ε from a (σ, q, steps) history, σ from a target ε, δ, plans.

Opacus' own accountants, chosen by ``privacy.accountant``: "rdp" (Rényi DP over Opacus'
default orders) or "prv" (privacy random variables, Gopi et al. 2021: a numerical
composition whose upper bound on ε is tighter than RDP's, so the same ε needs less noise).
One choice is used everywhere in a run: to calibrate σ before it, by the site after each
round, and to recompute ε from the ledger. Entries use the layout of Opacus' accountant
``history``: ``(noise_multiplier, sample_rate, steps)``; σ = 0 marks a round trained without
DP, after which ε is infinite.

Sampling follows Opacus' ``make_private`` on a ``DataLoader(batch_size=b)``: the sample rate
is ``q = 1 / ceil(n / b)`` (equal to ``b / n`` when ``b`` divides ``n``, and 1 when ``b >= n``),
and its Poisson sampler takes ``int(1 / q)`` steps an epoch. :func:`planned_steps` reproduces
both exactly, so the ε planned before a run is the ε the accountant reports after it.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedgen.errors import FedgenError

__all__ = [
    "ACCOUNTANTS",
    "MAX_NOISE_MULTIPLIER",
    "HistoryEntry",
    "epsilon_from_history",
    "calibrate_noise_multiplier",
    "calibrate_composed",
    "default_delta",
    "check_delta",
    "planned_steps",
]

HistoryEntry = tuple[float, float, int]  # (noise_multiplier σ, sample_rate q, steps)

ACCOUNTANTS = {"rdp": RDPAccountant, "prv": PRVAccountant}

# Beyond this σ the signal drowns: a target that needs more is a configuration mistake.
MAX_NOISE_MULTIPLIER = 100.0
# Calibrated ε lands in [target·(1 − tolerance), target].
CALIBRATION_RELATIVE_TOLERANCE = 0.005
# δ defaults to a tenth of 1/records: below the "one record leaks for sure" level 1/n.
DEFAULT_DELTA_FRACTION = 0.1


def epsilon_from_history(history: Sequence[HistoryEntry], *, delta: float, accountant: str = "rdp") -> float:
    """ε of all entries composed by ``accountant``, at ``delta``; inf if any entry had no noise.

    PRV's ε is the upper end of its error bound, a guarantee like RDP's."""
    # Both accountants compose entries of one (σ, q) by their total steps, however many rounds.
    steps_by_mechanism: Counter[tuple[float, float]] = Counter()
    for sigma, q, steps in history:
        steps_by_mechanism[float(sigma), float(q)] += int(steps)
    if any(sigma == 0 and steps > 0 for (sigma, _), steps in steps_by_mechanism.items()):
        return math.inf
    if not any(steps_by_mechanism.values()):
        return 0.0
    mechanisms = tuple(sorted((sigma, q, steps) for (sigma, q), steps in steps_by_mechanism.items()))
    return _composed_epsilon(mechanisms, delta, accountant)


# Calibration asks for the same compositions again (every round, every modality of a site), and
# one RDP evaluation with Opacus' fractional orders costs ~0.2 s of CPU: remember them per process.
@functools.lru_cache(maxsize=4096)
def _composed_epsilon(mechanisms: tuple[HistoryEntry, ...], delta: float, accountant: str) -> float:
    account = ACCOUNTANTS[accountant]()
    account.history = list(mechanisms)
    with warnings.catch_warnings():
        # Large σ put the best RDP order at the end of the range: the bound holds, a bit loose.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(account.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=256)
def calibrate_noise_multiplier(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The smallest σ (within the tolerance) whose ε after ``steps`` steps is at most the target."""
    assert math.isfinite(target_epsilon) and target_epsilon > 0, target_epsilon
    _check_reachable(target_epsilon, delta, [(sample_rate, steps)], accountant)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=target_epsilon * CALIBRATION_RELATIVE_TOLERANCE,
            )
        )


def calibrate_composed(
    *,
    target_epsilon: float,
    delta: float,
    mechanisms: Mapping[str, tuple[float, float, int]],
    accountant: str = "rdp",
) -> dict[str, float]:
    """σ per mechanism so that all of them composed spend the target ε, in the given shares.

    ``mechanisms`` maps a name to (share, q, steps). Each σ is first calibrated alone to its
    share of the target; then all σ are scaled by one factor, found by bisection, so that the
    composition of every mechanism lands in [target·(1 − tolerance), target]. The shares fix
    the noise of one mechanism relative to another; the factor spends the whole target.
    """
    assert math.isfinite(target_epsilon) and target_epsilon > 0, target_epsilon
    if len(mechanisms) == 1:
        ((name, (_, q, steps)),) = mechanisms.items()
        sigma = calibrate_noise_multiplier(
            target_epsilon=target_epsilon, delta=delta, sample_rate=q, steps=steps, accountant=accountant
        )
        return {name: sigma}
    _check_reachable(target_epsilon, delta, [(q, steps) for _, q, steps in mechanisms.values()], accountant)
    total = sum(share for share, _, _ in mechanisms.values())
    alone = {
        name: calibrate_noise_multiplier(
            target_epsilon=target_epsilon * share / total,
            delta=delta,
            sample_rate=q,
            steps=steps,
            accountant=accountant,
        )
        for name, (share, q, steps) in mechanisms.items()
    }

    def composed(factor: float) -> float:
        history = [(alone[name] * factor, q, steps) for name, (_, q, steps) in mechanisms.items()]
        return epsilon_from_history(history, delta=delta, accountant=accountant)

    # ``low`` spends more than the target, ``high`` at most the target.
    high = 1.0
    while composed(high) > target_epsilon:
        high *= 2
    low = high / 2
    while composed(low) <= target_epsilon:
        low, high = low / 2, low
    while composed(high) < target_epsilon * (1 - CALIBRATION_RELATIVE_TOLERANCE):
        middle = (low + high) / 2
        if composed(middle) > target_epsilon:
            low = middle
        else:
            high = middle
    return {name: sigma * high for name, sigma in alone.items()}


def _check_reachable(
    target_epsilon: float, delta: float, sampling: Sequence[tuple[float, int]], accountant: str
) -> None:
    """A target that needs σ > MAX_NOISE_MULTIPLIER is a one-line configuration error."""
    history = [(MAX_NOISE_MULTIPLIER, q, steps) for q, steps in sampling]
    if epsilon_from_history(history, delta=delta, accountant=accountant) > target_epsilon:
        q, steps = sampling[0] if len(sampling) == 1 else (max(q for q, _ in sampling), sum(n for _, n in sampling))
        raise FedgenError(
            f"target ε={target_epsilon:g} at δ={delta:g} needs σ > {MAX_NOISE_MULTIPLIER:g} "
            f"for {steps} steps at q={q:g}; raise ε or reduce rounds/epochs"
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


def planned_steps(*, n_records: int, batch_size: int, epochs_per_round: int, rounds: int) -> tuple[float, int]:
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
