import math

import numpy as np
import pytest
from scipy.stats import beta

from fedgen.audits.empirical_eps import (
    clopper_pearson_upper,
    empirical_epsilon,
    empirical_epsilon_from_histograms,
    max_certifiable_epsilon,
    one_run_epsilon,
    one_run_p_value,
)
from fedgen.audits.mia import score_histogram
from fedgen.errors import FedgenError

DELTA = 1e-5
ALPHA = 0.05


def test_clopper_pearson_upper_matches_closed_forms():
    n = 40
    # 0 of n: solves (1 - p)^n = alpha / 2;  n of n: 1.
    upper = float(clopper_pearson_upper(0, n, alpha=ALPHA))
    assert upper == pytest.approx(1 - (ALPHA / 2) ** (1 / n))
    assert float(clopper_pearson_upper(n, n, alpha=ALPHA)) == 1.0
    # k of n: the binomial tail P[X <= k | p_ub] equals alpha / 2.
    p_ub = float(clopper_pearson_upper(7, n, alpha=ALPHA))
    tail = sum(math.comb(n, i) * p_ub**i * (1 - p_ub) ** (n - i) for i in range(8))
    assert tail == pytest.approx(ALPHA / 2)


def test_bound_is_zero_when_members_and_nonmembers_look_the_same():
    scores = np.arange(50.0)
    bound = empirical_epsilon(scores, scores.copy(), delta=DELTA)
    assert bound.eps_lb == 0.0
    assert bound.threshold is None


def _perfect_attack_bound(n: int) -> float:
    """ln((1 - CP_ub(0 of n) - δ) / CP_ub(0 of n)), CP from scipy's beta quantile."""
    upper = beta.ppf(1 - ALPHA / 2, 1, n)
    return math.log((1 - upper - DELTA) / upper)


@pytest.mark.parametrize("n", [10, 100, 1000])
def test_perfect_attack_reaches_the_closed_form(n):
    bound = empirical_epsilon(1000.0 + np.arange(n), np.arange(float(n)), delta=DELTA)
    assert bound.eps_lb == pytest.approx(_perfect_attack_bound(n), rel=1e-9)
    assert bound.eps_lb == pytest.approx(bound.max_certifiable, rel=1e-12)
    assert bound.threshold == 1000.0
    assert (bound.n_members, bound.n_nonmembers) == (n, n)


def test_certifiable_epsilon_grows_with_the_number_of_examples():
    caps = [max_certifiable_epsilon(n, n, delta=DELTA) for n in (10, 100, 1000, 10000)]
    print("max certifiable eps at n = 10, 100, 1000, 10000:", [round(c, 2) for c in caps])
    assert caps == sorted(caps) and caps[0] < caps[-1]
    assert caps[0] == pytest.approx(_perfect_attack_bound(10))


def _cp_upper(k: int, n: int) -> float:
    return 1.0 if k == n else beta.ppf(1 - ALPHA / 2, k + 1, n - k)


def _brute_force_bound(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """Every threshold, both forms, counted with plain comparisons."""
    best = 0.0
    for threshold in np.r_[members, nonmembers]:
        fp = int(np.sum(nonmembers >= threshold))
        fn = int(np.sum(members < threshold))
        fpr_ub = _cp_upper(fp, len(nonmembers))
        fnr_ub = _cp_upper(fn, len(members))
        for numerator, denominator in [(1 - fnr_ub - DELTA, fpr_ub), (1 - fpr_ub - DELTA, fnr_ub)]:
            if numerator > 0:
                best = max(best, math.log(numerator / denominator))
    return best


def test_bound_matches_a_brute_force_search_including_the_symmetric_form():
    rng = np.random.default_rng(0)
    # Every member scores high; half the non-members do too. FN = 0 makes the symmetric form
    # ln((1 - FPR_ub - δ) / FNR_ub) the larger one.
    members = rng.uniform(1.0, 2.0, 150)
    nonmembers = np.r_[rng.uniform(1.0, 2.0, 75), rng.uniform(-1.0, 0.0, 75)]
    bound = empirical_epsilon(members, nonmembers, delta=DELTA)
    assert bound.eps_lb == pytest.approx(_brute_force_bound(members, nonmembers), rel=1e-9)
    fnr_ub = 1 - bound.tpr_lb
    assert bound.eps_lb == pytest.approx(math.log((1 - bound.fpr_ub - DELTA) / fnr_ub), rel=1e-9)
    assert bound.eps_lb > math.log((bound.tpr_lb - DELTA) / bound.fpr_ub)


def test_histogram_bound_equals_exact_bound_when_each_bin_holds_one_score_value():
    rng = np.random.default_rng(1)
    members = rng.integers(3, 20, 300).astype(float)
    nonmembers = rng.integers(0, 15, 300).astype(float)
    edges = np.arange(-0.5, 20.5)  # one integer per bin
    pooled = empirical_epsilon_from_histograms(
        score_histogram(members, edges), score_histogram(nonmembers, edges), edges, delta=DELTA
    )
    exact = empirical_epsilon(members, nonmembers, delta=DELTA)
    assert exact.eps_lb > 0
    assert pooled.eps_lb == pytest.approx(exact.eps_lb, rel=1e-12)
    assert pooled.threshold == exact.threshold - 0.5
    assert pooled.to_dict()["n_members"] == 300


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"delta": 1.5}, "delta 1.5"), ({"delta": DELTA, "alpha": 0.0}, "alpha 0.0")],
)
def test_bad_parameters_are_user_errors(kwargs, message):
    with pytest.raises(FedgenError, match=message):
        empirical_epsilon(np.ones(3), np.zeros(3), **kwargs)


def test_no_members_is_a_user_error():
    with pytest.raises(FedgenError, match="0 members"):
        empirical_epsilon(np.array([]), np.zeros(3), delta=DELTA)


# --- one-run auditing (Steinke, Nasr & Jagielski 2023) ----------------------------------------


def test_one_run_bound_without_delta_is_the_binomial_closed_form():
    # All r guesses right, δ = 0: the p-value is q^r, so the bound solves q^r = alpha.
    q = 0.05 ** (1 / 20)
    assert one_run_epsilon(1000, 20, 20, delta=0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-9)


def test_one_run_p_value_adds_the_delta_term_on_constructed_counts():
    # ε = ln 3: q = 3/4. P[2 of 2 right] = 9/16; windows: P[B = 1] / 1 = 6/16, P[B <= 1] / 2 = 7/32.
    p = one_run_p_value(10, 2, 2, epsilon=math.log(3), delta=0.001)
    assert p == pytest.approx(9 / 16 + 2 * 10 * 0.001 * 6 / 16, abs=1e-12)


def test_one_run_bound_is_where_the_p_value_reaches_alpha_and_delta_costs():
    eps = one_run_epsilon(1000, 100, 90, delta=1e-5)
    assert one_run_p_value(1000, 100, 90, epsilon=eps, delta=1e-5) == pytest.approx(0.05, abs=1e-9)
    assert eps < one_run_epsilon(1000, 100, 90, delta=0.0)
    assert one_run_epsilon(10**6, 100, 90, delta=1e-5) < eps  # 2 m δ grows with the canaries


def test_one_run_bound_is_zero_for_guesses_at_chance():
    assert one_run_epsilon(1000, 100, 50, delta=1e-5) == 0.0


def test_one_run_counts_must_nest():
    with pytest.raises(FedgenError, match="0 <= right guesses <= guesses <= canaries"):
        one_run_epsilon(10, 20, 5, delta=0.0)
