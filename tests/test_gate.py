"""The release gate: a policy applied to an audit report, nothing passing by being absent."""

import copy
import math

import pytest

from fedgen.audits.gate import DEFAULT_POLICY, evaluate_gate, load_policy, record_decision
from fedgen.errors import FedgenError

SITES = ["site-1", "site-2"]


def _attack(auc: float, tpr: float, n: int) -> dict:
    return {"auc": auc, "tpr_at_1pct_fpr": tpr, "tpr_at_01pct_fpr": None, "n_members": n, "n_nonmembers": n}


def _roc(lift: float) -> dict:
    fpr = [i / 20 for i in range(21)]
    return {"fpr": fpr, "tpr": [min(1.0, f + lift * f * (1 - f)) for f in fpr]}


def example_report(*, modalities=("image", "text")) -> dict:
    """An audit report of a DP run on two sites that meets the default policy (schema of
    /tmp/report_schema.md)."""
    report = {
        "run": {
            "id": "demo-run",
            "root": "/runs/demo-run",
            "modalities": list(modalities),
            "config": {"modality": "both", "privacy": {"epsilon": 10.0, "delta": None}},
            "versions": {"fedgen": "0.1.0", "torch": "2.13.0", "opacus": "1.6.0"},
            "dp": True,
            "generated_at": "2025-01-01T00:00:00+00:00",
        },
        "privacy": {"sites": {}, "epsilon_max": 8.5},
        "membership": {},
        "fidelity": {},
        "utility": {},
        "synthetic": {"images_dir": None, "contact_sheet": None, "texts": None, "n_images": 0, "n_texts": 0},
    }
    for i, site in enumerate(SITES):
        report["privacy"]["sites"][site] = {
            "epsilon": 8.5 - i,
            "budget": 10.0,
            "delta": 1e-4,
            "composition": "same people",
            "modalities": {
                m: {
                    "epsilon": 6.0 - i,
                    "noise_multiplier": 1.1,
                    "rounds": [
                        {"round": r, "epsilon": (6.0 - i) * r / 3, "site_epsilon": (8.5 - i) * r / 3} for r in (1, 2, 3)
                    ],
                }
                for m in modalities
            },
        }
    for m in modalities:
        report["membership"][m] = {
            "attacks": {
                "loss": {
                    "pooled": _attack(0.52, 0.012, 180) | {"roc": _roc(0.1)},
                    "sites": {site: _attack(0.53, 0.0, 90) for site in SITES},
                }
            },
            "empirical_epsilon": {
                "loss": {
                    "eps_lb": 0.0,
                    "max_certifiable": 3.2,
                    "n_members": 180,
                    "n_nonmembers": 180,
                    "delta": 1e-4,
                    "alpha": 0.05,
                }
            },
        }
        report["utility"][m] = {
            "configs": {
                "real": {"accuracy": 0.8, "macro_f1": 0.78, "per_class_f1": {"A": 0.8, "B": 0.76}, "n_test": 120},
                "synthetic": {"accuracy": 0.6, "macro_f1": 0.55, "per_class_f1": {"A": 0.6, "B": 0.5}, "n_test": 120},
            },
            "synthetic_to_real_ratio": 0.75,
            "sites": {},
        }
    if "image" in modalities:
        report["image_memorisation"] = {
            "near_copies_pixel": 0,
            "near_copies_feature": 0,
            "near_copies_pixel_chance": 2,
            "near_copies_feature_chance": 2,
            "n_synthetic": 80,
            "sites": {site: {"near_copies_pixel": 0, "near_copies_feature": 0} for site in SITES},
        }
        report["fidelity"]["image"] = {
            "extractor": "fedgen FeatureNet", "fid": 40.0, "kid": 0.02, "precision": 0.4, "recall": 0.3,
            "density": 0.5, "coverage": 0.4, "ssim": 0.3, "psnr": 14.0, "n_real": 180, "n_synthetic": 80,
        }  # fmt: skip
    if "text" in modalities:
        report["membership"]["text"]["canary_exposure"] = {site: 1.5 for site in SITES}
        report["phi"] = {
            "engine": "blank English pipeline + gazetteer rules (no statistical NER)",
            "n_texts": 50,
            "findings": [{"index": 3, "entity_type": "DATE_TIME", "start": 10, "end": 24, "score": 0.6, "redacted": "M**** 1*, 2***"}],
            "counts": {"DATE_TIME": 1},
            "memorisation": {
                "canary_reproductions": 0, "phi_replay": 0, "planted_phi_reproductions": 0, "ngram_copies": 4,
                "ngram_n": 8,
                "sites": {site: {"canary_reproductions": 0, "phi_replay": 0, "planted_phi_reproductions": 0,
                                 "ngram_copies": 2} for site in SITES},
            },
        }  # fmt: skip
        report["fidelity"]["text"] = {
            "embedding": "hashed character n-grams",
            "mean_embedding_distance": 0.1,
            "frechet_distance": 0.5,
            "per_class": {"A": {"real": {"n": 40, "words_mean": 50.0}, "synthetic": {"n": 25, "words_mean": 44.0}}},
        }
    return report


