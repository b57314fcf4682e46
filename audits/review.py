"""Scoring a blinded real-or-synthetic review: what clinicians could tell, and how they read it.

A review kit (``audits/review_kit.py``) shows reviewers a shuffled mix of a site's held-out
real records and a run's synthetic ones, the same number of each per class. Per item a
reviewer answers real or synthetic, a confidence (1 = guessing .. 5 = certain) and a reading
(the class they see, or none). ``score_kit`` turns the kit's answer key and the reviewers'
answers files into aggregates, at the site; ``pool_scores`` pools several sites' scores at the
coordinator. Nothing here sees an image or a note: only item ids, classes and answers.

Figures, per modality, per reviewer and pooled over the site's reviewers:

- **detection**: the share of items whose source the reviewer named correctly, with a
  Clopper-Pearson interval and the exact two-sided binomial test against 0.5. On a kit with as
  many real as synthetic items, 0.5 is what a reviewer who cannot tell them apart scores, and
  so is a reviewer who answers "real" every time. A test that does not reject 0.5 does not
  show the two are indistinguishable: the interval says how far from 0.5 the answers allow.
- per class detection; the share of synthetic items called synthetic and of real items called
  real; detection per confidence level;
- **reading**: how often a synthetic item's reading is the class it was generated for, beside
  how often a real item's reading is its recorded class (no reading counts as a miss);
- **agreement** between the site's reviewers on the items all of them answered: Cohen's kappa
  for two, Fleiss' kappa for more, on the real/synthetic call and on the reading.

Every proportion carries its counts (``k`` of ``n``), so sites pool exactly by summing them.
Pooled over reviewers the answers are not independent (the reviewers saw the same items), so
the pooled interval and test are narrower than the evidence: each reviewer's own figures are
the ones a test can rest on. Kappas do not pool across sites (different items and reviewers):
they are listed per site.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from scipy.stats import beta, binomtest

from fedgen.errors import FedgenError

__all__ = [
    "SOURCES",
    "CONFIDENCE_LEVELS",
    "CONFIDENCE",
    "KIT_PAGE",
    "KIT_KEY",
    "KEY_FORMAT",
    "ANSWERS_FORMAT",
    "SCORES_FORMAT",
    "ReviewKey",
    "Answers",
    "proportion",
    "chance_p_value",
    "cohen_kappa",
    "fleiss_kappa",
    "read_key",
    "read_answers",
    "score_kit",
    "read_scores",
    "pool_scores",
]

REAL, SYNTHETIC = "real", "synthetic"
SOURCES = (REAL, SYNTHETIC)
CONFIDENCE_LEVELS = (1, 2, 3, 4, 5)  # 1 = guessing, 5 = certain
CONFIDENCE = 0.95  # of every interval
CHANCE = 0.5

KIT_PAGE = "review.html"  # what reviewers open
KIT_KEY = "answer-key.json"  # which item is real: stays with the site
KEY_FORMAT = "fedgen-review-key/1"
ANSWERS_FORMAT = "fedgen-review-answers/1"
SCORES_FORMAT = "fedgen-review-scores/1"


# --------------------------------------------------------------------------- statistics


def proportion(k: int, n: int, *, confidence: float = CONFIDENCE) -> dict:
    """``k`` of ``n`` as ``{"k", "n", "value", "ci"}`` with the Clopper-Pearson (exact) interval.

    ``value`` and ``ci`` are None when ``n`` is 0. The interval holds the true share with at
    least ``confidence`` probability; for the share 0.5 it excludes 0.5 exactly when the
    two-sided binomial test rejects it at level ``1 - confidence``.
    """
    if n == 0:
        return {"k": 0, "n": 0, "value": None, "ci": None}
    alpha = 1 - confidence
    low = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return {"k": k, "n": n, "value": k / n, "ci": [low, high]}


def chance_p_value(k: int, n: int) -> float | None:
    """Exact two-sided binomial test of ``k`` successes in ``n`` against the share 0.5."""
    return None if n == 0 else float(binomtest(k, n, CHANCE).pvalue)


def cohen_kappa(first: Sequence, second: Sequence) -> float | None:
    """Cohen's kappa of two raters' labels of the same items: (p_o - p_e) / (1 - p_e).

    p_o is the share of items they label alike, p_e the agreement expected from each rater's
    own label shares. None when undefined (no items, or p_e = 1: both always gave one label).
    """
    if len(first) != len(second):
        raise ValueError(f"two raters label the same items: {len(first)} != {len(second)}")
    n = len(first)
    if n == 0:
        return None
    observed = sum(a == b for a, b in zip(first, second)) / n
    shares_a, shares_b = Counter(first), Counter(second)
    expected = sum(shares_a[label] * shares_b[label] for label in shares_a) / n**2
    return None if expected == 1 else (observed - expected) / (1 - expected)


def fleiss_kappa(ratings: Sequence[Sequence]) -> float | None:
    """Fleiss' kappa: ``ratings[i]`` holds every rater's label of item ``i`` (as many per item).

    P_i = (sum_j n_ij^2 - m) / (m (m - 1)) for m raters, n_ij raters giving item i label j;
    P = mean P_i; p_j = share of all labels that are j; P_e = sum_j p_j^2;
    kappa = (P - P_e) / (1 - P_e). None when undefined (no items, or P_e = 1).
    """
    if not ratings:
        return None
    raters = len(ratings[0])
    if raters < 2 or any(len(r) != raters for r in ratings):
        raise ValueError("Fleiss' kappa needs the same number (at least two) of ratings per item")
    items = len(ratings)
    per_item = [Counter(r) for r in ratings]
    agreement = (
        sum((sum(c * c for c in counts.values()) - raters) / (raters * (raters - 1)) for counts in per_item) / items
    )
    totals = Counter(label for r in ratings for label in r)
    expected = sum((count / (items * raters)) ** 2 for count in totals.values())
    return None if expected == 1 else (agreement - expected) / (1 - expected)


# --------------------------------------------------------------------------- the key and the answers


@dataclass(frozen=True)
class KeyItem:
    modality: str
    source: str  # REAL or SYNTHETIC
    label: str  # the recorded class (real) or the class it was generated for (synthetic)


@dataclass(frozen=True)
class ReviewKey:
    """A kit's answer key: which item is real and of which class."""

    path: Path
    kit: str
    run: str
    site: str
    classes: dict[str, list[str]]  # modality -> the class list the reviewers chose from
    items: dict[str, KeyItem]  # item id -> truth


