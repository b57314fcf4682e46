"""Empirical lower bound on ε from a membership attack (Jagielski et al. 2020).

"Auditing Differentially Private Machine Learning: How Private is Private SGD?" (NeurIPS 2020).
An (ε, δ)-DP training run forces every membership test to satisfy
TPR <= e^ε FPR + δ and 1 - FPR <= e^ε FNR + δ. For a threshold on the attack score with FP
false positives of N_out non-members and FN false negatives of N_in members, Clopper–Pearson
bounds give, with confidence 1 - alpha,

    FPR <= FPR_ub = CP_upper(FP, N_out),   TPR >= TPR_lb = 1 - FNR_ub,   FNR_ub = CP_upper(FN, N_in),

so ε >= max(ln((TPR_lb - δ) / FPR_ub), ln((1 - FPR_ub - δ) / FNR_ub)). The bound is the
maximum over thresholds, clipped at 0.

CP_upper is the upper end of the two-sided 1 - alpha Clopper–Pearson interval (alpha/2 in each
tail), as in the authors' code (statsmodels ``proportion_confint(method="beta")``); with one
FPR and one FNR bound, both hold together with probability >= 1 - alpha. Like the paper, the
maximum over thresholds is not corrected for multiple testing: choose the threshold on separate
data for a strict guarantee.

The number of examples caps the bound: even a perfect attack (no errors) certifies only
``max_certifiable_epsilon(N_in, N_out)``. A small bound with few examples says little.

One-run auditing (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training
Run", NeurIPS 2023) is the option ``one_run_epsilon``: m canaries are each put in the training
data with probability 1/2, independently; after the one training run the auditor guesses in or
out for r of them (abstaining on the rest) and v guesses are right. Under (ε, δ)-DP,

    P[v or more right] <= P[Binomial(r, q) >= v] + 2 m δ · max_{1<=i<=v} P[v - i <= Binomial(r, q) < v] / i,

with q = e^ε / (1 + e^ε) (their Theorem 3.1 and the p-value in their appendix code). The bound
is the ε at which that p-value reaches beta: smaller ε would have made v right guesses less
likely than beta.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit
from scipy.stats import beta, binom

from fedgen.errors import FedgenError

__all__ = [
    "EpsilonLowerBound",
    "clopper_pearson_upper",
    "empirical_epsilon",
    "empirical_epsilon_from_histograms",
    "empirical_epsilon_from_counts",
    "max_certifiable_epsilon",
    "one_run_p_value",
    "one_run_epsilon",
]

DEFAULT_ALPHA = 0.05


@dataclass(frozen=True)
class EpsilonLowerBound:
    """ε certified by an attack at confidence 1 - alpha, and the counts behind it.

    ``threshold``: the attack guesses "member" when score >= threshold (None when no threshold
    gives a positive bound). ``tpr_lb`` / ``fpr_ub`` are the confidence bounds at that threshold.
    ``max_certifiable`` is the bound a perfect attack would reach with the same counts.
    """

    eps_lb: float
    threshold: float | None
    tpr_lb: float
    fpr_ub: float
    n_members: int
    n_nonmembers: int
    delta: float
    alpha: float
    max_certifiable: float

    def to_dict(self) -> dict:
        return asdict(self)


def clopper_pearson_upper(k: np.ndarray | int, n: int, *, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """Upper end of the two-sided 1 - alpha Clopper–Pearson interval for k successes of n."""
    k = np.asarray(k)
    # beta.ppf(q, k + 1, 0) is undefined; the bound for k == n is 1.
    upper = beta.ppf(1 - alpha / 2, k + 1, np.maximum(n - k, 1))
    return np.where(k >= n, 1.0, upper)


def _check_parameters(n_members: int, n_nonmembers: int, delta: float, alpha: float) -> None:
    if n_members == 0 or n_nonmembers == 0:
        raise FedgenError(
            f"empirical epsilon needs members and non-members, got {n_members} members and {n_nonmembers} non-members"
        )
    if not 0.0 <= delta < 1.0:
        raise FedgenError(f"delta {delta} is not in [0, 1)")
    if not 0.0 < alpha < 1.0:
        raise FedgenError(f"confidence alpha {alpha} is not in (0, 1)")


def _log_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """ln(numerator / denominator), -inf where the numerator is not positive."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(numerator > 0, np.log(np.maximum(numerator, 0.0) / denominator), -np.inf)