@pytest.fixture(scope="module")
def policy():
    return load_policy()


def _failed(decision: dict) -> dict[str, dict]:
    return {c["name"]: c for c in decision["checks"] if not c["passed"]}


def test_default_policy_is_the_shipped_file(policy):
    assert policy.source == DEFAULT_POLICY
    assert policy.membership.auc_max == 0.6
    assert policy.membership.tpr_at_1pct_fpr_max == 0.03
    assert policy.phi.action == "placeholder"  # findings are replaced at release, not refused
    from fedgen.audits.phi import PHI_ENTITIES

    assert policy.phi.forbidden_entities == list(PHI_ENTITIES)  # every Safe Harbor kind the scanner sees
    assert policy.privacy.allow_no_dp is False


def test_a_report_within_policy_passes_every_check(policy):
    decision = evaluate_gate(example_report(), policy)
    assert _failed(decision) == {}
    assert decision["passed"] is True
    assert decision["policy"] == "default"
    names = {c["name"] for c in decision["checks"]}
    # one budget check per site (all its modalities), and each family of checks is present
    assert {"privacy.dp", "privacy.site-1.budget", "privacy.site-2.budget", "privacy.max_epsilon"} <= names
    assert {
        "membership.image.loss.auc",
        "membership.text.loss.tpr_at_1pct_fpr",
        "membership.text.loss.empirical_epsilon",
    } <= names
    assert {
        "phi.PERSON",
        "phi.US_SSN",
        "memorisation.text.canary_reproductions",
        "memorisation.image.near_copies_feature",
    } <= names
    assert {"memorisation.text.phi_replay"} <= names
    assert {
        "fidelity.image.precision",
        "utility.image.synthetic_to_real_ratio",
        "utility.text.synthetic_to_real_ratio",
    } <= names
    # the default policy replaces the DATE_TIME finding at release: a passed check that says so
    date = next(c for c in decision["checks"] if c["name"] == "phi.DATE_TIME")
    assert date["passed"] and date["value"] == 1 and "replaced by typed placeholders" in date["detail"]


def test_a_canary_reproduction_refuses_and_names_the_check(policy):
    report = example_report()
    report["phi"]["memorisation"]["canary_reproductions"] = 1
    decision = evaluate_gate(report, policy)
    assert decision["passed"] is False
    failed = _failed(decision)
    assert list(failed) == ["memorisation.text.canary_reproductions"]
    assert failed["memorisation.text.canary_reproductions"]["value"] == 1
    assert failed["memorisation.text.canary_reproductions"]["threshold"] == 0


def test_near_copies_refuse_only_above_what_chance_gives(policy):
    report = example_report(modalities=("image",))
    report["image_memorisation"]["near_copies_pixel"] = 2  # the example's chance count
    assert evaluate_gate(report, policy)["passed"] is True
    report["image_memorisation"]["near_copies_pixel"] = 3
    failed = _failed(evaluate_gate(report, policy))
    assert list(failed) == ["memorisation.image.near_copies_pixel"]
    assert failed["memorisation.image.near_copies_pixel"]["threshold"] == 2
    assert "2 of them are what images the model never saw" in failed["memorisation.image.near_copies_pixel"]["detail"]
    del report["image_memorisation"]["near_copies_pixel_chance"]  # an old or tampered report
    assert "memorisation.image.near_copies_pixel" in _failed(evaluate_gate(report, policy))


def test_epsilon_over_a_sites_budget_refuses(policy):
    report = example_report(modalities=("image",))
    report["privacy"]["sites"]["site-2"]["budget"] = 7.0  # spent 7.5, the image model alone 5
    failed = _failed(evaluate_gate(report, policy))
    assert list(failed) == ["privacy.site-2.budget"]
    assert failed["privacy.site-2.budget"]["value"] == 7.5
    assert failed["privacy.site-2.budget"]["threshold"] == 7.0
    assert "site-2 accountant ε, image (same people" in failed["privacy.site-2.budget"]["detail"]


def test_a_missing_figure_fails_and_says_it_was_not_measured(policy):
    report = example_report()
    report["fidelity"]["image"]["precision"] = None
    report["fidelity"]["image"]["note"] = "too few real images at the sites"
    del report["utility"]["text"]
    failed = _failed(evaluate_gate(report, policy))
    assert set(failed) == {"fidelity.image.precision", "utility.text.synthetic_to_real_ratio"}
    assert "not measured: too few real images" in failed["fidelity.image.precision"]["detail"]
    assert failed["utility.text.synthetic_to_real_ratio"]["value"] is None
    assert "not measured" in failed["utility.text.synthetic_to_real_ratio"]["detail"]


