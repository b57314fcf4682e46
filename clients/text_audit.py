"""The text audit at a site: attacks, canaries, memorisation, fidelity and utility on its OWN notes.

Called by fedgen.clients.site_audit with the decoded query; returns aggregates only (counts,
scalar summaries; see fedgen.audits.site_answers for the attack part).
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedgen.audits.bias import record_counts
from fedgen.audits.fidelity import MIN_AGGREGATE_COUNT, not_measurable, text_class_stats, text_embedding_stats
from fedgen.audits.mia import canary_exposure, text_attack_scores
from fedgen.audits.phi_replay import site_replay_audit
from fedgen.audits.site_answers import Scores, attack_summaries
from fedgen.audits.utility import text_utility
from fedgen.config import RunConfig
from fedgen.data.site import SiteData, split_indices, text_splits
from fedgen.errors import FedgenError
from fedgen.modalities import Modality
from fedgen.models.text import encode_examples, token_logprobs
from fedgen.privacy.plan import privacy_facts

__all__ = [
    "TEXT_ATTACKS",
    "NGRAM_N",
    "text_note_logprobs",
    "text_member_scores",
    "canary_exposure_at_site",
    "phi_replay_at_site",
    "text_memorisation",
    "text_site_audit",
]

TEXT_ATTACKS = ("loss", "zlib", "min_k")
TEXT_SCORE_BATCH = 16
CANARIES_FILE = "canaries.jsonl"
PHI_TRUTH_FILE = "phi_truth.jsonl"
SECRET_SLOT = "{secret}"
CANARY_CANDIDATES = 100  # random secrets of the canary's format the canary is ranked against
NGRAM_N = 8  # words: a shared 8-gram is a copied phrase, not a shared habit of style
# Planted PHI values shorter than this ("May", "Li") turn up by chance; they are not matched.
MIN_MATCH_CHARS = 6
WORD_PATTERN = re.compile(r"\w+")


@torch.no_grad()
def text_note_logprobs(model, dataset: TensorDataset) -> list[np.ndarray]:
    """Per example, the log-probs of the note's tokens (those under its loss mask). A fourth
    tensor in ``dataset`` holds the frozen lower layers' outputs (``Modality.training_set``)."""
    model.eval()
    out = []
    for start in range(0, len(dataset), TEXT_SCORE_BATCH):
        input_ids, attention_mask, loss_mask, *lower_states = dataset[start : start + TEXT_SCORE_BATCH]
        logprobs = token_logprobs(model, input_ids, attention_mask, loss_mask, *lower_states)
        out += [row[mask.bool()].double().numpy() for row, mask in zip(logprobs, loss_mask)]
    return out


def text_member_scores(modality: Modality, site: SiteData, model) -> Scores:
    """Loss, zlib and min-k scores of the site's train (members) and held-out (non-members) notes.

    The members' frozen lower-layer outputs come from the site's training cache
    (``Modality.training_set``): the values running those layers again would give, not computed
    a second time."""
    records = text_splits(site, seed=modality.config.data.split_seed)
    train_set, heldout_set = modality.datasets(site)
    per_split = [
        text_attack_scores(text_note_logprobs(model, dataset), [text for text, _ in split])
        for dataset, split in zip((modality.training_set(model, train_set), heldout_set), records)
    ]
    return {name: (per_split[0][name], per_split[1][name]) for name in TEXT_ATTACKS}


def _read_jsonl(path: Path) -> list[dict]:
    """A demo side file (canaries.jsonl, phi_truth.jsonl); absent = empty."""
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise FedgenError(f"{path} line {number}: not valid JSON ({err.msg})") from None
    return rows


def _train_indices(site: SiteData, config: RunConfig) -> set[int]:
    train, _ = split_indices(site.text_labels, heldout_fraction=site.heldout_fraction, seed=config.data.split_seed)
    return set(train.tolist())


def _trained_canaries(site: SiteData, config: RunConfig) -> list[dict]:
    """The site's canaries that sit in its train split (a held-out canary was never seen)."""
    train = _train_indices(site, config)
    return [c for c in _read_jsonl(site.root / CANARIES_FILE) if c["index"] in train]


def _random_like(secret: str, rng: random.Random) -> str:
    """A random string of the secret's format: digits, lower- and upper-case letters redrawn."""

    def redraw(char: str) -> str:
        if char in string.digits:
            return rng.choice(string.digits)
        if char in string.ascii_lowercase:
            return rng.choice(string.ascii_lowercase)
        if char in string.ascii_uppercase:
            return rng.choice(string.ascii_uppercase)
        return char

    return "".join(redraw(char) for char in secret)


