"""Scoring a blinded review: every figure checked against a value worked out by hand."""

import json
import math

import pytest
from scipy.optimize import brentq
from scipy.stats import binom

from fedgen.audits.review import (
    ANSWERS_FORMAT,
    KEY_FORMAT,
    KIT_KEY,
    cohen_kappa,
    fleiss_kappa,
    pool_scores,
    proportion,
    score_kit,
)
from fedgen.errors import FedgenError

# Eight images, two classes, real and synthetic alternating.
TRUTH = {
    "I-1": ("real", "A"), "I-2": ("synthetic", "A"), "I-3": ("real", "A"), "I-4": ("synthetic", "A"),
    "I-5": ("real", "B"), "I-6": ("synthetic", "B"), "I-7": ("real", "B"), "I-8": ("synthetic", "B"),
}  # fmt: skip
R, S = "real", "synthetic"
# reviewer 1: right on 6 of 8 (wrong on I-3 and I-6)
FIRST = {
    "sources": [R, S, S, S, R, R, R, S],
    "confidence": [5, 4, 3, 2, 5, 1, 4, 5],
    "readings": ["A", "A", "B", None, "B", "A", "B", "B"],
}
# reviewer 2: right on 5 of 8 (wrong on I-2, I-5, I-8)
SECOND = {
    "sources": [R, R, R, S, S, S, R, R],
    "confidence": [3] * 8,
    "readings": ["A", "B", "A", "A", "B", "B", "A", "B"],
}
ALWAYS_REAL = {"sources": [R] * 8, "confidence": [1] * 8, "readings": [None] * 8}


def write_key(kit_dir, *, kit="k1", site="site-a", run="r1"):
    kit_dir.mkdir(parents=True, exist_ok=True)
    items = {i: {"source": s, "class": c, "record": f"images/{c}/{i}.png"} for i, (s, c) in TRUTH.items()}
    key = {
        "format": KEY_FORMAT, "kit": kit, "run": run, "site": site,
        "modalities": {"image": {"classes": ["A", "B", "C"], "items_per_class": {"A": 2, "B": 2}, "items": items}},
    }  # fmt: skip
    (kit_dir / KIT_KEY).write_text(json.dumps(key), encoding="utf-8")
    return kit_dir


def write_answers(path, reviewer, plan, *, kit="k1", items=None):
    ids = list(TRUTH)
    answers = {
        i: {"source": s, "confidence": c, "reading": r}
        for i, s, c, r in zip(ids, plan["sources"], plan["confidence"], plan["readings"])
        if items is None or i in items
    }
    payload = {
        "format": ANSWERS_FORMAT,
        "kit": kit,
        "reviewer": reviewer,
        "complete": items is None,
        "answers": answers,
    }
    path.write_text(json.dumps(payload), encoding="utf-8")
    return path


def clopper_pearson_by_hand(k, n, level=0.95):
    """The p whose binomial tails put (1 - level) / 2 beyond k, found by root search."""
    tail = (1 - level) / 2
    low = 0.0 if k == 0 else brentq(lambda p: binom.sf(k - 1, n, p) - tail, 1e-12, 1 - 1e-12)  # P(X >= k) = tail
    high = 1.0 if k == n else brentq(lambda p: binom.cdf(k, n, p) - tail, 1e-12, 1 - 1e-12)  # P(X <= k) = tail
    return low, high


def test_proportion_is_the_clopper_pearson_interval():
    for k, n in ((6, 8), (0, 5), (5, 5), (11, 16)):
        result = proportion(k, n)
        assert result["value"] == k / n
        assert result["ci"] == pytest.approx(clopper_pearson_by_hand(k, n), abs=1e-9)
    assert proportion(0, 0) == {"k": 0, "n": 0, "value": None, "ci": None}


