from collections import Counter

import numpy as np
import pytest
import torch

from fedgen.audits.gate import _utility_checks, load_policy
from fedgen.audits.pooling import _utility
from fedgen.audits.utility import (
    CONFIGURATIONS,
    competence,
    image_utility,
    pool_utility,
    site_seed,
    smote_balance,
    text_utility,
)
from fedgen.errors import FedgenError
from tests.test_fidelity import ANXIOUS, CALM, QUADRANTS, bright_dark, corpus, one_torch_thread, quadrants  # noqa: F401 (fixture)

CLASSES = ["dark", "bright"]
# Labels drawn at random carry nothing about bright vs dark: a classifier whose predictions were
# independent of the true labels would score Binomial(40, 1/2)/40 on the 40 balanced held-out
# examples, above 0.7 with probability < 1%. Measured for images over 6 seeds: 0.475-0.5.
CHANCE_BOUND = 0.7
STEPS = 50  # enough for the toy sets; below it the early stopping decides


def noise_images(n: int, *, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 16, 16, generator=g) * 2 - 1, torch.randint(0, 2, (n,), generator=g)


def test_image_synthetic_copy_of_real_train_scores_like_real():
    train, test = bright_dark(60, seed=1), bright_dark(40, seed=2)
    result = image_utility(train, test, train, class_names=CLASSES, seed=0, max_steps=STEPS)
    scores = result["configurations"]
    assert set(scores) == set(CONFIGURATIONS)
    assert scores["real"]["accuracy"] >= 0.95
    assert abs(scores["synthetic"]["accuracy"] - scores["real"]["accuracy"]) <= 0.05
    assert scores["composite"]["n_train"] == 120 and scores["real"]["n_test"] == 40
    assert scores["real"]["per_class_support"] == {"dark": 20, "bright": 20}


@pytest.mark.slow
def test_image_noise_with_random_labels_is_at_chance_while_real_is_high():
    train, test = bright_dark(60, seed=1), bright_dark(40, seed=2)
    result = image_utility(train, test, noise_images(60, seed=3), class_names=CLASSES, seed=0, max_steps=STEPS)
    scores = result["configurations"]
    assert scores["real"]["accuracy"] >= 0.95
    assert scores["smote"]["accuracy"] >= 0.95
    assert scores["synthetic"]["accuracy"] <= CHANCE_BOUND


def test_every_configuration_records_its_training_and_the_reference_scores_real_and_synthetic():
    train, test = bright_dark(60, seed=1), bright_dark(40, seed=2)
    result = image_utility(train, test, train, class_names=CLASSES, max_steps=STEPS)
    for scores in result["configurations"].values():
        assert 0 < scores["training"]["kept_step"] <= scores["training"]["steps"] <= STEPS
        assert scores["training"]["n_validation"] > 0
    reference = result["reference"]
    assert set(reference["configurations"]) == {"real", "synthetic"}
    assert reference["configurations"]["real"]["accuracy"] >= 0.95
    assert reference["configurations"]["real"]["no_information_rate"] == 0.5


def test_image_utility_trains_only_the_configurations_asked_for():
    train, test = bright_dark(60, seed=1), bright_dark(40, seed=2)
    result = image_utility(train, test, train, class_names=CLASSES, max_steps=2, configurations=("synthetic",))
    assert set(result["configurations"]) == set(result["reference"]["configurations"]) == {"synthetic"}


def test_each_site_seeds_its_classifiers_apart_and_every_audit_of_it_alike():
    seeds = [site_seed(0, f"site-{i}") for i in range(1, 4)]
    assert len(set(seeds)) == 3
    assert seeds[0] == site_seed(0, "site-1") != site_seed(1, "site-1")
    assert all(0 <= seed < 2**31 for seed in seeds)


def test_image_utility_refuses_mismatched_synthetic_images():
    train, test = bright_dark(60, seed=1), bright_dark(40, seed=2)
    wrong = (torch.zeros(4, 3, 16, 16), torch.zeros(4, dtype=torch.long))
    with pytest.raises(FedgenError, match=r"\(3, 16, 16\)"):
        image_utility(train, test, wrong, class_names=CLASSES, max_steps=1)


def test_utility_refuses_a_held_out_split_below_the_aggregate_minimum():
    train, test = bright_dark(60, seed=1), bright_dark(8, seed=2)
    with pytest.raises(FedgenError, match="held-out split"):
        image_utility(train, test, train, class_names=CLASSES, max_steps=1)


def test_smote_balances_to_the_largest_class_and_leaves_singletons():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 30 + [1] * 4 + [2] * 1)
    x = rng.normal(size=(len(labels), 3))
    balanced_x, balanced_labels = smote_balance(x, labels, seed=0)
    assert Counter(balanced_labels.tolist()) == {0: 30, 1: 30, 2: 1}  # 4 examples: k shrinks to 3
    assert np.array_equal(balanced_x[: len(x)], x)