def _candidate_secrets(secret: str, *, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    candidates: set[str] = set()
    while len(candidates) < n:
        candidate = _random_like(secret, rng)
        if candidate != secret:
            candidates.add(candidate)
    return sorted(candidates)


def _note_losses(model, modality: Modality, records: list[tuple[str, str]]) -> np.ndarray:
    """Mean note NLL of (label name, note) records."""
    dataset = encode_examples(
        modality.tokenizer(),
        records,
        prompts=modality.prompts(),
        max_length=modality.config.text.max_length,
    )
    return np.array([-lp.mean() for lp in text_note_logprobs(model, dataset)])


def canary_exposure_at_site(modality: Modality, site: SiteData, model, *, candidates: int = CANARY_CANDIDATES) -> dict:
    """The largest exposure among the site's trained canaries (None when it has none).

    Each canary is ranked by loss among ``candidates`` notes of its template with random
    secrets of the same format.
    """
    canaries = _trained_canaries(site, modality.config)
    if not canaries:
        return {"exposure": None, "n_canaries": 0, "candidates": candidates}
    exposures = []
    for k, canary in enumerate(canaries):
        secrets = [canary["secret"], *_candidate_secrets(canary["secret"], n=candidates, seed=modality.config.seed + k)]
        notes = [canary["template"].replace(SECRET_SLOT, s) for s in secrets]
        losses = _note_losses(model, modality, [(canary["label"], note) for note in notes])
        exposures.append(canary_exposure(float(losses[0]), losses[1:]))
    return {"exposure": max(exposures), "n_canaries": len(canaries), "candidates": candidates}


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = WORD_PATTERN.findall(text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _train_truth(site: SiteData, train_index: Sequence[int]) -> list[dict] | None:
    """The site's phi_truth.jsonl rows of train notes, re-indexed into the train list (None: no file)."""
    path = site.root / PHI_TRUTH_FILE
    if not path.is_file():
        return None
    position = {index: k for k, index in enumerate(train_index)}
    return [row | {"index": position[row["index"]]} for row in _read_jsonl(path) if row["index"] in position]


def phi_replay_at_site(synthetic_texts: Sequence[str], site: SiteData, config: RunConfig) -> dict:
    """The site's own PHI replayed in the synthetic texts (fedgen.audits.phi_replay): its train
    notes scanned with the audit's detector, with or without a truth file. Counts only."""
    from fedgen.audits.phi import default_analyzer  # spaCy and Presidio: only when a site audits text

    train_index = sorted(_train_indices(site, config))
    texts = [site.texts[i] for i in train_index]
    replay = site_replay_audit(texts, synthetic_texts, default_analyzer(), truth=_train_truth(site, train_index))
    result = {
        "phi_replay": replay["texts_with_replay"],
        "phi_replay_by_kind": replay["by_kind"],
        "phi_values_per_kind": replay["values_per_kind"],
    }
    if "detector_at_site" in replay:
        result["phi_detector_at_site"] = replay["detector_at_site"]
    return result


def text_memorisation(
    synthetic_texts: Sequence[str], site: SiteData, config: RunConfig, *, ngram_n: int = NGRAM_N
) -> dict:
    """How many synthetic texts reproduce something of this site's TRAIN split.

    - ``canary_reproductions``: texts containing the secret of a trained canary;
    - ``phi_replay``: texts containing an identifier the detector finds in the site's train
      notes, normalised (``phi_replay_at_site``; every site, no truth file needed);
    - ``planted_phi_reproductions``: texts containing a planted PHI value (phi_truth.jsonl) of a
      train record verbatim, of at least MIN_MATCH_CHARS characters (demo sites only);
    - ``ngram_copies``: texts sharing a ``ngram_n``-word sequence with a training note that no
      held-out note contains (phrases every note shares are style, not memorisation).
    """
    train_index = _train_indices(site, config)
    secrets = [c["secret"] for c in _trained_canaries(site, config)]
    phi_values = {
        row["value"]
        for row in _read_jsonl(site.root / PHI_TRUTH_FILE)
        if row["index"] in train_index and len(row["value"]) >= MIN_MATCH_CHARS
    }
    train_grams: set[tuple[str, ...]] = set()
    heldout_grams: set[tuple[str, ...]] = set()
    for i, text in enumerate(site.texts):
        (train_grams if i in train_index else heldout_grams).update(_ngrams(text, ngram_n))
    copied = train_grams - heldout_grams
    return {
        "canary_reproductions": sum(any(s in t for s in secrets) for t in synthetic_texts),
        **phi_replay_at_site(synthetic_texts, site, config),
        "planted_phi_reproductions": sum(any(v in t for v in phi_values) for t in synthetic_texts),
        "ngram_copies": sum(bool(_ngrams(t, ngram_n) & copied) for t in synthetic_texts),
        "ngram_n": ngram_n,
        "n_synthetic": len(synthetic_texts),
    }


def _if_enough(n: int, records: str, measure: Callable[[], dict]) -> dict:
    """``measure()`` when ``n`` records are enough for an aggregate, else what the site says instead."""
    return measure() if n >= MIN_AGGREGATE_COUNT else not_measurable(n, records)


def text_site_audit(modality: Modality, site: SiteData, model, *, synthetic: tuple[list[str], list[int]]) -> dict:
    """Attacks, canaries, memorisation, fidelity and utility of the synthetic texts on this site's notes.

    A small site answers every figure it can: one over fewer than MIN_AGGREGATE_COUNT records
    (the utility classifiers' held-out notes, the embedding statistics' notes, the attacks'
    scored notes) is answered by its count and why (``not_measurable``), never by an error."""
    config = modality.config
    names = config.data.text_classes
    train, heldout = text_splits(site, seed=config.data.split_seed)
    synthetic_texts, synthetic_labels = synthetic
    scores = text_member_scores(modality, site, model)

    def unzip(records):
        return [text for text, _ in records], [label for _, label in records]

    facts = privacy_facts(config, site)
    result = {
        **facts,
        "n_train": len(train),
        "n_heldout": len(heldout),
        "records": record_counts([label for _, label in train], [label for _, label in heldout], class_names=names),
        "attacks": _if_enough(
            len(train) + len(heldout),
            "train and held-out notes",
            lambda: attack_summaries(scores, delta=facts["delta"]),
        ),
        "canary_exposure": canary_exposure_at_site(modality, site, model),
        "memorisation": text_memorisation(synthetic_texts, site, config),
        "fidelity": {
            "embedding_stats": _if_enough(len(site.texts), "notes", lambda: text_embedding_stats(site.texts)),
            "class_stats": text_class_stats(site.texts, site.text_labels, class_names=names),
        },
        "utility": _if_enough(
            len(heldout),
            "held-out records",
            lambda: text_utility(
                unzip(train), unzip(heldout), (synthetic_texts, synthetic_labels), class_names=names, seed=config.seed
            ),
        ),
    }
    return result
