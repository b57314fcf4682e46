"""DP-SGD privacy accounting: ε from a (σ, q, steps) history, σ from a target ε, δ, plans.

Opacus' own accountants, chosen by ``privacy.accountant``: "rdp" (Rényi DP over Opacus'
default orders) or "prv" (privacy random variables, Gopi et al. 2021: a numerical
composition whose upper bound on ε is tighter than RDP's, so the same ε needs less noise).
RDP is Opacus' formula and conversion to ε, with its per-order sums and series computed by
numpy instead of Python loops of up to hundreds of terms per order (see :func:`rdp_per_step`).
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
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp
from scipy import special

from fedgen.errors import FedgenError

__all__ = [
    "ACCOUNTANTS",
    "MAX_NOISE_MULTIPLIER",
    "HistoryEntry",
    "epsilon_from_history",
    "calibrate_noise_multiplier",
    "calibrate_composed",
    "rdp_per_step",
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
RDP_ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS)
# Terms of the fractional-order series computed per numpy pass, until Opacus' stopping rule ends
# every order's series.
_SERIES_CHUNK = 256
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


# Calibration asks for the same compositions again (every round, every modality of a site):
# remember them per process.
@functools.lru_cache(maxsize=4096)
def _composed_epsilon(mechanisms: tuple[HistoryEntry, ...], delta: float, accountant: str) -> float:
    with warnings.catch_warnings():
        # Large σ put the best RDP order at the end of the range: the bound holds, a bit loose.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        if accountant == "rdp":
            rdp = sum(steps * rdp_per_step(sigma, q) for sigma, q, steps in mechanisms)
            epsilon, _ = opacus_rdp.get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
            return float(epsilon)
        account = ACCOUNTANTS[accountant]()
        account.history = list(mechanisms)
        return float(account.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=4096)
def rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one step of the sampled Gaussian mechanism at each of Opacus' RDP orders.

    Opacus' ``compute_rdp`` for ``steps=1``: its closed forms as they are, its sums for integer
    orders and its series for fractional ones (Mironov et al. 2019, section 3.3) with the same
    terms and the same stopping rule, summed by numpy for all orders at once. Opacus' Python
    loops cost up to ~1 s of CPU per (σ, q), and a site calibrates σ with dozens of them.
    """
    sigma, q = float(noise_multiplier), float(sample_rate)
    if not (0 < q < 1 and sigma > 0):  # Opacus' closed forms: q = 0 (0), σ = 0 (inf), q = 1 (α / 2σ²)
        curve = np.array([opacus_rdp._compute_rdp(q, sigma, order) for order in RDP_ORDERS], dtype=float)
    else:
        orders = np.array(RDP_ORDERS, dtype=float)
        integer = orders == np.floor(orders)
        curve = np.empty_like(orders)
        curve[integer] = _log_a_integer(q, sigma, orders[integer])
        curve[~integer] = _log_a_fractional(q, sigma, orders[~integer])
        curve /= orders - 1
    curve.flags.writeable = False  # shared by every caller of the cache
    return curve


def _log_a_integer(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """log A_α for integer orders: Opacus' ``_compute_log_a_for_int_alpha``, vectorised."""
    i = np.arange(alphas.max() + 1)[None, :]
    alpha = alphas[:, None]
    with np.errstate(divide="ignore"):  # binom(α, i) = 0 past i = α: those terms are left out
        log_terms = (
            np.log(special.binom(alpha, i))
            + i * math.log(q)
            + (alpha - i) * math.log(1 - q)
            + (i * i - i) / (2 * sigma**2)
        )
    return special.logsumexp(np.where(i <= alpha, log_terms, -np.inf), axis=1)


def _log_a_fractional(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """log A_α for fractional orders: Opacus' ``_compute_log_a_for_frac_alpha``, vectorised.

    Each order's terms i = 0, 1, ... run until the first whose two parts are both below e^-30
    (included), and are summed in log space with the sign of binom(α, i). Terms are computed a
    chunk at a time for the orders whose series has not ended yet.
    """
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    chunk_sums: list[np.ndarray] = []  # per chunk, [part, order]: log |sum of the chunk's terms|
    chunk_signs: list[np.ndarray] = []
    running = np.arange(len(alphas))
    start = 0
    while running.size:
        i = np.arange(start, start + _SERIES_CHUNK, dtype=float)[None, :]
        alpha = alphas[running, None]
        coef = special.binom(alpha, i)
        log_coef = np.log(np.abs(coef))
        j = alpha - i
        log_t0 = log_coef + i * math.log(q) + j * math.log(1 - q)
        log_t1 = log_coef + j * math.log(q) + i * math.log(1 - q)
        log_e0 = math.log(0.5) + opacus_rdp._log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + opacus_rdp._log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s = np.stack(
            [log_t0 + (i * i - i) / (2 * sigma**2) + log_e0, log_t1 + (j * j - j) / (2 * sigma**2) + log_e1]
        )
        small = np.maximum(log_s[0], log_s[1]) < -30
        ends = small.any(axis=1)
        last = np.where(ends, small.argmax(axis=1), _SERIES_CHUNK)[:, None]  # the first small term, included
        weights = np.broadcast_to(np.where(i - start <= last, np.sign(coef), 0.0), log_s.shape)
        sums, signs = np.full((2, len(alphas)), -np.inf), np.zeros((2, len(alphas)))
        with np.errstate(divide="ignore"):
            sums[:, running], signs[:, running] = special.logsumexp(log_s, axis=2, b=weights, return_sign=True)
        chunk_sums.append(sums)
        chunk_signs.append(signs)
        running = running[~ends]
        start += _SERIES_CHUNK
    with np.errstate(divide="ignore"):
        parts = special.logsumexp(np.stack(chunk_sums), axis=0, b=np.stack(chunk_signs))
    return np.logaddexp(parts[0], parts[1])


def _smallest_scale(epsilon_at: Callable[[float], float], target_epsilon: float) -> float:
    """The smallest x (within the tolerance) whose ε, decreasing in x, is at most the target:
    ε(x) lands in [target·(1 − tolerance), target]."""
    # ``low`` spends more than the target, ``high`` at most the target.
    high = 1.0
    while epsilon_at(high) > target_epsilon:
        high *= 2
    low = high / 2
    while epsilon_at(low) <= target_epsilon:
        low, high = low / 2, low
    while epsilon_at(high) < target_epsilon * (1 - CALIBRATION_RELATIVE_TOLERANCE):
        middle = (low + high) / 2
        if epsilon_at(middle) > target_epsilon:
            low = middle
        else:
            high = middle
    return high


@functools.lru_cache(maxsize=256)
def calibrate_noise_multiplier(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The smallest σ (within the tolerance) whose ε after ``steps`` steps is at most the target."""
    assert math.isfinite(target_epsilon) and target_epsilon > 0, target_epsilon
    _check_reachable(target_epsilon, delta, [(sample_rate, steps)], accountant)
    return _smallest_scale(
        lambda sigma: epsilon_from_history([(sigma, sample_rate, steps)], delta=delta, accountant=accountant),
        target_epsilon,
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

    factor = _smallest_scale(composed, target_epsilon)
    return {name: sigma * factor for name, sigma in alone.items()}


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