@dataclass(frozen=True)
class Answer:
    source: str
    confidence: int | None
    reading: str | None  # a class name; None: no reading given


@dataclass(frozen=True)
class Answers:
    """One reviewer's answers (only the items they answered real or synthetic)."""

    path: Path
    reviewer: str
    answers: dict[str, Answer]


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedgenError(f"{path}: no such file ({what})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FedgenError(f"{path}: not a JSON file ({what}): {err}") from None


def read_key(kit_dir: str | Path) -> ReviewKey:
    """The answer key of the kit in ``kit_dir`` (written by ``review_kit.build_kit``)."""
    path = Path(kit_dir) / KIT_KEY
    record = _read_json(path, "the kit's answer key")
    if not isinstance(record, dict) or record.get("format") != KEY_FORMAT:
        raise FedgenError(f"{path}: not a fedgen review answer key (format {KEY_FORMAT})")
    items = {
        item_id: KeyItem(modality, truth["source"], truth["class"])
        for modality, section in record["modalities"].items()
        for item_id, truth in section["items"].items()
    }
    classes = {modality: list(section["classes"]) for modality, section in record["modalities"].items()}
    return ReviewKey(path, record["kit"], record["run"], record["site"], classes, items)


def read_answers(path: str | Path, key: ReviewKey) -> Answers:
    """One reviewer's answers file (saved by the kit's page), checked against the kit's key."""
    path = Path(path)
    record = _read_json(path, "a reviewer's answers")
    if not isinstance(record, dict) or record.get("format") != ANSWERS_FORMAT:
        raise FedgenError(f"{path}: not a fedgen review answers file (format {ANSWERS_FORMAT})")
    if record.get("kit") != key.kit:
        raise FedgenError(f"{path}: answers kit {record.get('kit')!r}, but {key.path} is the key of kit {key.kit!r}")
    reviewer = record.get("reviewer")
    if not isinstance(reviewer, str) or not reviewer.strip():
        raise FedgenError(f"{path}: no reviewer name")
    given = record.get("answers")
    if not isinstance(given, dict):
        raise FedgenError(f'{path}: "answers" must be an object of item id -> answer')
    answers = {}
    for item_id, answer in given.items():
        where = f"{path}: item {item_id!r}"
        if item_id not in key.items:
            raise FedgenError(f"{where} is not in the kit")
        if not isinstance(answer, dict):
            raise FedgenError(f"{where}: an answer is an object")
        source, confidence, reading = answer.get("source"), answer.get("confidence"), answer.get("reading")
        if source is None:
            continue  # not answered (yet)
        if source not in SOURCES:
            raise FedgenError(f"{where}: source {source!r} is not one of {', '.join(SOURCES)}")
        if confidence is not None and confidence not in CONFIDENCE_LEVELS:
            raise FedgenError(f"{where}: confidence {confidence!r} is not one of {CONFIDENCE_LEVELS}")
        classes = key.classes[key.items[item_id].modality]
        if reading is not None and reading not in classes:
            raise FedgenError(f"{where}: reading {reading!r} is not one of the classes {classes}")
        answers[item_id] = Answer(source, confidence, reading)
    return Answers(path, reviewer.strip(), answers)


# --------------------------------------------------------------------------- scoring


def _detection(pairs: list[tuple[KeyItem, Answer]]) -> dict:
    right = sum(answer.source == item.source for item, answer in pairs)
    return proportion(right, len(pairs)) | {"p_value": chance_p_value(right, len(pairs))}


def _share(pairs: list[tuple[KeyItem, Answer]], source: str, called: str) -> dict:
    of_source = [answer for item, answer in pairs if item.source == source]
    return proportion(sum(answer.source == called for answer in of_source), len(of_source))


def _reading(pairs: list[tuple[KeyItem, Answer]], source: str) -> dict:
    of_source = [(item, answer) for item, answer in pairs if item.source == source]
    return proportion(sum(answer.reading == item.label for item, answer in of_source), len(of_source))


def _figures(pairs: list[tuple[KeyItem, Answer]], classes: list[str]) -> dict:
    """Every figure of one reviewer (or of several, pooled) from (truth, answer) pairs."""
    by_class = {name: [(i, a) for i, a in pairs if i.label == name] for name in classes}
    by_confidence = {level: [(i, a) for i, a in pairs if a.confidence == level] for level in CONFIDENCE_LEVELS}
    return {
        "n_answered": len(pairs),
        "detection": _detection(pairs),
        "synthetic_called_synthetic": _share(pairs, SYNTHETIC, SYNTHETIC),
        "real_called_real": _share(pairs, REAL, REAL),
        "per_class": {name: _detection(members) for name, members in by_class.items() if members},
        "by_confidence": {str(level): _detection(members) for level, members in by_confidence.items() if members},
        "reading": {
            SYNTHETIC: _reading(pairs, SYNTHETIC),
            REAL: _reading(pairs, REAL),
            "per_class": {
                name: {SYNTHETIC: _reading(members, SYNTHETIC), REAL: _reading(members, REAL)}
                for name, members in by_class.items()
                if members
            },
        },
    }


def _agreement(item_ids: list[str], reviewers: list[Answers]) -> dict:
    """Kappa on the source call and on the reading, over the items every reviewer answered."""
    if len(reviewers) < 2:
        return {"method": None, "note": "one reviewer: no agreement to measure"}
    common = [i for i in item_ids if all(i in r.answers for r in reviewers)]
    method = "Cohen's kappa" if len(reviewers) == 2 else "Fleiss' kappa"

    def kappa(ratings: list[list]) -> float | None:
        if len(reviewers) == 2:
            return cohen_kappa([r[0] for r in ratings], [r[1] for r in ratings])
        return fleiss_kappa(ratings)

    sources = [[r.answers[i].source for r in reviewers] for i in common]
    read = [i for i in common if all(r.answers[i].reading is not None for r in reviewers)]
    readings = [[r.answers[i].reading for r in reviewers] for i in read]
    return {
        "method": method,
        "reviewers": len(reviewers),
        "source": {"kappa": kappa(sources), "n_items": len(common)},
        "reading": {"kappa": kappa(readings), "n_items": len(read)},
    }


def score_kit(kit_dir: str | Path, answer_files: Sequence[str | Path]) -> dict:
    """SCORES.json of a kit: per modality, per reviewer and pooled figures and the agreement.

    Reviewers appear as "reviewer 1", "reviewer 2", ... in the order of ``answer_files``; their
    names, the item ids and the answers stay at the site.
    """
    key = read_key(kit_dir)
    if not answer_files:
        raise FedgenError("no answers file given")
    reviewers = [read_answers(path, key) for path in answer_files]
    names = Counter(r.reviewer for r in reviewers)
    twice = [name for name, n in names.items() if n > 1]
    if twice:
        raise FedgenError(f"two answers files come from reviewer {twice[0]!r}: give each reviewer's last file once")
    labels = [f"reviewer {n}" for n in range(1, len(reviewers) + 1)]
    modalities = {}
    for modality, classes in key.classes.items():
        item_ids = [i for i, item in key.items.items() if item.modality == modality]
        per_reviewer = {
            label: [(key.items[i], r.answers[i]) for i in item_ids if i in r.answers]
            for label, r in zip(labels, reviewers)
        }
        counts = Counter((key.items[i].label, key.items[i].source) for i in item_ids)
        modalities[modality] = {
            "classes": classes,
            "n_items": len(item_ids),
            "items_per_class": {name: counts[(name, REAL)] for name in classes if counts[(name, REAL)]},
            "reviewers": {label: _figures(pairs, classes) for label, pairs in per_reviewer.items()},
            "pooled": _figures([pair for pairs in per_reviewer.values() for pair in pairs], classes),
            "agreement": _agreement(item_ids, reviewers),
        }
    return {
        "format": SCORES_FORMAT,
        "kit": key.kit,
        "run": key.run,
        "site": key.site,
        "n_reviewers": len(reviewers),
        "confidence": CONFIDENCE,
        "scored_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "modalities": modalities,
    }


# --------------------------------------------------------------------------- pooling sites


def _pool_proportions(parts: list[dict], *, test: bool = False) -> dict:
    k, n = sum(p["k"] for p in parts), sum(p["n"] for p in parts)
    pooled = proportion(k, n)
    return pooled | {"p_value": chance_p_value(k, n)} if test else pooled


def _pool_keyed(blocks: list[dict], *, test: bool) -> dict:
    keys = dict.fromkeys(key for block in blocks for key in block)
    return {key: _pool_proportions([b[key] for b in blocks if key in b], test=test) for key in keys}


def _pool_figures(figures: list[dict]) -> dict:
    readings = [f["reading"] for f in figures]
    per_class_reading = {}
    for name in dict.fromkeys(name for r in readings for name in r["per_class"]):
        present = [r["per_class"][name] for r in readings if name in r["per_class"]]
        per_class_reading[name] = {s: _pool_proportions([p[s] for p in present]) for s in (SYNTHETIC, REAL)}
    return {
        "n_answered": sum(f["n_answered"] for f in figures),
        "detection": _pool_proportions([f["detection"] for f in figures], test=True),
        "synthetic_called_synthetic": _pool_proportions([f["synthetic_called_synthetic"] for f in figures]),
        "real_called_real": _pool_proportions([f["real_called_real"] for f in figures]),
        "per_class": _pool_keyed([f["per_class"] for f in figures], test=True),
        "by_confidence": _pool_keyed([f["by_confidence"] for f in figures], test=True),
        "reading": {
            SYNTHETIC: _pool_proportions([r[SYNTHETIC] for r in readings]),
            REAL: _pool_proportions([r[REAL] for r in readings]),
            "per_class": per_class_reading,
        },
    }


def read_scores(path: str | Path) -> dict:
    """A site's SCORES.json (written by ``fedgen review score``)."""
    path = Path(path)
    scores = _read_json(path, "a site's review scores")
    _check_scores(scores, str(path))
    return scores


def _check_scores(scores: dict, where: str) -> None:
    if not isinstance(scores, dict) or scores.get("format") != SCORES_FORMAT:
        raise FedgenError(f"{where}: not a fedgen review scores file (format {SCORES_FORMAT})")


def pool_scores(
    site_scores: Sequence[dict], *, run_id: str | None = None, sources: Sequence[str] | None = None
) -> dict:
    """The review section of the audit report: every site's pooled figures summed into one.

    ``sources`` names each scores file (for messages); ``run_id``, when given, must be the run
    every kit was made from. A kit counted twice is refused.
    """
    sources = list(sources) if sources is not None else [f"scores {n}" for n in range(1, len(site_scores) + 1)]
    if not site_scores:
        raise FedgenError("no review scores given")
    kits: dict[str, str] = {}
    for scores, where in zip(site_scores, sources):
        _check_scores(scores, where)
        if run_id is not None and scores["run"] != run_id:
            raise FedgenError(f"{where}: scores a kit of run {scores['run']!r}, not of the audited run {run_id!r}")
        if scores["kit"] in kits:
            raise FedgenError(f"{where}: kit {scores['kit']} is already counted (from {kits[scores['kit']]})")
        kits[scores["kit"]] = where
    names = Counter(s["site"] for s in site_scores)

    def site_label(scores: dict) -> str:  # a site that made two kits shows each
        return scores["site"] if names[scores["site"]] == 1 else f"{scores['site']} (kit {scores['kit']})"

    modalities = {}
    for modality in dict.fromkeys(m for s in site_scores for m in s["modalities"]):
        present = [s for s in site_scores if modality in s["modalities"]]
        blocks = [s["modalities"][modality] for s in present]
        modalities[modality] = {
            "n_items": sum(b["n_items"] for b in blocks),
            "n_reviewers": sum(s["n_reviewers"] for s in present),
            "pooled": _pool_figures([b["pooled"] for b in blocks]),
            "sites": {
                site_label(s): {
                    "n_items": b["n_items"],
                    "n_reviewers": s["n_reviewers"],
                    "detection": b["pooled"]["detection"],
                    "reviewers": {label: f["detection"] for label, f in b["reviewers"].items()},
                    "reading": {k: b["pooled"]["reading"][k] for k in (SYNTHETIC, REAL)},
                    "agreement": b["agreement"],
                }
                for s, b in zip(present, blocks)
            },
        }
    return {"confidence": CONFIDENCE, "sites": sorted(map(site_label, site_scores)), "modalities": modalities}
