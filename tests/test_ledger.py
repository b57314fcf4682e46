import math

import pytest

from fedgen.privacy.ledger import DuplicateRoundError, LedgerEntry, PrivacyLedger


def entry(site, rnd, eps, modality="image"):
    return LedgerEntry(site, modality, rnd, rnd, eps, eps, 1e-5, 1.1, 0.05, 20, 300, 0.5)


def test_one_row_per_site_per_round_survives_a_restart(tmp_path):
    path = tmp_path / "ledger.sqlite"
    ledger = PrivacyLedger(path)
    for rnd, eps in [(1, 0.8), (2, 1.3)]:
        ledger.record(entry("site-1", rnd, eps))
        ledger.record(entry("site-2", rnd, eps / 2))
    del ledger

    reopened = PrivacyLedger(path)
    assert len(reopened.entries()) == 4
    assert reopened.spent("site-1", "image") == pytest.approx(1.3)
    assert reopened.spent("site-2", "image") == pytest.approx(0.65)
    assert reopened.spent("site-3", "image") == 0.0
    assert reopened.last_round("image") == 2
    assert reopened.history("site-1", "image") == [(1.1, 0.05, 20), (1.1, 0.05, 20)]
    assert reopened.sites() == ["site-1", "site-2"]


def test_a_replayed_round_is_refused_not_double_counted(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    ledger.record(entry("site-1", 1, 0.8))
    with pytest.raises(DuplicateRoundError, match="update 1 of site-1"):
        ledger.record(entry("site-1", 1, 0.9))
    assert [e.epsilon for e in ledger.entries()] == [0.8]


def test_modalities_are_kept_apart_and_inf_is_stored(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    ledger.record(entry("site-1", 1, math.inf, modality="text"))
    ledger.record(entry("site-1", 1, 2.0, modality="image"))
    assert math.isinf(ledger.spent("site-1", "text"))
    assert ledger.spent("site-1", "image") == 2.0


def test_a_loss_the_site_kept_private_is_stored_as_missing(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    ledger.record(LedgerEntry("site-1", "image", 1, 1, 1.0, 1.0, 1e-5, 1.1, 0.05, 20, 300, math.nan))
    assert ledger.entries()[0].loss is None


def test_the_site_total_is_its_latest_update_across_modalities(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    ledger.record(entry("site-1", 1, 2.0, modality="image"))
    ledger.record(LedgerEntry("site-1", "text", 1, 1, 3.1, 1.5, 1e-5, 1.3, 0.1, 10, 200, None))
    assert ledger.site_spent("site-1") == 3.1
    assert ledger.spent("site-1", "image") == 2.0
    assert ledger.histories("site-1") == {"image": [(1.1, 0.05, 20)], "text": [(1.3, 0.1, 10)]}


def test_a_ledger_of_an_older_layout_is_one_line(tmp_path):
    import sqlite3

    from fedgen.errors import FedgenError

    path = tmp_path / "ledger.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE rounds (site TEXT, modality TEXT, round INTEGER, epsilon REAL)")
    with pytest.raises(FedgenError, match="written by an older fedgen"):
        PrivacyLedger(path)
