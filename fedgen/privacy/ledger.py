"""The privacy ledger: one row per update a site released, the source of truth for ε spent.

A row stores the site's ε after that update, all modalities composed (``site_epsilon``, the
figure the site signs for), the modality's own ε, and the update's DP-SGD parameters
(σ, q, steps) with the accountant and composition that turn them into ε, so every recorded ε
can be recomputed from the rows alone (:func:`recompute_site_epsilon`). SQLite keeps it
durable across process restarts. Rows are keyed by (site, modality, release), the site's
count of its updates: a replayed update is an error instead of a silent double count, and an
update whose reply was lost (a coordinator crash) is recorded when the site's next reply
lists it, as a ``lost`` row without ε of its own.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Mapping
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from fedgen.errors import FedgenError
from fedgen.privacy.accounting import ACCOUNTANTS, HistoryEntry, epsilon_from_history
from fedgen.privacy.plan import DIFFERENT_PEOPLE, SAME_PEOPLE

__all__ = ["LedgerEntry", "PrivacyLedger", "DuplicateRoundError", "recompute_site_epsilon", "recompute_snippet"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rounds (
    site TEXT NOT NULL,
    modality TEXT NOT NULL,
    round INTEGER NOT NULL,
    release INTEGER NOT NULL,
    site_epsilon REAL,
    epsilon REAL,
    delta REAL NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    num_examples INTEGER NOT NULL,
    loss REAL,
    accountant TEXT NOT NULL,
    composition TEXT NOT NULL,
    lost INTEGER NOT NULL,
    PRIMARY KEY (site, modality, release)
)
"""


class DuplicateRoundError(Exception):
    """An update was recorded twice for the same site: a replay, never to be counted again."""


@dataclass(frozen=True)
class LedgerEntry:
    site: str
    modality: str
    round: int  # the coordinator's round the update was recorded in
    release: int  # the site's n-th released update of this modality in the run
    site_epsilon: float | None  # the site's ε after this update, all modalities (None: lost)
    epsilon: float | None  # this modality's ε alone after this update (None: lost)
    delta: float
    noise_multiplier: float  # σ of this update (0 = no DP)
    sample_rate: float
    steps: int
    num_examples: int
    loss: float | None  # None under DP: the training loss stays at the site
    accountant: str = "rdp"  # Opacus' accountant that composes the rows: "rdp" or "prv"
    composition: str = SAME_PEOPLE  # how the site's modalities compose (fedgen.privacy.plan)
    lost: bool = False  # the reply never reached the coordinator; the site listed it later

    @property
    def entry(self) -> HistoryEntry:
        return (self.noise_multiplier, self.sample_rate, self.steps)

    @classmethod
    def from_metrics(
        cls, site: str, modality: str, round: int, metrics: Mapping[str, float], *, accountant: str
    ) -> LedgerEntry:
        """The row of an update from the metrics a site sends with it (fedgen.clients.local)."""
        m = metrics
        return cls(
            site=site,
            modality=modality,
            round=round,
            release=int(m["release"]),
            site_epsilon=float(m["site-epsilon"]),
            epsilon=float(m["epsilon"]),
            delta=float(m["delta"]),
            noise_multiplier=float(m["noise-multiplier"]),
            sample_rate=float(m["sample-rate"]),
            steps=int(m["steps"]),
            num_examples=int(m["num-examples"]),
            loss=float(m["loss"]),
            accountant=accountant,
            composition=DIFFERENT_PEOPLE if m["different-people"] else SAME_PEOPLE,
        )


def _to_sql(value):
    """SQLite stores inf as a REAL; NaN (a value a site did not send) becomes NULL."""
    return None if isinstance(value, float) and math.isnan(value) else value


def _from_row(row) -> LedgerEntry:
    *values, lost = row
    return LedgerEntry(*values, lost=bool(lost))


