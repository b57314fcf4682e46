"""The bias view flags a class or a site that the synthetic data serves badly, and only those."""

import pytest

from fedgen.audits.bias import MIN_TRAINING_RECORDS, bias_view, mix_difference

CLASSES = ["No_DR", "Mild", "Severe"]


def constructed_report(*, train, synthetic, class_f1, site_f1, heldout=None):
    """A report.json with the sections the bias view reads.

    train / heldout: site -> class -> records; synthetic: class -> items;
    class_f1: class -> (real-trained F1, synthetic-trained F1); site_f1: site -> (real, synthetic) macro-F1.
    """
    heldout = heldout or {site: {c: max(n // 4, 5) for c, n in counts.items()} for site, counts in train.items()}
    return {
        "run": {"config": {"data": {"image_classes": CLASSES}}},
        "records": {"image": {site: {"train": train[site], "heldout": heldout[site]} for site in train}},
        "synthetic": {"per_class": {"image": synthetic}},
        "utility": {
            "image": {
                "configs": {
                    kind: {
                        "macro_f1": sum(f[i] for f in class_f1.values()) / len(class_f1),
                        "per_class_f1": {c: f[i] for c, f in class_f1.items()},
                    }
                    for i, kind in enumerate(("real", "synthetic"))
                },
                "sites": {
                    site: {"real": {"macro_f1": real}, "synthetic": {"macro_f1": synth}}
                    for site, (real, synth) in site_f1.items()
                },
            }
        },
        "fidelity": {
            "image": {
                "precision": 0.7,
                "recall": 0.6,
                "coverage": 0.8,
                "per_class": {c: {"precision": 0.7, "recall": 0.5, "coverage": 0.9, "n_real": 40} for c in CLASSES},
                "sites": {site: {"precision": 0.6, "recall": 0.6, "coverage": 0.7} for site in train},
            }
        },  # fmt: skip
    }


def test_a_balanced_run_raises_no_warning():
    even = {c: 200 for c in CLASSES}
    report = constructed_report(
        train={"site-a": even, "site-b": even},
        synthetic={c: 100 for c in CLASSES},
        class_f1={c: (0.8, 0.7) for c in CLASSES},
        site_f1={"site-a": (0.8, 0.7), "site-b": (0.82, 0.69)},
    )
    view = bias_view(report)["modalities"]["image"]
    assert view["warnings"] == []
    assert view["mix"]["differs"] is False and view["mix"]["distance"] == pytest.approx(0.0)
    row = view["classes"][0]
    assert row["train_share"] == pytest.approx(1 / 3) and row["synthetic_share"] == pytest.approx(1 / 3)
    assert row["f1_ratio"] == pytest.approx(0.7 / 0.8)
    assert row["fidelity"] == {"precision": 0.7, "recall": 0.5, "coverage": 0.9}
    assert [s["site"] for s in view["sites"]] == ["site-a", "site-b"] and view["sites"][0]["train_share"] == 0.5
    assert view["pooled"]["f1_ratio"] == pytest.approx(0.7 / 0.8) and view["pooled"]["fidelity"]["coverage"] == 0.8


def test_a_badly_served_class_and_site_are_flagged_and_the_rest_not():
    report = constructed_report(
        train={
            "site-a": {"No_DR": 400, "Mild": 150, "Severe": 20},
            "site-b": {"No_DR": 300, "Mild": 100, "Severe": 0},
        },
        synthetic={c: 100 for c in CLASSES},  # balanced by generate --per-class
        # Severe: 0.3 of real (below half); Mild: 0.55 / 0.8 (above half)
        class_f1={"No_DR": (0.9, 0.8), "Mild": (0.8, 0.55), "Severe": (0.6, 0.18)},
        site_f1={"site-a": (0.8, 0.6), "site-b": (0.9, 0.4)},
    )
    view = bias_view(report)["modalities"]["image"]
    flagged = {row["class"]: row["warnings"] for row in view["classes"]}
    assert flagged["No_DR"] == [] and flagged["Mild"] == []
    assert len(flagged["Severe"]) == 2  # F1 below half, and 20 training records
    assert "F1 0.18" in flagged["Severe"][0] and "0.60" in flagged["Severe"][0]
    assert f"20 training records over all sites (fewer than {MIN_TRAINING_RECORDS})" in flagged["Severe"][1]
    sites = {row["site"]: row["warnings"] for row in view["sites"]}
    assert sites["site-a"] == [] and len(sites["site-b"]) == 1 and "macro-F1 0.40" in sites["site-b"][0]
    assert view["warnings"] == flagged["Severe"] + sites["site-b"]
    # balanced synthetic items against 700 / 250 / 20 training records
    shares = {"No_DR": 700 / 970, "Mild": 250 / 970, "Severe": 20 / 970}
    assert view["mix"]["distance"] == pytest.approx(0.5 * sum(abs(s - 1 / 3) for s in shares.values()))
    assert view["mix"]["differs"] is True and "--per-class" in view["mix"]["reason"]


def test_a_class_with_no_synthetic_item_and_a_small_site_are_flagged():
    report = constructed_report(
        train={"site-a": {"No_DR": 300, "Mild": 300, "Severe": 100}, "site-b": {"No_DR": 20, "Mild": 10, "Severe": 5}},
        synthetic={"No_DR": 50, "Mild": 50, "Severe": 0},
        class_f1={"No_DR": (0.9, 0.8), "Mild": (0.8, 0.7)},  # Severe: not measured
        site_f1={"site-a": (0.8, 0.7), "site-b": (0.8, 0.7)},
    )
    view = bias_view(report)["modalities"]["image"]
    severe = next(row for row in view["classes"] if row["class"] == "Severe")
    assert severe["f1_ratio"] is None and severe["warnings"] == [
        "class Severe: the sites hold training records of it but no synthetic item was generated"
    ]
    assert view["sites"][1]["warnings"] == [f"site site-b: 35 training records (fewer than {MIN_TRAINING_RECORDS})"]
    assert "no synthetic item of Severe" in view["mix"]["reason"]


def test_mix_difference_is_the_total_variation_distance():
    assert mix_difference({"a": 3, "b": 1}, {"a": 1, "b": 1}) == pytest.approx(0.25)
    assert mix_difference({"a": 1}, {"b": 5}) == 1.0
    assert mix_difference({"a": 1}, {}) is None
