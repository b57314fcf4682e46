"""The gate's attack checks against what guessing achieves at the run's counts.

With few examples an attack that only guesses exceeds a policy's AUC or TPR-at-1%-FPR limit by
chance; the gate then refuses only above the chance bound (shared by all attack checks of the
run) and says the sample was too small. A memorising model still fails.
"""

import math
from statistics import NormalDist

import numpy as np
import pytest

from fedgen.audits.gate import evaluate_gate, load_policy
from fedgen.audits.mia import allowed_false_positives, attack_metrics, chance_auc_bound, chance_tpr_bound
from fedgen.errors import FedgenError
from tests.test_gate import default_policy_text, example_report

# The demo run's pooled counts (BENCHMARKS.md, Audit): training and held-out records per attack.
DEMO_COUNTS = {
    "image": {"loss": (720, 180), "pia": (720, 180)},
    "text": {"loss": (480, 123), "zlib": (480, 123), "min_k": (480, 123)},
}
# What the demo's attacks measured (auc, tpr at 1% FPR): the old gate refused the two text TPRs.
DEMO_MEASURED = {
    "image": {"loss": (0.509, 0.0042), "pia": (0.502, 0.0194)},
    "text": {"loss": (0.516, 0.0354), "zlib": (0.484, 0.0229), "min_k": (0.521, 0.0438)},
}


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
    return {"auc": auc, "tpr_at_1pct_fpr": tpr, "tpr_at_01pct_fpr": None, "n_members": n_members, "n_nonmembers": n_nonmembers}


def demo_report(measured: dict) -> dict:
    return report_with({
        modality: {name: summary(*measured[modality][name], *counts) for name, counts in attacks.items()}
        for modality, attacks in DEMO_COUNTS.items()
    })  # fmt: skip


def membership_checks(decision: dict) -> dict[str, dict]:
    return {c["name"]: c for c in decision["checks"] if c["name"].startswith("membership") and "empirical" not in c["name"]}


# --- the chance bounds, exactly -------------------------------------------------------------------


def brute_force_tpr_bound(n_members: int, n_nonmembers: int, k: int, confidence: float) -> float:
    """Members ranked above the (k+1)-th non-member in a uniformly random order: P(X = m) =
    C(m + k, k) C(n_members - m + n_nonmembers - k - 1, n_nonmembers - k - 1) / C(n, n_nonmembers)."""
    total = math.comb(n_members + n_nonmembers, n_nonmembers)
    cumulative = 0
    for m in range(n_members + 1):
        cumulative += math.comb(m + k, k) * math.comb(n_members - m + n_nonmembers - k - 1, n_nonmembers - k - 1)
        if cumulative >= confidence * total:
            return m / n_members
    raise AssertionError("the probabilities do not sum to 1")


def test_chance_tpr_bound_on_hand_counted_orders():
    # 2 members, 1 non-member, FPR <= 50% accuses nobody: the non-member is first, second or
    # third in a random order, so 0, 1 or 2 members rank above it, each with probability 1/3.
    assert allowed_false_positives(1, 0.5) == 0
    assert chance_tpr_bound(2, 1, level=0.5, confidence=0.3) == 0.0
    assert chance_tpr_bound(2, 1, level=0.5, confidence=0.5) == 0.5
    assert chance_tpr_bound(2, 1, level=0.5, confidence=0.9) == 1.0


@pytest.mark.parametrize(("n_members", "n_nonmembers"), [(100, 100), (480, 123), (60, 250)])
def test_chance_tpr_bound_is_the_negative_hypergeometric_quantile(n_members, n_nonmembers):
    k = allowed_false_positives(n_nonmembers, 0.01)
    assert k == math.floor(0.01 * n_nonmembers)
    for confidence in (0.5, 0.95, 0.995):
        expected = brute_force_tpr_bound(n_members, n_nonmembers, k, confidence)
        assert chance_tpr_bound(n_members, n_nonmembers, level=0.01, confidence=confidence) == expected