def _epsilon_at(
    false_negatives: np.ndarray | int,
    false_positives: np.ndarray | int,
    n_members: int,
    n_nonmembers: int,
    *,
    delta: float,
    alpha: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ε bound, TPR_lb, FPR_ub) at each threshold, before clipping at 0."""
    fpr_ub = clopper_pearson_upper(false_positives, n_nonmembers, alpha=alpha)
    fnr_ub = clopper_pearson_upper(false_negatives, n_members, alpha=alpha)
    tpr_lb = 1.0 - fnr_ub
    eps = np.maximum(_log_ratio(tpr_lb - delta, fpr_ub), _log_ratio(1.0 - fpr_ub - delta, fnr_ub))
    return eps, tpr_lb, fpr_ub


def max_certifiable_epsilon(n_members: int, n_nonmembers: int, *, delta: float, alpha: float = DEFAULT_ALPHA) -> float:
    """The bound of a perfect attack (no errors): no attack can show more with these counts."""
    _check_parameters(n_members, n_nonmembers, delta, alpha)
    eps, _, _ = _epsilon_at(0, 0, n_members, n_nonmembers, delta=delta, alpha=alpha)
    return max(float(eps), 0.0)


def _bound_from_counts(
    false_negatives: np.ndarray,
    false_positives: np.ndarray,
    thresholds: np.ndarray,
    n_members: int,
    n_nonmembers: int,
    *,
    delta: float,
    alpha: float,
) -> EpsilonLowerBound:
    """The bound maximised over thresholds, given the error counts at each one."""
    _check_parameters(n_members, n_nonmembers, delta, alpha)
    eps, tpr_lb, fpr_ub = _epsilon_at(
        false_negatives, false_positives, n_members, n_nonmembers, delta=delta, alpha=alpha
    )
    best = int(np.argmax(eps))
    certified = eps[best] > 0
    return EpsilonLowerBound(
        eps_lb=float(eps[best]) if certified else 0.0,
        threshold=float(thresholds[best]) if certified else None,
        tpr_lb=float(tpr_lb[best]),
        fpr_ub=float(fpr_ub[best]),
        n_members=n_members,
        n_nonmembers=n_nonmembers,
        delta=delta,
        alpha=alpha,
        max_certifiable=max_certifiable_epsilon(n_members, n_nonmembers, delta=delta, alpha=alpha),
    )


def empirical_epsilon(
    member_scores: np.ndarray,
    nonmember_scores: np.ndarray,
    *,
    delta: float,
    alpha: float = DEFAULT_ALPHA,
) -> EpsilonLowerBound:
    """ε lower bound from per-example attack scores (higher = member), over every threshold."""
    members = np.sort(np.asarray(member_scores, dtype=np.float64))
    nonmembers = np.sort(np.asarray(nonmember_scores, dtype=np.float64))
    assert np.isfinite(members).all() and np.isfinite(nonmembers).all(), "scores contain NaN or inf"
    thresholds = np.unique(np.r_[members, nonmembers])
    false_negatives = np.searchsorted(members, thresholds, side="left")
    false_positives = len(nonmembers) - np.searchsorted(nonmembers, thresholds, side="left")
    return _bound_from_counts(
        false_negatives,
        false_positives,
        thresholds,
        len(members),
        len(nonmembers),
        delta=delta,
        alpha=alpha,
    )


def empirical_epsilon_from_histograms(
    member_counts: np.ndarray,
    nonmember_counts: np.ndarray,
    edges: np.ndarray,
    *,
    delta: float,
    alpha: float = DEFAULT_ALPHA,
) -> EpsilonLowerBound:
    """ε lower bound from (pooled) score histograms (``audits.mia.score_histogram``).

    Thresholds are the bins' lower edges: "member" means "in this bin or a higher one".
    """
    member_counts = np.asarray(member_counts, dtype=np.int64)
    nonmember_counts = np.asarray(nonmember_counts, dtype=np.int64)
    assert member_counts.shape == nonmember_counts.shape == (len(edges) - 1,), "counts must have one entry per bin"
    n_members, n_nonmembers = int(member_counts.sum()), int(nonmember_counts.sum())
    members_at_or_above = np.cumsum(member_counts[::-1])[::-1]
    nonmembers_at_or_above = np.cumsum(nonmember_counts[::-1])[::-1]
    return empirical_epsilon_from_counts(
        members_at_or_above,
        nonmembers_at_or_above,
        np.asarray(edges[:-1], dtype=np.float64),
        n_members=n_members,
        n_nonmembers=n_nonmembers,
        delta=delta,
        alpha=alpha,
    )


def empirical_epsilon_from_counts(
    members_at_or_above: np.ndarray,
    nonmembers_at_or_above: np.ndarray,
    thresholds: np.ndarray,
    *,
    n_members: int,
    n_nonmembers: int,
    delta: float,
    alpha: float = DEFAULT_ALPHA,
) -> EpsilonLowerBound:
    """ε lower bound from the members and non-members a threshold accuses, per threshold.

    The bound stays valid when the counts are bounds themselves: fewer members and more
    non-members than the threshold accuses (fedgen.audits.pooling, sites' own bins).
    """
    members_at_or_above = np.asarray(members_at_or_above, dtype=np.int64)
    return _bound_from_counts(
        n_members - members_at_or_above,
        np.asarray(nonmembers_at_or_above, dtype=np.int64),
        thresholds,
        n_members,
        n_nonmembers,
        delta=delta,
        alpha=alpha,
    )


# --- one-run auditing (Steinke, Nasr & Jagielski 2023) ----------------------------------------

MAX_ONE_RUN_EPSILON = 100.0  # beyond this the guesses' p-value is 1 for any count of canaries


def _check_guesses(m: int, r: int, v: int, delta: float) -> None:
    if not 0 <= v <= r <= m:
        raise FedgenError(f"one-run audit needs 0 <= right guesses <= guesses <= canaries, got {v}, {r}, {m}")
    if not 0.0 <= delta < 1.0:
        raise FedgenError(f"delta {delta} is not in [0, 1)")


def one_run_p_value(m: int, r: int, v: int, *, epsilon: float, delta: float) -> float:
    """The largest probability (ε, δ)-DP training allows of v or more right guesses out of r."""
    _check_guesses(m, r, v, delta)
    if v == 0:
        return 1.0
    q = float(expit(epsilon))
    tail = float(binom.sf(v - 1, r, q))
    widths = np.arange(1, v + 1)
    window = np.cumsum(binom.pmf(v - widths, r, q))  # P[v - i <= Binomial(r, q) < v], i = 1..v
    return min(tail + 2 * m * delta * float(np.max(window / widths)), 1.0)


def one_run_epsilon(m: int, r: int, v: int, *, delta: float, alpha: float = DEFAULT_ALPHA) -> float:
    """ε lower bound at confidence 1 - alpha from one run: m canaries, r guesses, v right.

    0 when the guesses are no better than (0, δ)-DP allows at that confidence.
    """
    _check_guesses(m, r, v, delta)
    if not 0.0 < alpha < 1.0:
        raise FedgenError(f"confidence alpha {alpha} is not in (0, 1)")

    def excess(epsilon: float) -> float:
        return one_run_p_value(m, r, v, epsilon=epsilon, delta=delta) - alpha

    if excess(0.0) >= 0:
        return 0.0
    if excess(MAX_ONE_RUN_EPSILON) < 0:
        return MAX_ONE_RUN_EPSILON
    return float(brentq(excess, 0.0, MAX_ONE_RUN_EPSILON, xtol=1e-12))