def text_split(n: int, *, seed: int):
    calm, anxious = corpus(CALM, n // 2, seed=seed), corpus(ANXIOUS, n // 2, seed=seed + 100)
    return calm + anxious, [0] * (n // 2) + [1] * (n // 2)


def test_text_utility_copy_matches_real_and_noise_is_at_chance():
    train, test = text_split(60, seed=1), text_split(40, seed=2)
    copy = text_utility(train, test, train, class_names=["Normal", "Anxiety"], seed=0)["configurations"]
    assert copy["real"]["accuracy"] == 1.0
    assert copy["synthetic"]["accuracy"] == copy["real"]["accuracy"]

    rng = np.random.default_rng(3)
    gibberish = ["".join(rng.choice(list("qzxjkv "), size=40)) for _ in range(60)]
    noise = (gibberish, rng.integers(0, 2, size=60).tolist())
    scores = text_utility(train, test, noise, class_names=["Normal", "Anxiety"], seed=0)["configurations"]
    assert scores["real"]["accuracy"] == 1.0
    assert scores["synthetic"]["accuracy"] <= CHANCE_BOUND


def test_text_synthetic_with_one_class_predicts_that_class():
    train, test = text_split(60, seed=1), text_split(40, seed=2)
    one_class = (corpus(CALM, 10, seed=5), [0] * 10)
    scores = text_utility(train, test, one_class, class_names=["Normal", "Anxiety"])["configurations"]
    assert scores["synthetic"]["accuracy"] == 0.5
    assert scores["synthetic"]["per_class_f1"]["Anxiety"] == 0.0


def site_result(accuracy: float, n_test: int, f1_normal: float, support: int) -> dict:
    scores = {
        "accuracy": accuracy,
        "macro_f1": accuracy,
        "per_class_f1": {"Normal": f1_normal},
        "per_class_support": {"Normal": support},
        "no_information_rate": 0.5,
        "n_test": n_test,
    }
    return {"classifier": "c", "configurations": dict.fromkeys(CONFIGURATIONS, scores)}


def test_pool_utility_weights_sites_by_held_out_size():
    pooled = pool_utility([site_result(0.9, 100, 1.0, 10), site_result(0.5, 25, 0.0, 30)])
    real = pooled["configurations"]["real"]
    assert real["accuracy"] == pytest.approx((0.9 * 100 + 0.5 * 25) / 125)
    assert real["n_test"] == 125
    assert real["per_class_f1"]["Normal"] == pytest.approx(10 / 40)
    assert pooled["sites"] == 2


# --------------------------------------------------------------------------- the utility check


def utility_checks(real_train, test, synthetic) -> dict:
    """The gate's utility checks on one site's image utility, pooled as the audit pools it."""
    utility = image_utility(
        real_train, test, synthetic, class_names=QUADRANTS, max_steps=STEPS, configurations=("real", "synthetic")
    )
    report = {"utility": {"image": _utility([{"site": "site-1", "utility": utility}])}}
    return {c["name"]: c for c in _utility_checks(report, "image", load_policy().utility)}


MAIN, REFERENCE = "utility.image.synthetic_to_real_ratio", "utility.image.reference.synthetic_to_real_ratio"


@pytest.mark.slow
def test_the_utility_check_passes_a_copy_of_real_training_images_of_the_right_classes():
    train, test = quadrants(80, seed=1), quadrants(40, seed=2)
    checks = utility_checks(train, test, quadrants(80, seed=3))
    assert checks[MAIN]["passed"] and checks[MAIN]["value"] >= 0.9
    assert checks[REFERENCE]["passed"] and checks[REFERENCE]["value"] >= 0.9


def test_the_utility_check_refuses_noise_images():
    train, test = quadrants(80, seed=1), quadrants(40, seed=2)
    g = torch.Generator().manual_seed(3)
    noise = (torch.rand(80, 1, 16, 16, generator=g) * 2 - 1, torch.randint(0, 4, (80,), generator=g))
    checks = utility_checks(train, test, noise)
    assert not checks[MAIN]["passed"] and checks[MAIN]["value"] <= 0.4
    assert not checks[REFERENCE]["passed"]


def test_the_utility_check_refuses_real_images_with_shuffled_labels():
    train, test = quadrants(80, seed=1), quadrants(40, seed=2)
    images, labels = quadrants(80, seed=3)
    shuffled = labels[torch.randperm(80, generator=torch.Generator().manual_seed(4))]
    checks = utility_checks(train, test, (images, shuffled))
    assert not checks[MAIN]["passed"] and checks[MAIN]["value"] < 0.5
    assert not checks[REFERENCE]["passed"]


@pytest.mark.slow
def test_a_real_trained_classifier_at_chance_refuses_to_score_utility_and_says_why():
    """Real training labels that carry nothing: whatever the synthetic set, no ratio is scored."""
    images, labels = quadrants(80, seed=1)
    shuffled = labels[torch.randperm(80, generator=torch.Generator().manual_seed(5))]
    checks = utility_checks((images, shuffled), quadrants(40, seed=2), quadrants(80, seed=3))
    main = checks[MAIN]
    assert not main["passed"] and main["value"] is None
    assert "not clearly better than the 0.250 of always guessing" in main["detail"]
    assert checks[REFERENCE]["passed"] and "not applied" in checks[REFERENCE]["detail"]


@pytest.mark.parametrize(
    ("accuracy", "n_test", "rate", "competent"),
    [(0.52, 241, 0.38, False), (0.9, 241, 0.38, True), (0.75, 40, 0.5, False), (1.0, 40, 0.5, True)],
)
def test_competence_asks_for_a_lower_bound_a_quarter_of_the_way_from_chance_to_perfect(
    accuracy, n_test, rate, competent
):
    result = competence({"accuracy": accuracy, "n_test": n_test, "no_information_rate": rate})
    assert result["required"] == pytest.approx(rate + 0.25 * (1 - rate))
    assert result["accuracy_lower_bound"] < accuracy
    assert result["competent"] is competent
