"""Site-side PHI replay: do synthetic texts contain identifiers from a site's own training notes?

Every site runs this on its own records, with no truth file: it scans its TRAINING notes with
the audit's detector, keeps the values it finds (they never leave the site), and counts the
synthetic texts that contain any of them. Only counts leave the site. Where a site has a truth
file of its planted PHI (the demo's ``phi_truth.jsonl``), the detector is also scored against it
there, as aggregate recall and precision per kind.

Matching is normalised, so a model that re-formats what it memorised is still caught:

- names, street addresses, e-mail addresses and URLs compare case-folded, accents and
  punctuation removed, whitespace collapsed, on word boundaries ("MARIA  LÓPEZ" = "Maria Lopez");
- phones compare as their last 9 digits (any country code or trunk prefix: "+44 20 7946 0958"
  = "020 7946 0958"); dates and identifiers as their digits, within one run of digits and
  separators of the synthetic text ("(617) 555-0143" = "617.555.0143" = "+1 617 555 0143";
  "03/04/2024" = "3.4.2024", but not "13.4.2024"), and identifiers with letters as their letters and digits
  ("AB-123 456" = "ab123456").

A value that turns up by chance is not replay: single words (a first name, a surname, a city),
postal codes and ages are not matched alone, and a value needs ``MIN_CHARS`` characters or
``MIN_DIGITS`` digits. Written dates match as text ("March 14, 2024"); a date needs its year.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import regex

from fedgen.audits.phi_lexicon import fold

__all__ = [
    "MIN_CHARS",
    "MIN_DIGITS",
    "ReplayKey",
    "SitePhi",
    "normalise_text",
    "digit_forms",
    "replay_keys",
    "count_replays",
    "site_replay_audit",
]

MIN_CHARS = 6  # "May", "Li", "Ann Li" is 6: below this a match is chance
MIN_DIGITS = 6  # a phone, a full date or an identifier has at least this many digits
PHONE_SUFFIX_DIGITS = 9  # a phone's last 9 digits: the number without country code or trunk 0
TEXT_KINDS = ("PERSON", "STREET_ADDRESS", "EMAIL_ADDRESS", "URL")
DIGIT_KINDS = ("PHONE_NUMBER", "DATE_TIME", "MEDICAL_RECORD_NUMBER", "US_SSN", "HEALTH_PLAN_NUMBER",
               "ACCOUNT_NUMBER", "LICENSE_NUMBER", "VEHICLE_ID", "DEVICE_ID", "IP_ADDRESS")  # fmt: skip
ID_KINDS = (
    "MEDICAL_RECORD_NUMBER",
    "HEALTH_PLAN_NUMBER",
    "ACCOUNT_NUMBER",
    "LICENSE_NUMBER",
    "VEHICLE_ID",
    "DEVICE_ID",
)
MULTI_WORD_KINDS = ("PERSON", "STREET_ADDRESS")  # one word of them alone is not specific

_NOT_WORD = regex.compile(r"[^\p{L}\p{N}]+")
_DIGIT_RUN = regex.compile(r"\d(?:[\d \t().\-/+]*\d)?")
_DIGIT_GROUP = regex.compile(r"\d+")
_YEAR = regex.compile(r"(?<!\d)(?:1[89]|20)\d\d(?!\d)")


def normalise_text(value: str) -> str:
    """Case-folded, accents removed, every run of non-letters and non-digits one space."""
    return _NOT_WORD.sub(" ", fold(value)).strip()


def digit_forms(value: str) -> tuple[str, str]:
    """The digits of ``value``, and its digit groups without leading zeros, dash-joined
    ("03/04/2024" -> "03042024", "3-4-2024")."""
    groups = _DIGIT_GROUP.findall(value)
    return "".join(groups), "-".join(g.lstrip("0") or "0" for g in groups)


def _alnum(value: str) -> str:
    return "".join(c for c in fold(value) if c.isalnum())


@dataclasses.dataclass(frozen=True)
class ReplayKey:
    """One normalised form of a PHI value: ``form`` is "text", "digits", "groups" or "alnum"."""

    kind: str
    form: str
    key: str


def replay_keys(kind: str, value: str) -> list[ReplayKey]:
    """The forms under which ``value`` (found as ``kind``) is looked for; none when it is too
    common or too short to identify anyone."""
    keys = []
    text = normalise_text(value)
    if kind in TEXT_KINDS or (kind == "DATE_TIME" and regex.search(r"\p{L}", value)):
        words = text.split()
        long_enough = len(text) >= MIN_CHARS and (kind not in MULTI_WORD_KINDS or len(words) >= 2)
        dated = kind != "DATE_TIME" or _YEAR.search(value) is not None
        if long_enough and dated:
            keys.append(ReplayKey(kind, "text", text))
    if kind in DIGIT_KINDS:
        digits, groups = digit_forms(value)
        if kind == "PHONE_NUMBER" and len(digits) >= PHONE_SUFFIX_DIGITS:
            # The subscriber part, whatever the prefix: "+44 20 7946 0958" = "020 7946 0958".
            keys.append(ReplayKey(kind, "digits", digits[-PHONE_SUFFIX_DIGITS:]))
        elif len(digits) >= MIN_DIGITS:
            keys.append(ReplayKey(kind, "digits", digits))
            keys.append(ReplayKey(kind, "groups", groups))
    if kind in ID_KINDS:
        alnum = _alnum(value)
        if len(alnum) >= MIN_CHARS and any(c.isalpha() for c in alnum) and any(c.isdigit() for c in alnum):
            keys.append(ReplayKey(kind, "alnum", alnum))
    return keys


class _Haystack:
    """The forms of one synthetic text that keys are looked up in."""

    def __init__(self, text: str) -> None:
        self.text = f" {normalise_text(text)} "
        runs = [digit_forms(m.group()) for m in _DIGIT_RUN.finditer(text)]
        self.digits = [r[0] for r in runs]
        self.groups = [r[1] for r in runs]
        self.alnum = _alnum(text)

    def contains(self, key: ReplayKey) -> bool:
        if key.form == "text":
            return f" {key.key} " in self.text
        if key.form == "digits":
            return any(key.key in run for run in self.digits)
        if key.form == "groups":  # whole groups in order: "3-4-2024" is not in "13-4-2024"
            return any(f"-{key.key}-" in f"-{run}-" for run in self.groups)
        return key.key in self.alnum


@dataclasses.dataclass(frozen=True)
class SitePhi:
    """The normalised PHI values of a site's training notes. Stays at the site."""

    keys: frozenset[ReplayKey]

    @classmethod
    def from_values(cls, values: Iterable[tuple[str, str]]) -> SitePhi:
        """From (kind, value) pairs."""
        return cls(frozenset(k for kind, value in values for k in replay_keys(kind, value)))

    @classmethod
    def from_findings(cls, texts: Sequence[str], findings: Iterable) -> SitePhi:
        """From a scan's findings (``index``, ``entity_type``, ``start``, ``end``) of ``texts``."""
        return cls.from_values((f.entity_type, texts[f.index][f.start : f.end]) for f in findings)

    def kinds_in(self, text: str) -> set[str]:
        """The kinds of this site's values that ``text`` contains."""
        haystack = _Haystack(text)
        return {key.kind for key in self.keys if haystack.contains(key)}

    def values_per_kind(self) -> dict[str, int]:
        """How many distinct values of each kind the site holds (a count, safe to report)."""
        counts: dict[str, set[str]] = {}
        for key in self.keys:
            if key.form in ("text", "digits"):
                counts.setdefault(key.kind, set()).add(key.key)
        return {kind: len(values) for kind, values in sorted(counts.items())}


