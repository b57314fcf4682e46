"""How many held-out records the audit's figures need, and a warning for every split with fewer.

A site's held-out split is what the audit measures against: the membership attacks score its
records as non-members, and the utility classifiers are tested on them. With too few, a figure
the release policy gates cannot be measured (it is null and its check fails) or a site cannot
answer at all; ``fedgen data check`` says so before any training, the report after the audit.

- TPR at 1% FPR resolves 1% only over at least 100 non-members, pooled over the sites
  (``NONMEMBERS_FOR_TPR_AT_1PCT``); with fewer it is null and the policy's check fails.
- A site answers the utility audit only over at least ``MIN_AGGREGATE_COUNT`` held-out records
  (an aggregate must not single out a record).
- Per-class F1 leaves out a class with fewer than ``MIN_CLASS_SUPPORT`` held-out records.
"""

from __future__ import annotations

import math

from fedgen.audits.fidelity import MIN_AGGREGATE_COUNT
from fedgen.audits.mia import FPR_LEVEL_1PCT
from fedgen.audits.utility import MIN_CLASS_SUPPORT

__all__ = ["NONMEMBERS_FOR_TPR_AT_1PCT", "site_heldout_warnings", "pooled_heldout_warnings"]

NONMEMBERS_FOR_TPR_AT_1PCT = math.ceil(1 / FPR_LEVEL_1PCT)


def site_heldout_warnings(modality: str, heldout_per_class: dict[str, int], *, site: str) -> list[str]:
    """Warnings for one site's held-out split of ``modality`` (class name -> held-out records)."""
    n = sum(heldout_per_class.values())
    warnings = []
    if n < MIN_AGGREGATE_COUNT:
        warnings.append(
            f"{site}: {n} held-out {modality} records; the site answers the utility audit only over "
            f"at least {MIN_AGGREGATE_COUNT} (add records or raise heldout_fraction in site.toml)"
        )
    if n < NONMEMBERS_FOR_TPR_AT_1PCT:
        warnings.append(
            f"{site}: {n} held-out {modality} records; TPR at 1% FPR needs at least "
            f"{NONMEMBERS_FOR_TPR_AT_1PCT} over the consortium (the other sites must hold out "
            f"{NONMEMBERS_FOR_TPR_AT_1PCT - n} more together), or it is not measured and the release gate refuses"
        )
    few = [f"{name} ({k})" for name, k in heldout_per_class.items() if 0 < k < MIN_CLASS_SUPPORT]
    if few:
        warnings.append(
            f"{site}: per-class F1 of {modality} leaves out classes with fewer than {MIN_CLASS_SUPPORT} "
            f"held-out records: {', '.join(few)}"
        )
    return warnings


def pooled_heldout_warnings(modality: str, nonmembers: int) -> list[str]:
    """Warnings for the consortium's pooled held-out records of ``modality`` (the audit's non-members)."""
    if nonmembers >= NONMEMBERS_FOR_TPR_AT_1PCT:
        return []
    return [
        f"{modality}: {nonmembers} held-out records over all sites; TPR at 1% FPR needs at least "
        f"{NONMEMBERS_FOR_TPR_AT_1PCT} and is not measured (the release gate refuses a figure it "
        "cannot see): add records or raise the held-out fraction"
    ]