def recompute_site_epsilon(rows: list[LedgerEntry]) -> float:
    """A site's ε from its rows alone (every modality, lost updates included), as recorded."""
    if not rows:
        return 0.0
    last = rows[-1]
    if last.composition == DIFFERENT_PEOPLE:
        modalities = {r.modality for r in rows}
        return max(
            epsilon_from_history(
                [r.entry for r in rows if r.modality == m], delta=last.delta, accountant=last.accountant
            )
            for m in modalities
        )
    return epsilon_from_history([r.entry for r in rows], delta=last.delta, accountant=last.accountant)


def recompute_snippet(path: Path, site: str, *, delta: float, accountant: str) -> str:
    """Python that recomputes a site's ε (same people) from the ledger file with Opacus alone."""
    name = ACCOUNTANTS[accountant].__name__
    return "\n".join([
        "import sqlite3",
        f"from opacus.accountants import {name}",
        f"rows = sqlite3.connect({str(path)!r}).execute(",
        f"    'SELECT noise_multiplier, sample_rate, steps FROM rounds WHERE site = ?', ({site!r},)).fetchall()",
        f"accountant = {name}()",
        "accountant.history = rows",
        f"print(accountant.get_epsilon(delta={delta!r}))",
    ])  # fmt: skip


class PrivacyLedger:
    """Durable ledger in a SQLite file; open it, record rows, query what each site spent."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute(_SCHEMA)
            columns = [row[1] for row in db.execute("PRAGMA table_info(rounds)")]
        if columns != [f.name for f in fields(LedgerEntry)]:
            raise FedgenError(f"{self.path} was written by an older fedgen; use that version for its run")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def record(self, entry: LedgerEntry) -> None:
        columns = ", ".join(f.name for f in fields(LedgerEntry))
        marks = ", ".join("?" for _ in fields(LedgerEntry))
        try:
            with self._connect() as db:
                db.execute(
                    f"INSERT INTO rounds ({columns}) VALUES ({marks})",
                    tuple(_to_sql(v) for v in astuple(entry)),
                )
        except sqlite3.IntegrityError:
            raise DuplicateRoundError(
                f"update {entry.release} of {entry.site} ({entry.modality}) is already in the ledger"
            ) from None

    def entries(self, *, site: str | None = None, modality: str | None = None) -> list[LedgerEntry]:
        """Rows in the order they were recorded."""
        query = "SELECT * FROM rounds WHERE (? IS NULL OR site = ?) AND (? IS NULL OR modality = ?)"
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY rowid", (site, site, modality, modality)).fetchall()
        return [_from_row(row) for row in rows]

    def spent(self, site: str, modality: str) -> float:
        """This modality's ε alone after the site's latest reported update (0 if none)."""
        rows = [r for r in self.entries(site=site, modality=modality) if not r.lost]
        return rows[-1].epsilon if rows else 0.0

    def site_spent(self, site: str) -> float:
        """The site's ε after its latest reported update, all modalities (0 if none)."""
        rows = [r for r in self.entries(site=site) if not r.lost]
        return rows[-1].site_epsilon if rows else 0.0

    def last_round(self, modality: str) -> int:
        rows = self.entries(modality=modality)
        return max((r.round for r in rows), default=0)

    def history(self, site: str, modality: str) -> list[HistoryEntry]:
        """The (σ, q, steps) of the site's updates of one modality, in the Opacus accountant's layout."""
        return [r.entry for r in sorted(self.entries(site=site, modality=modality), key=lambda r: r.release)]

    def histories(self, site: str) -> dict[str, list[HistoryEntry]]:
        """The site's history per modality (what fedgen.privacy.plan.SiteAccount composes)."""
        modalities = dict.fromkeys(r.modality for r in self.entries(site=site))
        return {modality: self.history(site, modality) for modality in modalities}

    def sites(self) -> list[str]:
        with self._connect() as db:
            return [row[0] for row in db.execute("SELECT DISTINCT site FROM rounds ORDER BY site")]