def test_kappas_by_hand():
    # two raters: agree on 3 of 8 (p_o = 3/8); shares 4/8 + 4/8 and 5/8 + 3/8 (p_e = 1/2)
    first, second = FIRST["sources"], SECOND["sources"]
    assert cohen_kappa(first, second) == pytest.approx((3 / 8 - 1 / 2) / (1 - 1 / 2))  # -0.25
    assert cohen_kappa([R, S, R], [R, S, R]) == 1.0
    assert cohen_kappa([R, R], [R, R]) is None  # p_e = 1: undefined
    # three raters, per item counts (real, synthetic): P_i = 1 for (3, 0), 1/3 for (2, 1) and (1, 2);
    # mean 4/8; label shares 17/24 and 7/24, P_e = (17^2 + 7^2) / 24^2
    ratings = [list(r) for r in zip(FIRST["sources"], SECOND["sources"], ALWAYS_REAL["sources"])]
    expected_chance = (17**2 + 7**2) / 24**2
    assert fleiss_kappa(ratings) == pytest.approx((0.5 - expected_chance) / (1 - expected_chance))  # -50/238
    # with two raters Fleiss' kappa is Scott's pi, not Cohen's kappa: p_e from the pooled shares (9/16, 7/16)
    pooled_chance = (9 / 16) ** 2 + (7 / 16) ** 2
    assert fleiss_kappa([list(r) for r in zip(first, second)]) == pytest.approx(
        (3 / 8 - pooled_chance) / (1 - pooled_chance)
    )


def test_score_kit_by_hand(tmp_path):
    kit = write_key(tmp_path / "kit")
    files = [write_answers(tmp_path / "a.json", "Dr A", FIRST), write_answers(tmp_path / "b.json", "Dr B", SECOND)]
    scores = score_kit(kit, files)
    image = scores["modalities"]["image"]
    one, two = image["reviewers"]["reviewer 1"], image["reviewers"]["reviewer 2"]

    assert one["detection"]["k"] == 6 and one["detection"]["n"] == 8 and one["detection"]["value"] == 0.75
    assert one["detection"]["ci"] == pytest.approx(clopper_pearson_by_hand(6, 8), abs=1e-9)
    # two-sided exact test against 0.5: 2 * P(X >= 6) = 2 * (28 + 8 + 1) / 256
    assert one["detection"]["p_value"] == pytest.approx(2 * 37 / 256)
    assert two["detection"]["value"] == 5 / 8
    assert one["synthetic_called_synthetic"]["value"] == 3 / 4 and one["real_called_real"]["value"] == 3 / 4
    assert one["per_class"]["A"]["value"] == 3 / 4 and one["per_class"]["B"]["value"] == 3 / 4
    assert "C" not in one["per_class"]  # no item of class C
    assert one["by_confidence"]["5"]["k"] == 3 and one["by_confidence"]["5"]["n"] == 3
    # readings: synthetic I-2 A (right), I-4 none, I-6 A (B), I-8 B (right); real: I-3 read B, the rest right
    assert one["reading"]["synthetic"]["value"] == 2 / 4 and one["reading"]["real"]["value"] == 3 / 4
    assert one["reading"]["per_class"]["B"] == {"synthetic": proportion(1, 2), "real": proportion(2, 2)}

    pooled = image["pooled"]
    assert (pooled["detection"]["k"], pooled["detection"]["n"]) == (11, 16)
    tail = sum(math.comb(16, k) for k in range(11, 17)) / 2**16
    assert pooled["detection"]["p_value"] == pytest.approx(2 * tail)
    assert image["agreement"]["method"] == "Cohen's kappa"
    assert image["agreement"]["source"] == {"kappa": pytest.approx(-0.25), "n_items": 8}
    # the reading kappa runs on the 7 items both reviewers read (reviewer 1 gave I-4 no reading)
    # alike on 3 of 7 (I-1, I-5, I-8); each reads A on 3 and B on 4: p_e = (3*3 + 4*4) / 49
    assert image["agreement"]["reading"] == {"kappa": pytest.approx((3 / 7 - 25 / 49) / (1 - 25 / 49)), "n_items": 7}

    # only aggregates: no item id, no reviewer name, no file
    text = json.dumps(scores)
    assert not any(f'"{i}"' in text for i in TRUTH) and "Dr A" not in text and "a.json" not in text


