"""Replace the PHI-like spans of synthetic texts before release: typed placeholders or
consistent surrogates.

A real language model invents names, dates and phone numbers that belong to no patient; a
policy may release such texts once those spans are replaced (``audits/policy.toml``, ``[phi]
action``). Only the detected spans change: every character outside them is kept as it was.

- ``placeholder``: each span becomes its kind's tag, "[NAME]", "[DATE]", "[PHONE]", ...
- ``surrogate``: each span becomes a fake value of its kind, the same one wherever the same
  value (normalised) recurs in the release, so a reader still sees that two notes name the same
  person. Surrogates are drawn from Faker, seeded by an HMAC of the value under a key made for
  this release and never stored: they cannot be turned back into the value. An age over 89
  becomes "90+" (Safe Harbor's own aggregation); identifiers keep their shape with letters and
  digits redrawn.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import secrets
import string
from collections.abc import Iterable, Sequence

from fedgen.audits.phi_replay import normalise_text

__all__ = ["ACTIONS", "PLACEHOLDERS", "Surrogates", "replace_spans", "redact_texts"]

ACTIONS = ("refuse", "placeholder", "surrogate")
PLACEHOLDERS = {
    "PERSON": "[NAME]",
    "DATE_TIME": "[DATE]",
    "AGE": "[AGE 90+]",
    "PHONE_NUMBER": "[PHONE]",
    "EMAIL_ADDRESS": "[EMAIL]",
    "STREET_ADDRESS": "[ADDRESS]",
    "LOCATION": "[PLACE]",
    "POSTAL_CODE": "[POSTCODE]",
    "MEDICAL_RECORD_NUMBER": "[MRN]",
    "US_SSN": "[SSN]",
    "HEALTH_PLAN_NUMBER": "[PLAN ID]",
    "ACCOUNT_NUMBER": "[ACCOUNT]",
    "LICENSE_NUMBER": "[LICENSE]",
    "VEHICLE_ID": "[VEHICLE ID]",
    "DEVICE_ID": "[DEVICE ID]",
    "URL": "[URL]",
    "IP_ADDRESS": "[IP]",
}
SURROGATE_LOCALE = "en_US"


def _same_shape(value: str, rng: random.Random) -> str:
    """Digits and letters redrawn, everything else kept: "AB-1234" -> "QX-8051"."""

    def redraw(char: str) -> str:
        if char.isdigit():
            return rng.choice(string.digits)
        if char.isalpha():
            return rng.choice(string.ascii_uppercase if char.isupper() else string.ascii_lowercase)
        return char

    return "".join(redraw(c) for c in value)


class Surrogates:
    """Consistent fake values: ``surrogate(kind, value)`` is the same for the same (kind,
    normalised value) within one instance, unrelated across instances (a fresh random key)."""

    def __init__(self, key: bytes | None = None) -> None:
        from faker import Faker  # the demo's fake-data library: only when surrogates are asked for

        self._key = secrets.token_bytes(32) if key is None else key
        self._faker = Faker(SURROGATE_LOCALE)
        self._cache: dict[tuple[str, str], str] = {}

    def _seed(self, kind: str, value: str) -> int:
        digest = hmac.new(self._key, f"{kind}\0{normalise_text(value)}".encode(), hashlib.sha256).digest()
        return int.from_bytes(digest[:8], "big")

    def surrogate(self, kind: str, value: str) -> str:
        cache_key = (kind, normalise_text(value))
        if cache_key not in self._cache:
            self._cache[cache_key] = self._draw(kind, value, self._seed(kind, value))
        return self._cache[cache_key]

    def _draw(self, kind: str, value: str, seed: int) -> str:
        faker = self._faker
        faker.seed_instance(seed)
        rng = random.Random(seed)
        makers = {
            "PERSON": faker.name,
            "DATE_TIME": lambda: faker.date_between("-30y", "today").strftime("%B %d, %Y"),
            "AGE": lambda: "90+",
            "PHONE_NUMBER": lambda: f"555-01{rng.randint(0, 99):02d}",  # NANP's fictional range
            "EMAIL_ADDRESS": lambda: f"{faker.user_name()}@example.org",
            "STREET_ADDRESS": faker.street_address,
            "LOCATION": faker.city,
            "POSTAL_CODE": faker.postcode,
            "URL": lambda: f"https://example.org/{faker.slug()}",
            "IP_ADDRESS": lambda: f"192.0.2.{rng.randint(1, 254)}",  # TEST-NET-1, documentation only
        }
        maker = makers.get(kind)
        return maker() if maker is not None else _same_shape(value, rng)


def replace_spans(
    text: str, spans: Iterable[tuple[str, int, int]], *, action: str, surrogates: Surrogates | None = None
) -> str:
    """``text`` with each (kind, start, end) span replaced; spans must not overlap."""
    if action not in ("placeholder", "surrogate"):
        raise ValueError(f"action {action!r} replaces nothing (placeholder or surrogate)")
    if action == "surrogate" and surrogates is None:
        raise ValueError("surrogate replacement needs a Surrogates instance (one per release)")
    pieces, position = [], 0
    for kind, start, end in sorted(spans, key=lambda s: s[1]):
        if start < position:
            raise ValueError(f"overlapping spans at {start}")
        pieces.append(text[position:start])
        value = text[start:end]
        pieces.append(PLACEHOLDERS[kind] if action == "placeholder" else surrogates.surrogate(kind, value))
        position = end
    pieces.append(text[position:])
    return "".join(pieces)


def redact_texts(
    texts: Sequence[str], findings: Iterable, *, action: str, kinds: Iterable[str], surrogates: Surrogates | None = None
) -> tuple[list[str], dict[str, int]]:
    """Replace the findings (``index``, ``entity_type``, ``start``, ``end``) of the given kinds in
    ``texts``; returns the new texts and the number of spans replaced per kind."""
    kinds = set(kinds)
    per_text: dict[int, list[tuple[str, int, int]]] = {}
    counts: dict[str, int] = {}
    for f in findings:
        if f.entity_type in kinds:
            per_text.setdefault(f.index, []).append((f.entity_type, f.start, f.end))
            counts[f.entity_type] = counts.get(f.entity_type, 0) + 1
    if action == "surrogate" and surrogates is None:
        surrogates = Surrogates()
    out = [
        replace_spans(text, per_text[i], action=action, surrogates=surrogates) if i in per_text else text
        for i, text in enumerate(texts)
    ]
    return out, dict(sorted(counts.items()))