def test_an_absent_modality_section_fails_rather_than_passing(policy):
    report = example_report()
    del report["membership"]["image"]
    del report["phi"]
    failed = _failed(evaluate_gate(report, policy))
    assert "membership.image" in failed
    assert "phi.scan" in failed
    assert "memorisation.text.canary_reproductions" in failed


def test_no_dp_is_refused_unless_the_policy_allows_it(policy, tmp_path):
    report = example_report(modalities=("image",))
    report["run"]["dp"] = False
    report["privacy"]["epsilon_max"] = math.inf
    for site in SITES:
        report["privacy"]["sites"][site] |= {"epsilon": math.inf, "budget": math.inf}
        report["privacy"]["sites"][site]["modalities"]["image"]["epsilon"] = math.inf
    failed = _failed(evaluate_gate(report, policy))
    assert set(failed) == {"privacy.dp", "privacy.max_epsilon"}
    assert "WITHOUT DP" in failed["privacy.dp"]["detail"]

    lenient = tmp_path / "lenient.toml"
    text = default_policy_text().replace("allow_no_dp = false", "allow_no_dp = true")
    lenient.write_text(text.replace("max_epsilon = 10.0\n", ""))
    decision = evaluate_gate(report, load_policy(lenient))
    assert decision["passed"] is True
    assert decision["policy"] == str(lenient)


def test_an_empirical_bound_above_the_accountant_refuses(policy):
    report = example_report(modalities=("image",))
    report["membership"]["image"]["empirical_epsilon"]["loss"]["eps_lb"] = 9.0  # accountant: 8.5
    failed = _failed(evaluate_gate(report, policy))
    assert list(failed) == ["membership.image.loss.empirical_epsilon"]


def test_a_forbidden_phi_finding_refuses_under_a_refusing_policy(policy):
    refusing = policy.model_copy(update={"phi": policy.phi.model_copy(update={"action": "refuse"})})
    report = example_report(modalities=("text",))
    report["phi"]["counts"]["PERSON"] = 2
    failed = _failed(evaluate_gate(report, refusing))
    assert list(failed) == ["phi.PERSON", "phi.DATE_TIME"]
    assert failed["phi.PERSON"]["value"] == 2
    assert _failed(evaluate_gate(report, policy)) == {}  # the default replaces them instead


def test_replay_of_a_sites_own_phi_refuses_whatever_the_policy(policy):
    report = example_report(modalities=("text",))
    report["phi"]["memorisation"]["phi_replay"] = 1
    failed = _failed(evaluate_gate(report, policy))
    assert list(failed) == ["memorisation.text.phi_replay"]
    del report["phi"]["memorisation"]["phi_replay"]
    assert "was not measured" in _failed(evaluate_gate(report, policy))["memorisation.text.phi_replay"]["detail"]


def test_the_decision_records_what_the_release_does_with_phi(policy):
    report = example_report(modalities=("text",))
    report["phi"]["counts"] = {"DATE_TIME": 1, "PERSON": 3}
    recorded = record_decision(report, policy, audited_files={"texts.jsonl": "0" * 64})
    assert recorded["phi"]["release"] == {
        "action": "placeholder", "entities": policy.phi.forbidden_entities, "replaced": {"PERSON": 3, "DATE_TIME": 1},
    }  # fmt: skip


def default_policy_text() -> str:
    from importlib import resources

    return resources.files("fedgen.audits").joinpath("policy.toml").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("auc_max = 0.6", "auc_max = 1.5"), "membership.auc_max = 1.5"),
        (lambda t: t.replace("auc_max = 0.6", "auc_maks = 0.6"), "membership.auc_maks: unknown key"),
        (lambda t: t.replace("tpr_at_1pct_fpr_max = 0.03\n", ""), "membership.tpr_at_1pct_fpr_max: missing"),
        (lambda t: t.replace('"US_SSN"', '"SSN"'), "'SSN' is not a scanner entity type"),
        (
            lambda t: t.replace('near_copy_measures = ["pixel", "feature"]', 'near_copy_measures = ["hash"]'),
            "near_copy_measures.0 = 'hash'",
        ),
        (lambda t: t.replace("allow_no_dp = false", "allow_no_dp = true"), "remove max_epsilon"),
        (lambda t: t.replace("[phi]", "[phi"), "is not valid TOML"),
    ],
)
def test_a_bad_policy_file_is_one_line_naming_the_key(tmp_path, edit, message):
    path = tmp_path / "policy.toml"
    path.write_text(edit(default_policy_text()))
    with pytest.raises(FedgenError) as caught:
        load_policy(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_missing_policy_file_is_named(tmp_path):
    with pytest.raises(FedgenError, match="policy file not found: .*nope.toml"):
        load_policy(tmp_path / "nope.toml")


def test_the_gate_does_not_modify_the_report(policy):
    report = example_report()
    before = copy.deepcopy(report)
    evaluate_gate(report, policy)
    assert report == before
