"""The gate's attack checks against what an attack within the policy reaches at the run's counts.

With few examples an attack that only guesses exceeds a policy's AUC limit by chance, and an
attack exactly at the TPR-at-1%-FPR limit measures far above it (the "1% FPR" threshold is one
or two held-out records); the gate then refuses only above that bound (its confidence shared by
all attack checks of the run) and says the sample was too small. A memorising model still fails.
"""

import math
from statistics import NormalDist

import numpy as np
import pytest

from fedgen.audits.gate import evaluate_gate, load_policy
from fedgen.audits.mia import allowed_false_positives, attack_metrics, chance_auc_bound, limit_tpr_bound
from fedgen.errors import FedgenError
from tests.test_gate import default_policy_text, example_report

# The demo run's pooled counts (BENCHMARKS.md, Audit): training and held-out records per attack.
DEMO_COUNTS = {
    "image": {"loss": (720, 180), "pia": (720, 180)},
    "text": {"loss": (480, 123), "zlib": (480, 123), "min_k": (480, 123)},
}
# What the demo's attacks measured (auc, tpr at 1% FPR): a gate holding them to the limits alone
# refused the text TPRs; min-k's 0.092 was 0.013 against 1,200 fresh notes (BENCHMARKS.md, Audit).
DEMO_MEASURED = {
    "image": {"loss": (0.509, 0.0042), "pia": (0.502, 0.0194)},
    "text": {"loss": (0.523, 0.0375), "zlib": (0.505, 0.0063), "min_k": (0.530, 0.0917)},
}
# Equal-variance binormal attacks (concave ROCs): members N(shift, 1), non-members N(0, 1).
AT_LIMIT_SHIFT = NormalDist().inv_cdf(0.99) + NormalDist().inv_cdf(0.03)  # TPR 0.03 at 1% FPR


@pytest.fixture(scope="module")
def policy():
    return load_policy()


def report_with(attacks: dict[str, dict[str, dict]]) -> dict:
    """The passing example report with these pooled attack summaries instead of its own."""
    report = example_report()
    for modality, summaries in attacks.items():
        report["membership"][modality] = {
            "attacks": {name: {"pooled": summary, "sites": {}} for name, summary in summaries.items()},
            "empirical_epsilon": {name: {"eps_lb": 0.0} for name in summaries},
        }
    return report


def summary(auc: float, tpr: float, n_members: int, n_nonmembers: int) -> dict:
    return {
        "auc": auc,
        "tpr_at_1pct_fpr": tpr,
        "tpr_at_01pct_fpr": None,
        "n_members": n_members,
        "n_nonmembers": n_nonmembers,
    }


def demo_report(measured: dict) -> dict:
    return report_with({
        modality: {name: summary(*measured[modality][name], *counts) for name, counts in attacks.items()}
        for modality, attacks in DEMO_COUNTS.items()
    })  # fmt: skip


def membership_checks(decision: dict) -> dict[str, dict]:
    return {
        c["name"]: c for c in decision["checks"] if c["name"].startswith("membership") and "empirical" not in c["name"]
    }


# --- the bounds -----------------------------------------------------------------------------------


def brute_force_tpr_bound(n_members: int, n_nonmembers: int, k: int, confidence: float) -> float:
    """What an attack that only guesses reaches: members ranked above the (k+1)-th non-member in
    a uniformly random order, P(X = m) = C(m + k, k) C(n_members - m + n_nonmembers - k - 1,
    n_nonmembers - k - 1) / C(n, n_nonmembers)."""
    total = math.comb(n_members + n_nonmembers, n_nonmembers)
    cumulative = 0
    for m in range(n_members + 1):
        cumulative += math.comb(m + k, k) * math.comb(n_members - m + n_nonmembers - k - 1, n_nonmembers - k - 1)
        if cumulative >= confidence * total:
            return m / n_members
    raise AssertionError("the probabilities do not sum to 1")


