"""The privacy ledger: one row per site per modality per round, the source of truth for ε spent.

A row stores the site's cumulative ε after that round together with the round's own DP-SGD
parameters (σ, q, steps), so the cumulative ε can be recomputed independently from the rows.
SQLite keeps it durable across process restarts; the (site, modality, round) key makes a
replayed round an error instead of a silent double count.
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import astuple, dataclass, fields
from pathlib import Path

__all__ = ["LedgerEntry", "PrivacyLedger", "DuplicateRoundError"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rounds (
    site TEXT NOT NULL,
    modality TEXT NOT NULL,
    round INTEGER NOT NULL,
    epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    num_examples INTEGER NOT NULL,
    loss REAL,
    PRIMARY KEY (site, modality, round)
)
"""


class DuplicateRoundError(Exception):
    """A round was recorded twice for the same site: a replay, never to be counted again."""


@dataclass(frozen=True)
class LedgerEntry:
    site: str
    modality: str
    round: int
    epsilon: float  # cumulative ε of the site after this round (inf when trained without DP)
    delta: float
    noise_multiplier: float  # σ of this round (0 = no DP)
    sample_rate: float
    steps: int
    num_examples: int
    loss: float | None  # None under DP: the training loss stays at the site


def _to_sql(value):
    """SQLite stores inf as a REAL; NaN (a value a site did not send) becomes NULL."""
    return None if isinstance(value, float) and math.isnan(value) else value


class PrivacyLedger:
    """Durable ledger in a SQLite file; open it, record rows, query what each site spent."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute(_SCHEMA)

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
                f"round {entry.round} of {entry.site} ({entry.modality}) is already in the ledger"
            ) from None

    def entries(self, *, site: str | None = None, modality: str | None = None) -> list[LedgerEntry]:
        query = "SELECT * FROM rounds WHERE (? IS NULL OR site = ?) AND (? IS NULL OR modality = ?)"
        with self._connect() as db:
            rows = db.execute(
                query + " ORDER BY modality, site, round", (site, site, modality, modality)
            ).fetchall()
        return [LedgerEntry(*row) for row in rows]

    def spent(self, site: str, modality: str) -> float:
        """Cumulative ε of the site's latest recorded round (0 if it never trained)."""
        rows = self.entries(site=site, modality=modality)
        return rows[-1].epsilon if rows else 0.0

    def last_round(self, modality: str) -> int:
        rows = self.entries(modality=modality)
        return max((r.round for r in rows), default=0)

    def history(self, site: str, modality: str) -> list[tuple[float, float, int]]:
        """The (σ, q, steps) entries of the site's rounds, in the Opacus accountant's layout."""
        return [
            (r.noise_multiplier, r.sample_rate, r.steps)
            for r in self.entries(site=site, modality=modality)
        ]

    def sites(self) -> list[str]:
        with self._connect() as db:
            return [row[0] for row in db.execute("SELECT DISTINCT site FROM rounds ORDER BY site")]
