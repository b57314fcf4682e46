"""The public teaching-case corpus: seeded, balanced, short and free of PHI-like tokens."""

import re
from collections import Counter

import pytest

from fedgen.config import MENTAL_HEALTH_CLASSES
from fedgen.data.public_notes import PUBLIC_NOTE_SOURCE, make_public_notes
from fedgen.errors import FedgenError


@pytest.fixture(scope="module")
def notes():
    return make_public_notes(500, seed=7)


def test_same_seed_same_notes_different_seed_different():
    assert make_public_notes(50, seed=3) == make_public_notes(50, seed=3)
    assert make_public_notes(50, seed=3) != make_public_notes(50, seed=4)


@pytest.mark.parametrize("count", [1, 4, 5, 23, 500])
def test_counts_balanced_over_the_classes(count):
    labels = Counter(label for label, _ in make_public_notes(count, seed=0))
    assert sum(labels.values()) == count
    assert set(labels) <= set(MENTAL_HEALTH_CLASSES)
    per_class = [labels.get(c, 0) for c in MENTAL_HEALTH_CLASSES]
    assert max(per_class) - min(per_class) <= 1


def test_order_is_shuffled(notes):
    labels = [label for label, _ in notes[:25]]
    assert labels != [MENTAL_HEALTH_CLASSES[i % len(MENTAL_HEALTH_CLASSES)] for i in range(25)]


def test_notes_are_short_and_varied(notes):
    for _, text in notes:
        assert 25 <= len(text.split()) <= 120, text
        assert 3 <= len(re.findall(r"[.!?](?:\s|$)", text)) <= 6, text
    for cls in MENTAL_HEALTH_CLASSES:
        texts = [text for label, text in notes if label == cls]
        assert len(set(texts)) == len(texts), cls  # 100 notes per class, none repeated


def test_no_phi_like_tokens(notes):
    titles = re.compile(r"\b(Mr|Mrs|Ms|Miss|Dr)\b\.?")
    for _, text in notes:
        assert not re.search(r"\d{5,}", text), text
        assert "@" not in text and "http" not in text, text
        assert not re.search(r"\d{1,2}/\d{1,2}", text), text  # no dates
        assert not titles.search(text), text


def test_source_is_one_sentence():
    assert PUBLIC_NOTE_SOURCE.strip() and PUBLIC_NOTE_SOURCE.count(". ") == 0


@pytest.mark.parametrize("count", [0, -3])
def test_count_below_one_raises(count):
    with pytest.raises(FedgenError):
        make_public_notes(count, seed=0)
