"""What a site says about its own membership-attack scores: summaries, ε bounds, histograms.

A site scores its train split (members) against its held-out split (non-members). The scores
themselves never leave it; these functions turn them into what may: per attack the exact
attack summary, the empirical ε lower bound, the central range of the scores (never a minimum
or maximum: that is one record's score), and member / non-member counts on bin edges shared by
every site, which the coordinator sums into the pooled ROC curve.
"""

from __future__ import annotations

import numpy as np

from fedgen.audits.empirical_eps import empirical_epsilon
from fedgen.audits.fidelity import require_min_count
from fedgen.audits.mia import attack_metrics, score_histogram

__all__ = ["Scores", "SCORE_RANGE_QUANTILES", "score_range", "attack_summaries", "score_histograms"]

Scores = dict[str, tuple[np.ndarray, np.ndarray]]  # attack -> (member scores, non-member scores)

# Where the central range of a site's scores is cut: the tails fall into the end bins of the
# shared histogram. The range of every score is not sent: a minimum or maximum is one record's.
SCORE_RANGE_QUANTILES = (0.05, 0.95)


def score_range(members: np.ndarray, nonmembers: np.ndarray) -> list[float]:
    """The central range of one attack's scores (``SCORE_RANGE_QUANTILES``)."""
    scores = np.r_[members, nonmembers]
    require_min_count(len(scores), what="attack score range")
    return [float(q) for q in np.quantile(scores, SCORE_RANGE_QUANTILES)]


def attack_summaries(scores: Scores, *, delta: float) -> dict:
    """Per attack: the exact summary, the ε lower bound and the central score range.

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
            "score_range": score_range(members, nonmembers),
        }
    return result


def score_histograms(scores: Scores, edges: dict[str, np.ndarray]) -> dict:
    """Member and non-member counts per attack on the coordinator's shared edges."""
    return {
        name: {
            "members": score_histogram(members, edges[name]),
            "nonmembers": score_histogram(nonmembers, edges[name]),
        }
        for name, (members, nonmembers) in scores.items()
    }