@pytest.mark.parametrize(("n_members", "n_nonmembers"), [(100, 100), (480, 123), (60, 250)])
def test_at_a_limit_of_one_percent_the_tpr_bound_is_what_guessing_reaches(n_members, n_nonmembers):
    k = allowed_false_positives(n_nonmembers, 0.01)
    assert k == math.floor(0.01 * n_nonmembers)
    for confidence in (0.5, 0.95, 0.995):
        guessing = brute_force_tpr_bound(n_members, n_nonmembers, k, confidence)
        bound = limit_tpr_bound(n_members, n_nonmembers, level=0.01, limit=0.01, confidence=confidence)
        assert guessing <= bound <= guessing + 1 / n_members


def binormal_tpr(shift: float, n_members: int, n_nonmembers: int, rng) -> float:
    return attack_metrics(rng.normal(shift, size=n_members), rng.normal(size=n_nonmembers)).tpr_at_1pct_fpr


def test_an_attack_at_the_limit_stays_within_the_tpr_bound_at_the_demo_counts():
    rng = np.random.default_rng(0)
    measured = np.array([binormal_tpr(AT_LIMIT_SHIFT, 480, 123, rng) for _ in range(400)])
    bound = limit_tpr_bound(480, 123, level=0.01, limit=0.03, confidence=0.95)
    assert bound == pytest.approx(0.1167, abs=1e-4)
    assert np.mean(measured <= bound) >= 0.95
    # At the demo's 99.5% per figure: held to the limit, or to what guessing reaches, many such
    # audits would refuse an attack the policy allows; held to the limit's bound, none.
    strict = limit_tpr_bound(480, 123, level=0.01, limit=0.03, confidence=0.995)
    assert np.mean(measured > 0.03) > 0.6 and np.mean(measured > brute_force_tpr_bound(480, 123, 1, 0.995)) > 0.2
    assert np.mean(measured > strict) == 0.0


def test_the_tpr_bound_shrinks_to_the_limit_as_records_grow():
    bounds = [limit_tpr_bound(n, n, level=0.01, limit=0.03, confidence=0.995) for n in (123, 1000, 10_000, 100_000)]
    assert bounds == sorted(bounds, reverse=True)
    assert 0.03 < bounds[-1] < 0.034
    assert limit_tpr_bound(480, 123, level=0.01, limit=0.0, confidence=0.995) == 0.0


def test_chance_auc_bound_is_the_mann_whitney_normal_quantile():
    expected = 0.5 + NormalDist().inv_cdf(0.95) * math.sqrt((25 + 25 + 1) / (12 * 25 * 25))
    assert chance_auc_bound(25, 25, confidence=0.95) == pytest.approx(expected, rel=1e-12)
    assert chance_auc_bound(25, 25, confidence=0.95) == pytest.approx(0.63564, abs=1e-5)


# --- the gate -------------------------------------------------------------------------------------


def test_the_demo_runs_attacks_pass_and_say_the_sample_was_small(policy):
    checks = membership_checks(evaluate_gate(demo_report(DEMO_MEASURED), policy))
    assert len(checks) == 10 and all(c["passed"] for c in checks.values())
    # Ten attack figures share 95%: each is held at 99.5%.
    min_k = checks["membership.text.min_k.tpr_at_1pct_fpr"]
    assert min_k["chance_confidence"] == pytest.approx(0.995)
    assert min_k["threshold"] == 0.03 and min_k["bound_source"] == "chance"
    assert (
        min_k["bound"] == min_k["chance_bound"] == limit_tpr_bound(480, 123, level=0.01, limit=0.03, confidence=0.995)
    )
    assert "an attack exactly at the limit 0.03 reaches up to 0.1812" in min_k["detail"]
    assert "too small to show the attack stays within 0.03" in min_k["detail"]
    # The AUC's chance bound (0.562 at 720 and 180 images) is under the policy's 0.6, which applies.
    auc = checks["membership.image.loss.auc"]
    assert auc["bound_source"] == "policy" and auc["bound"] == 0.6
    assert auc["chance_bound"] == pytest.approx(chance_auc_bound(720, 180, confidence=0.995))