def test_a_reviewer_who_always_answers_real_scores_one_half(tmp_path):
    kit = write_key(tmp_path / "kit")
    scores = score_kit(kit, [write_answers(tmp_path / "r.json", "Dr R", ALWAYS_REAL)])
    image = scores["modalities"]["image"]
    figures = image["reviewers"]["reviewer 1"]
    assert figures["detection"]["value"] == 0.5 and figures["detection"]["p_value"] == 1.0
    assert figures["real_called_real"]["value"] == 1.0 and figures["synthetic_called_synthetic"]["value"] == 0.0
    assert image["agreement"]["method"] is None  # one reviewer


def test_three_reviewers_use_fleiss_kappa_on_the_items_all_answered(tmp_path):
    kit = write_key(tmp_path / "kit")
    files = [
        write_answers(tmp_path / "a.json", "A", FIRST),
        write_answers(tmp_path / "b.json", "B", SECOND),
        write_answers(tmp_path / "c.json", "C", ALWAYS_REAL, items={"I-1", "I-2", "I-3", "I-4"}),  # saved halfway
    ]
    image = score_kit(kit, files)["modalities"]["image"]
    assert image["reviewers"]["reviewer 3"]["n_answered"] == 4
    assert image["agreement"]["method"] == "Fleiss' kappa" and image["agreement"]["source"]["n_items"] == 4
    ratings = [list(r) for r in zip(FIRST["sources"][:4], SECOND["sources"][:4], ALWAYS_REAL["sources"][:4])]
    assert image["agreement"]["source"]["kappa"] == pytest.approx(fleiss_kappa(ratings))


def test_sites_pool_by_summing_counts(tmp_path):
    site_a = score_kit(
        write_key(tmp_path / "a", kit="k1", site="site-a"), [write_answers(tmp_path / "a.json", "A", FIRST)]
    )
    site_b = score_kit(
        write_key(tmp_path / "b", kit="k2", site="site-b"), [write_answers(tmp_path / "b.json", "B", SECOND, kit="k2")]
    )
    pooled = pool_scores([site_a, site_b], run_id="r1")
    image = pooled["modalities"]["image"]
    assert image["pooled"]["detection"] == proportion(11, 16) | {"p_value": pytest.approx(2 * 6885 / 2**16)}
    # synthetic items read as generated: 2 of 4 at site a; I-4, I-6 and I-8 (not I-2) at site b
    assert image["pooled"]["reading"]["synthetic"] == proportion(2 + 3, 8)
    assert image["sites"]["site-a"]["detection"]["value"] == 0.75
    assert image["sites"]["site-b"]["agreement"]["method"] is None
    assert pooled["sites"] == ["site-a", "site-b"] and image["n_reviewers"] == 2
    with pytest.raises(FedgenError, match="already counted"):
        pool_scores([site_a, site_a])
    with pytest.raises(FedgenError, match="not of the audited run"):
        pool_scores([site_a], run_id="r2")


def test_bad_answers_files_are_one_line_errors(tmp_path):
    kit = write_key(tmp_path / "kit")
    good = write_answers(tmp_path / "a.json", "Dr A", FIRST)
    other = write_answers(tmp_path / "o.json", "Dr O", FIRST, kit="k9")
    with pytest.raises(FedgenError, match="answers kit 'k9'"):
        score_kit(kit, [other])
    with pytest.raises(FedgenError, match="two answers files come from reviewer 'Dr A'"):
        score_kit(kit, [good, good])
    payload = json.loads(good.read_text())
    for change, message in (
        ({"I-9": {"source": "real"}}, "'I-9' is not in the kit"),
        ({"I-1": {"source": "fake"}}, "source 'fake'"),
        ({"I-1": {"source": "real", "confidence": 7}}, "confidence 7"),
        ({"I-1": {"source": "real", "reading": "Z"}}, "reading 'Z'"),
    ):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(payload | {"answers": payload["answers"] | change}))
        with pytest.raises(FedgenError, match=message):
            score_kit(kit, [bad])
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(FedgenError, match="not a JSON file"):
        score_kit(kit, [tmp_path / "junk.json"])