def test_chance_tpr_bound_holds_for_guessing_attacks():
    rng = np.random.default_rng(0)
    measured = [attack_metrics(rng.random(480), rng.random(123)).tpr_at_1pct_fpr for _ in range(400)]
    bound = chance_tpr_bound(480, 123, level=0.01, confidence=0.95)
    assert bound == 20 / 480  # 1% of 123 is one record: guessing finds up to 20 of 480
    assert 0.93 <= np.mean(np.array(measured) <= bound) <= 0.99


def test_chance_auc_bound_is_the_mann_whitney_normal_quantile():
    expected = 0.5 + NormalDist().inv_cdf(0.95) * math.sqrt((25 + 25 + 1) / (12 * 25 * 25))
    assert chance_auc_bound(25, 25, confidence=0.95) == pytest.approx(expected, rel=1e-12)
    assert chance_auc_bound(25, 25, confidence=0.95) == pytest.approx(0.63564, abs=1e-5)


# --- the gate -------------------------------------------------------------------------------------


def test_the_demo_runs_guessing_attacks_pass_and_say_the_sample_was_small(policy):
    checks = membership_checks(evaluate_gate(demo_report(DEMO_MEASURED), policy))
    assert len(checks) == 10 and all(c["passed"] for c in checks.values())
    # Ten attack figures share 95%: each is held at 99.5%.
    min_k = checks["membership.text.min_k.tpr_at_1pct_fpr"]
    assert min_k["chance_confidence"] == pytest.approx(0.995)
    assert min_k["threshold"] == 0.03 and min_k["bound_source"] == "chance"
    assert min_k["bound"] == min_k["chance_bound"] == 31 / 480
    assert "too small to show the attack stays within 0.03" in min_k["detail"]
    # 180 held-out images resolve 1% (one record) but no better: the TPR limit is chance-bound too,
    # while the AUC's chance bound (0.562) is under the policy's 0.6, which applies.
    auc = checks["membership.image.loss.auc"]
    assert auc["bound_source"] == "policy" and auc["bound"] == 0.6
    assert auc["chance_bound"] == pytest.approx(chance_auc_bound(720, 180, confidence=0.995))


def test_a_memorising_model_still_fails_at_the_demo_counts(policy):
    strong = {m: {name: (0.9, 0.3) for name in attacks} for m, attacks in DEMO_COUNTS.items()}
    checks = membership_checks(evaluate_gate(demo_report(strong), policy))
    assert not any(c["passed"] for c in checks.values())
    assert checks["membership.text.loss.auc"]["detail"].startswith("loss attack AUC = 0.9 (must be ≤ 0.6")


def test_with_many_examples_the_policy_limit_decides(policy):
    # One attack, two figures: each held at 97.5%. With 1000 held-out records guessing stays
    # below 3% at 1% FPR, so the policy's 0.03 decides to the third decimal.
    for tpr, passed in ((0.029, True), (0.031, False)):
        checks = membership_checks(evaluate_gate(report_with({"image": {"loss": summary(0.55, tpr, 1000, 1000)}, "text": {"loss": summary(0.55, 0.01, 1000, 1000)}}), policy))
        check = checks["membership.image.loss.tpr_at_1pct_fpr"]
        assert check["passed"] is passed and check["bound_source"] == "policy" and check["bound"] == 0.03
        assert check["chance_confidence"] == pytest.approx(1 - 0.05 / 4)
        assert check["chance_bound"] == chance_tpr_bound(1000, 1000, level=0.01, confidence=1 - 0.05 / 4) < 0.03


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
        refused_by_limits_alone += any(r.auc > 0.6 or r.tpr_at_1pct_fpr > 0.03 for a in measured.values() for r in a.values())
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
    assert "0.0646 (guessing reaches this; too few examples for the policy&#39;s 0.03)" in html
    assert "0.6 (policy)" in html
    assert "Few examples prove little" in html
