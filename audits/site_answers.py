"""What a site says about its own membership-attack scores: summaries, ε bounds, histograms.

A site scores its train split (members) against its held-out split (non-members). The scores
themselves never leave it; these functions turn them into what may: per attack the exact
attack summary, the empirical ε lower bound and one histogram of member / non-member counts
whose bins THE SITE chooses, so that no bin singles out a record:

- at most ``SITE_HISTOGRAM_BINS`` bins, two of them open-ended: its inner edges are fixed
  quantiles of all its scores (members and non-members together: an edge says nothing of
  membership), finest in the upper tail, each rounded to 1% of the central spread;
- adjacent bins are merged until every bin holds at least ``MIN_BIN_RECORDS`` records.

Whatever edges a coordinator would like, a bin never tells it more than "at least k records
scored in this range, so many of them members". The coordinator pools the sites' histograms
(fedgen.audits.pooling) into the pooled ROC curve and ε bound.
"""

from __future__ import annotations

import math

import numpy as np

from fedgen.audits.empirical_eps import empirical_epsilon
from fedgen.audits.fidelity import require_min_count
from fedgen.audits.mia import attack_metrics, score_histogram

__all__ = ["Scores", "SITE_HISTOGRAM_BINS", "MIN_BIN_RECORDS", "site_histogram", "attack_summaries"]

Scores = dict[str, tuple[np.ndarray, np.ndarray]]  # attack -> (member scores, non-member scores)

MIN_BIN_RECORDS = 5  # k: every bin of a site's histogram holds at least this many records
# Where a site's inner edges sit: quantiles of its scores, finest in the upper tail, where a
# threshold attack at low FPR draws its line (higher score = member).
EDGE_QUANTILES = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999)
SITE_HISTOGRAM_BINS = len(EDGE_QUANTILES) + 1  # at most; fewer when bins merge
# Edges are rounded to this fraction of the central 90% of the site's scores.
EDGE_RESOLUTION = 0.01


def _coarse_quantiles(scores: np.ndarray) -> np.ndarray:
    """The inner edges: ``EDGE_QUANTILES`` of the scores, rounded to a coarse grid, distinct."""
    low, high = np.quantile(scores, (0.05, 0.95))
    spread = high - low if high > low else max(abs(low), 1.0)
    step = float(f"{spread * EDGE_RESOLUTION:.0e}")  # one significant digit
    decimals = max(0, -math.floor(math.log10(step)))
    return np.unique(np.round(np.round(np.quantile(scores, EDGE_QUANTILES) / step) * step, decimals))


def site_histogram(members: np.ndarray, nonmembers: np.ndarray, *, min_records: int = MIN_BIN_RECORDS) -> dict:
    """``{"edges", "members", "nonmembers"}``: the site's own bins (first and last edge infinite),
    every bin holding at least ``min_records`` of the site's records."""
    scores = np.r_[members, nonmembers]
    require_min_count(len(scores), what="attack score histogram")
    edges = np.r_[-np.inf, _coarse_quantiles(scores), np.inf]
    totals = score_histogram(scores, edges)
    keep, group = [0], 0  # indices of the edges kept; records in the bin being filled
    for i, n in enumerate(totals[:-1]):
        group += n
        if group >= min_records:
            keep.append(i + 1)
            group = 0
    if group + totals[-1] < min_records and len(keep) > 1:
        keep.pop()  # the last bin is too small: merged into the one before
    edges = edges[[*keep, len(edges) - 1]]
    return {
        "edges": edges,
        "members": score_histogram(members, edges),
        "nonmembers": score_histogram(nonmembers, edges),
    }


def attack_summaries(scores: Scores, *, delta: float) -> dict:
    """Per attack: the exact summary, the ε lower bound and the site's histogram.

    The ε bound's threshold (one record's score) is left out.
    """
    result = {}
    for name, (members, nonmembers) in scores.items():
        bound = empirical_epsilon(members, nonmembers, delta=delta)
        result[name] = {
            "summary": attack_metrics(members, nonmembers).to_dict(),
            "empirical_epsilon": {
                "eps_lb": bound.eps_lb,
                "max_certifiable": bound.max_certifiable,
                "n_members": bound.n_members,
                "n_nonmembers": bound.n_nonmembers,
                "delta": bound.delta,
            },
            "histogram": site_histogram(members, nonmembers),
        }
    return result