def test_a_memorising_model_still_fails_at_the_demo_counts(policy):
    strong = {m: {name: (0.9, 0.3) for name in attacks} for m, attacks in DEMO_COUNTS.items()}
    checks = membership_checks(evaluate_gate(demo_report(strong), policy))
    assert not any(c["passed"] for c in checks.values())
    assert checks["membership.text.loss.auc"]["detail"].startswith("loss attack AUC = 0.9 (must be ≤ 0.6")


def test_with_many_examples_the_policy_limit_decides(policy):
    # One attack per modality, two figures each: each held at 98.75%. With 100,000 records per
    # side an attack at the limit measures within a few thousandths of it.
    n = 100_000
    for tpr, passed in ((0.029, True), (0.031, True), (0.04, False)):
        checks = membership_checks(
            evaluate_gate(
                report_with({"image": {"loss": summary(0.55, tpr, n, n)}, "text": {"loss": summary(0.55, 0.01, n, n)}}),
                policy,
            )
        )
        check = checks["membership.image.loss.tpr_at_1pct_fpr"]
        assert check["passed"] is passed and check["threshold"] == 0.03
        assert check["chance_confidence"] == pytest.approx(1 - 0.05 / 4)
        assert 0.03 < check["bound"] == limit_tpr_bound(n, n, level=0.01, limit=0.03, confidence=1 - 0.05 / 4) < 0.034


def test_a_leak_beyond_the_limit_is_refused_with_a_thousand_held_out_records(policy):
    rng = np.random.default_rng(2)
    leaking = NormalDist().inv_cdf(0.99) + NormalDist().inv_cdf(0.2)  # TPR 0.2 at 1% FPR
    refused = 0
    for _ in range(20):
        result = attack_metrics(rng.normal(leaking, size=4000), rng.normal(size=1000)).to_dict()
        result["auc"] = 0.55  # the TPR check alone
        checks = membership_checks(
            evaluate_gate(
                report_with({"image": {"loss": result}, "text": {"loss": summary(0.5, 0.01, 1000, 1000)}}), policy
            )
        )
        refused += not checks["membership.image.loss.tpr_at_1pct_fpr"]["passed"]
    assert refused == 20


def test_guessing_models_are_rarely_refused_at_the_demo_counts(policy):
    """The whole family of attack checks refuses a model that leaks nothing in about 5% of
    audits or fewer; holding each figure to the policy limits alone refused about a third."""
    rng = np.random.default_rng(1)
    refused = refused_by_limits_alone = 0
    trials = 100
    for _ in range(trials):
        measured = {
            m: {name: attack_metrics(rng.normal(size=n_in), rng.normal(size=n_out)) for name, (n_in, n_out) in attacks.items()}
            for m, attacks in DEMO_COUNTS.items()
        }  # fmt: skip
        report = report_with({m: {name: r.to_dict() for name, r in a.items()} for m, a in measured.items()})
        refused += not all(c["passed"] for c in membership_checks(evaluate_gate(report, policy)).values())
        refused_by_limits_alone += any(
            r.auc > 0.6 or r.tpr_at_1pct_fpr > 0.03 for a in measured.values() for r in a.values()
        )
    assert refused / trials <= 0.06
    assert refused_by_limits_alone / trials >= 0.2


def test_chance_confidence_is_optional_and_checked(tmp_path):
    without = tmp_path / "without.toml"
    without.write_text(default_policy_text().replace("chance_confidence = 0.95\n", ""))
    assert load_policy(without).membership.chance_confidence == 0.95
    bad = tmp_path / "bad.toml"
    bad.write_text(default_policy_text().replace("chance_confidence = 0.95", "chance_confidence = 1.5"))
    with pytest.raises(FedgenError, match="membership.chance_confidence = 1.5"):
        load_policy(bad)


def test_the_report_says_which_limit_applied(tmp_path, policy):
    from fedgen.audits.report import render_html

    report = demo_report(DEMO_MEASURED)
    report["gate"] = evaluate_gate(report, policy)
    html = render_html(report, run_root=tmp_path)
    assert "0.181 (an attack within the policy&#39;s 0.03 reaches this with so few examples)" in html
    assert "0.6 (policy)" in html
    assert "Few examples prove little" in html