def count_replays(synthetic_texts: Sequence[str], site_phi: SitePhi) -> dict:
    """Counts only: ``texts_with_replay`` (synthetic texts holding any of the site's values) and
    ``by_kind`` (texts holding a value of that kind), with the number of texts checked."""
    with_replay = 0
    by_kind: dict[str, int] = {}
    for text in synthetic_texts:
        kinds = site_phi.kinds_in(text)
        with_replay += bool(kinds)
        for kind in kinds:
            by_kind[kind] = by_kind.get(kind, 0) + 1
    return {
        "texts_with_replay": with_replay,
        "by_kind": dict(sorted(by_kind.items())),
        "n_synthetic": len(synthetic_texts),
    }


def site_replay_audit(
    training_texts: Sequence[str], synthetic_texts: Sequence[str], analyzer, *, truth: Sequence[dict] | None = None
) -> dict:
    """The site's replay figures: its training notes scanned with ``analyzer`` (a
    ``fedgen.audits.phi.PhiAnalyzer``), their values looked for in the synthetic texts.

    Returns counts only (``count_replays`` plus ``values_per_kind`` and the detector's
    ``engine``); with ``truth`` (spans indexed into ``training_texts``), also
    ``detector_at_site``: the detector's recall and precision per kind on this site's notes.
    """
    from fedgen.audits.phi import scan, score_against_truth  # Presidio and spaCy: only when a site scans

    findings = scan(analyzer, training_texts)
    site_phi = SitePhi.from_findings(training_texts, findings)
    result = {
        **count_replays(synthetic_texts, site_phi),
        "values_per_kind": site_phi.values_per_kind(),
        "engine": analyzer.engine,
    }
    if truth is not None:
        result["detector_at_site"] = score_against_truth(findings, truth)
    return result
