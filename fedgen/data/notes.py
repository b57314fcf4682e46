"""Short synthetic mental-health assessment notes with planted PHI and canary records.

A note is a handful of sentences drawn from per-class pools (presenting complaint, symptoms,
sleep and appetite, risk assessment, plan). Any sentence slot may instead come from a related
class (anxiety and stress co-occur, so do depression and suicidality), so the classes overlap
the way real notes do and no single keyword decides the label.

PHI (names, dates, phone numbers, e-mails, street addresses, medical record numbers, made with a
seeded Faker) sits in opening and closing sentences, and every planted span is recorded with its
exact character offsets. Canary notes carry a secret 9-digit medical record number for
memorisation (exposure) tests; their template is the note with ``{secret}`` in its place.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

import numpy as np
from faker import Faker

__all__ = [
    "ENTITY_TYPES",
    "SECRET_DIGITS",
    "PhiSpan",
    "Note",
    "CanaryNote",
    "make_site_notes",
]

ENTITY_TYPES = (
    "PERSON",
    "DATE_TIME",
    "PHONE_NUMBER",
    "EMAIL_ADDRESS",
    "STREET_ADDRESS",
    "MEDICAL_RECORD_NUMBER",
)
SECRET_DIGITS = 9  # canary secrets; ordinary record numbers have MRN_DIGITS
MRN_DIGITS = 8
CROSS_CLASS_PROB = 0.25  # chance that one sentence slot is drawn from a related class
SHARED_SENTENCE_PROB = 0.3  # chance of a class-neutral mental status sentence
SLEEP_SENTENCE_PROB = 0.5
PLAN_SENTENCE_PROB = 0.8
EXTRA_PHI_SENTENCE_PROB = 0.4
FIRST_VISIT, LAST_VISIT = date(2018, 1, 1), date(2025, 12, 31)  # fixed: "today" would break seeding

_SLOTS = ("complaint", "symptoms", "sleep", "risk", "plan")

_POOLS: dict[str, dict[str, tuple[str, ...]]] = {
    "Normal": {
        "complaint": (
            "Presents for a routine wellness check with no current concerns.",
            "Attends an annual review and reports feeling generally well.",
            "Referred by primary care for screening; no complaints today.",
            "Returns for follow-up after a difficult period and reports things have settled.",
            "Here for a pre-employment mental health screen.",
            "Self-referred to talk about work-life balance; describes mood as good.",
        ),
        "symptoms": (
            "Mood described as good, affect bright and reactive.",
            "No persistent low mood, worry or loss of interest reported.",
            "Enjoys hobbies and keeps in regular contact with friends and family.",
            "Manages everyday pressures well and describes good coping strategies.",
            "Concentration and energy are at their usual level.",
            "Occasional frustration at work that passes quickly.",
        ),
        "sleep": (
            "Sleeps seven to eight hours and wakes rested; appetite is normal.",
            "Sleep and appetite unchanged, weight stable.",
            "No sleep difficulty and eating regular meals.",
        ),
        "risk": (
            "Denies suicidal ideation, intent or plan; no history of self-harm.",
            "No thoughts of self-harm or of harming others.",
            "Risk assessed as low; no suicidal thoughts.",
        ),
        "plan": (
            "No treatment indicated; return as needed.",
            "Discussed healthy routines; routine review in one year.",
            "Screening negative; discharged from the clinic.",
        ),
    },
    "Anxiety": {
        "complaint": (
            "Presents with constant worry that has been hard to control for several months.",
            "Referred for episodes of racing heart, breathlessness and fear of losing control.",
            "Reports feeling on edge most days and avoiding crowded places.",
            "Seeks help for worry about health and family that gets in the way of daily life.",
            "Describes sudden panic attacks, the last one while driving.",
            "Complains of nervousness before social situations and fear of being judged.",
        ),
        "symptoms": (
            "Endorses restlessness, muscle tension and trouble concentrating.",
            "Describes catastrophic thinking and repeated checking.",
            "Reports trembling, sweating and a sense of doom during attacks.",
            "Avoids meetings and phone calls because of anticipatory worry.",
            "GAD-7 score of 15, consistent with moderate to severe anxiety.",
            "Feels keyed up and startles easily; the worry moves from one topic to another.",
        ),
        "sleep": (
            "Struggles to fall asleep because of racing thoughts; appetite drops when nervous.",
            "Lies awake worrying and wakes tense.",
            "Wakes at night with a pounding heart; eating less.",
        ),
        "risk": (
            "Denies suicidal ideation or self-harm.",
            "No suicidal thoughts; risk considered low.",
            "Denies thoughts of self-harm; fears are about health, not about dying by suicide.",
        ),
        "plan": (
            "Start CBT focused on worry and graded exposure; consider sertraline.",
            "Taught breathing and grounding techniques; referred to an anxiety group.",
            "Discussed SSRI options; follow-up in four weeks.",
        ),
    },
    "Depression": {
        "complaint": (
            "Presents with low mood most of the day for the past two months.",
            "Reports loss of interest in activities once enjoyed and withdrawal from friends.",
            "Referred for persistent sadness and tearfulness since losing a job.",
            "Describes feeling empty and unmotivated, struggling to get out of bed.",
            "Family note the patient seems flat and has stopped going out.",
        ),
        "symptoms": (
            "Endorses anhedonia, fatigue, poor concentration and feelings of worthlessness.",
            "PHQ-9 score of 18, consistent with moderately severe depression.",
            "Feels guilty and at times hopeless about the future; psychomotor slowing noted.",
            "Affect constricted, speech slow and soft.",
            "Low energy and poorer self-care over recent weeks.",
        ),
        "sleep": (
            "Early morning waking and daytime fatigue; poor appetite with some weight loss.",
            "Sleeping ten or more hours yet unrefreshed; eating more than usual.",
            "Broken sleep and little interest in food.",
        ),
        "risk": (
            "Denies suicidal intent or plan; protective factors include family.",
            "Feels life is hard at times but denies suicidal ideation or plan.",
            "No self-harm; denies current suicidal thoughts.",
        ),
        "plan": (
            "Start an SSRI and refer for behavioural activation.",
            "Increase antidepressant dose; review in two weeks.",
            "Referred to psychotherapy; encouraged daily activity scheduling.",
        ),
    },
    "Stress": {
        "complaint": (
            "Presents feeling overwhelmed by workload and deadlines.",
            "Reports strain from caring for an ill parent while working full time.",
            "Describes pressure after a recent divorce and money problems.",
            "Seeks support for burnout after months of long shifts.",
            "Reports irritability and exhaustion since starting a demanding new role.",
        ),
        "symptoms": (
            "Endorses tension headaches, irritability and difficulty switching off.",
            "Feels stretched thin but mood is otherwise reasonable.",
            "Reports muscle tension and snapping at family members under pressure.",
            "Concentration poor by the end of the week; symptoms ease on days off.",
            "Perceived Stress Scale score elevated.",
        ),
        "sleep": (
            "Sleep cut short by late work; skipping meals and relying on caffeine.",
            "Difficulty winding down at night; appetite variable.",
            "Sleeps poorly during the week and catches up at weekends.",
        ),
        "risk": (
            "Denies suicidal ideation; no self-harm.",
            "No thoughts of harming self or others.",
            "Risk assessed as low; denies suicidal thoughts.",
        ),
        "plan": (
            "Discussed stress management, boundaries at work and regular exercise.",
            "Referred to the employee assistance program; follow-up in a month.",
            "Recommended a short leave from work and relaxation training.",
        ),
    },
    "Suicidal": {
        "complaint": (
            "Brought in after telling a friend they no longer want to live.",
            "Presents two days after an overdose of paracetamol.",
            "Referred urgently after writing goodbye messages to family.",
            "Reports thoughts of ending their life that have grown stronger this week.",
            "Seen in the emergency department after being found on a bridge.",
        ),
        "symptoms": (
            "Endorses hopelessness and feeling like a burden to others.",
            "Low mood with withdrawal and giving away possessions.",
            "Describes feeling trapped with no way out.",
            "PHQ-9 item 9 positive; Columbia scale shows recent ideation with a method.",
        ),
        "sleep": (
            "Barely sleeping and not eating for several days.",
            "Awake most of the night; appetite lost.",
            "Sleep and appetite severely reduced.",
        ),
        "risk": (
            "Endorses active suicidal ideation with a plan and access to means.",
            "Reports intent to act on these thoughts; risk assessed as high.",
            "Previous attempt last year; current ideation daily.",
            "Passive death wish without a current plan, but few protective factors.",
        ),
        "plan": (
            "Safety plan completed and means restriction discussed; admitted for observation.",
            "Crisis team involved; daily contact arranged.",
            "Voluntary admission to the inpatient unit with one-to-one observation.",
        ),
    },
}

# Which classes a sentence may be borrowed from: comorbidity, not noise.
_RELATED = {
    "Normal": ("Stress",),
    "Anxiety": ("Stress", "Depression"),
    "Depression": ("Anxiety", "Suicidal"),
    "Stress": ("Anxiety", "Normal"),
    "Suicidal": ("Depression",),
}

_SHARED_SENTENCES = (
    "Mental status exam: alert and oriented, speech normal in rate and volume.",
    "Appearance appropriate, good eye contact, thought process linear.",
    "No psychotic symptoms; insight and judgement fair.",
    "Collateral history obtained from a family member.",
)

# PHI sentences: slots name the planted values (see _Identity). The first three together cover
# every entity type, and PHI notes cycle through this list, so three PHI notes cover them all.
_PHI_OPENINGS = (
    "Patient {PERSON} seen on {DATE_TIME}.",
    "{PERSON}, MRN: {MRN}, was assessed on {DATE_TIME}.",
    "Assessment of {PERSON} (MRN {MRN}).",
    "Seen in clinic on {DATE_TIME}; medical record number {MRN}.",
)
_PHI_CLOSINGS = (
    "Can be reached at {PHONE_NUMBER} or {EMAIL_ADDRESS}.",
    "Lives at {STREET_ADDRESS}.",
    "Emergency contact: {CONTACT}, {PHONE_NUMBER}.",
    "Address on file: {STREET_ADDRESS}; e-mail {EMAIL_ADDRESS}.",
    "Next appointment on {NEXT_DATE}; patient prefers calls to {PHONE_NUMBER}.",
)
_PHI_CYCLE = (
    ("opening", _PHI_OPENINGS[0]),
    ("closing", _PHI_CLOSINGS[0]),
    ("closing", _PHI_CLOSINGS[1]),
    ("opening", _PHI_OPENINGS[1]),
    ("opening", _PHI_OPENINGS[2]),
    ("closing", _PHI_CLOSINGS[2]),
    ("opening", _PHI_OPENINGS[3]),
    ("closing", _PHI_CLOSINGS[3]),
    ("closing", _PHI_CLOSINGS[4]),
)
_CANARY_OPENINGS = ("{PERSON}, medical record number {SECRET}, was seen on {DATE_TIME}.",)

_SLOT_ENTITY = {
    "PERSON": "PERSON",
    "CONTACT": "PERSON",
    "DATE_TIME": "DATE_TIME",
    "NEXT_DATE": "DATE_TIME",
    "PHONE_NUMBER": "PHONE_NUMBER",
    "EMAIL_ADDRESS": "EMAIL_ADDRESS",
    "STREET_ADDRESS": "STREET_ADDRESS",
    "MRN": "MEDICAL_RECORD_NUMBER",
    "SECRET": "MEDICAL_RECORD_NUMBER",
}
_SLOT = re.compile(r"\{([A-Z_]+)\}")

_AREA_CODES = (
    "206",
    "212",
    "213",
    "303",
    "312",
    "404",
    "415",
    "503",
    "512",
    "602",
    "612",
    "614",
    "617",
    "702",
    "713",
    "720",
    "773",
    "808",
    "919",
    "971",
)
_PHONE_FORMATS = ("({area}) {exchange}-{line}", "{area}-{exchange}-{line}")
_EMAIL_DOMAINS = ("gmail.com", "yahoo.com", "outlook.com", "hotmail.com", "icloud.com", "aol.com")
_STREET_NAMES = (
    "Oak",
    "Maple",
    "Cedar",
    "Pine",
    "Elm",
    "Washington",
    "Lake",
    "Hill",
    "Park",
    "Main",
    "Lincoln",
    "Jefferson",
    "Sunset",
    "River",
    "Chestnut",
    "Walnut",
    "Highland",
    "Franklin",
)
_STREET_SUFFIXES = (
    "Street",
    "Avenue",
    "Road",
    "Drive",
    "Lane",
    "Boulevard",
    "Court",
    "Place",
    "St",
    "Ave",
)
_DATE_FORMATS = ("{d:%m/%d/%Y}", "{d:%B} {d.day}, {d.year}", "{d:%Y-%m-%d}")
CITY_PROB = 0.5  # chance that a street address carries ", City"


@dataclass(frozen=True)
class PhiSpan:
    """One planted identifier: ``note.text[start:end] == value``."""

    entity_type: str
    start: int
    end: int
    value: str


@dataclass(frozen=True)
class Note:
    text: str
    label: str
    phi: tuple[PhiSpan, ...] = ()


@dataclass(frozen=True)
class CanaryNote(Note):
    """A note with a unique secret; ``template.replace("{secret}", secret) == text``."""

    template: str = ""
    secret: str = ""


def make_site_notes(
    labels: Sequence[str],
    rng: np.random.Generator,
    *,
    phi_fraction: float,
    canaries: int = 0,
) -> list[Note]:
    """One note per label, in order, with PHI in ``round(phi_fraction * len(labels))`` of them,
    then ``canaries`` canary notes inserted at random positions (labels drawn from ``labels``).
    """
    assert 0.0 <= phi_fraction <= 1.0, phi_fraction
    assert all(label in _POOLS for label in labels), f"unknown labels in {sorted(set(labels))}"
    assert labels or not canaries, "canaries take their labels from the site's notes"
    fake = Faker("en_US")
    fake.seed_instance(int(rng.integers(2**31)))
    phi_count = round(phi_fraction * len(labels))
    with_phi = set(rng.choice(len(labels), phi_count, replace=False).tolist())

    notes: list[Note] = []
    phi_notes_so_far = 0
    for i, label in enumerate(labels):
        phi_sentences = []
        if i in with_phi:
            phi_sentences = _pick_phi_sentences(phi_notes_so_far, rng)
            phi_notes_so_far += 1
        notes.append(_make_note(label, rng, _draw_identity(fake, rng), phi_sentences))

    used_names = {span.value for note in notes for span in note.phi if span.entity_type == "PERSON"}
    secrets: set[str] = set()
    for _ in range(canaries):
        label = labels[int(rng.integers(len(labels)))]
        canary = _make_canary(label, rng, fake, used_names, secrets)
        notes.insert(int(rng.integers(len(notes) + 1)), canary)
    return notes


# --- building a note ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Identity:
    """The values one note's PHI sentences draw from: one patient, one contact person."""

    values: dict[str, str]


def _draw_identity(fake: Faker, rng: np.random.Generator) -> _Identity:
    first, last = fake.first_name(), fake.last_name()
    return _Identity(
        {
            "PERSON": f"{first} {last}",
            "CONTACT": f"{fake.first_name()} {fake.last_name()}",
            "DATE_TIME": _date(fake, rng),
            "NEXT_DATE": _date(fake, rng),
            "PHONE_NUMBER": _phone(rng),
            "EMAIL_ADDRESS": _email(first, last, rng),
            "STREET_ADDRESS": _street_address(fake, rng),
            "MRN": f"{int(rng.integers(10**MRN_DIGITS)):0{MRN_DIGITS}d}",
        }
    )


def _date(fake: Faker, rng: np.random.Generator) -> str:
    day = fake.date_between_dates(FIRST_VISIT, LAST_VISIT)
    return str(rng.choice(_DATE_FORMATS)).format(d=day)


def _phone(rng: np.random.Generator) -> str:
    """A US number that looks real: a real area code, no 555 or N11 exchange."""
    while True:
        exchange = int(rng.integers(200, 1000))
        if exchange != 555 and exchange % 100 != 11:
            break
    return str(rng.choice(_PHONE_FORMATS)).format(
        area=rng.choice(_AREA_CODES), exchange=exchange, line=f"{int(rng.integers(10**4)):04d}"
    )


def _email(first: str, last: str, rng: np.random.Generator) -> str:
    local = re.sub(r"[^a-z]", "", first.lower()) + "." + re.sub(r"[^a-z]", "", last.lower())
    return f"{local}{int(rng.integers(1, 100))}@{rng.choice(_EMAIL_DOMAINS)}"


def _street_address(fake: Faker, rng: np.random.Generator) -> str:
    number = int(rng.integers(100, 10000))
    street = f"{number} {rng.choice(_STREET_NAMES)} {rng.choice(_STREET_SUFFIXES)}"
    return f"{street}, {fake.city()}" if rng.random() < CITY_PROB else street


def _pick_phi_sentences(phi_note_number: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """The next sentence of the cycle, sometimes plus one random other PHI sentence."""
    chosen = [_PHI_CYCLE[phi_note_number % len(_PHI_CYCLE)]]
    if rng.random() < EXTRA_PHI_SENTENCE_PROB:
        extra = _PHI_CYCLE[int(rng.integers(len(_PHI_CYCLE)))]
        if extra[0] != chosen[0][0]:  # at most one opening and one closing
            chosen.append(extra)
    return chosen


def _clinical_sentences(label: str, rng: np.random.Generator) -> list[str]:
    """The body: one sentence per slot, some slots optional, any slot maybe from a related class."""
    present = {
        "complaint": True,
        "symptoms": True,
        "sleep": rng.random() < SLEEP_SENTENCE_PROB,
        "risk": True,
        "plan": rng.random() < PLAN_SENTENCE_PROB,
    }
    sentences = []
    for slot in _SLOTS:
        if not present[slot]:
            continue
        source = label
        if rng.random() < CROSS_CLASS_PROB:
            source = str(rng.choice(_RELATED[label]))
        sentences.append(str(rng.choice(_POOLS[source][slot])))
        if slot == "symptoms" and rng.random() < SHARED_SENTENCE_PROB:
            sentences.append(str(rng.choice(_SHARED_SENTENCES)))
    return sentences


def _make_note(
    label: str,
    rng: np.random.Generator,
    identity: _Identity,
    phi_sentences: list[tuple[str, str]],
) -> Note:
    openings = [template for where, template in phi_sentences if where == "opening"]
    closings = [template for where, template in phi_sentences if where == "closing"]
    text, spans = _join([*openings, *_clinical_sentences(label, rng), *closings], identity.values)
    return Note(text=text, label=label, phi=spans)


def _make_canary(
    label: str,
    rng: np.random.Generator,
    fake: Faker,
    used_names: set[str],
    used_secrets: set[str],
) -> CanaryNote:
    """A fake patient whose name and secret appear nowhere else in the site."""
    while True:
        identity = _draw_identity(fake, rng)
        secret = str(int(rng.integers(10 ** (SECRET_DIGITS - 1), 10**SECRET_DIGITS)))
        if identity.values["PERSON"] not in used_names and secret not in used_secrets:
            break
    used_names.add(identity.values["PERSON"])
    used_secrets.add(secret)
    opening = str(rng.choice(_CANARY_OPENINGS))
    values = {**identity.values, "SECRET": secret}
    text, spans = _join([opening, *_clinical_sentences(label, rng)], values)
    secret_at = next(span for span in spans if span.value == secret)
    template = text[: secret_at.start] + "{secret}" + text[secret_at.end :]
    return CanaryNote(text=text, label=label, phi=spans, template=template, secret=secret)


def _join(sentences: list[str], values: dict[str, str]) -> tuple[str, tuple[PhiSpan, ...]]:
    """Fill the slots of each sentence and join them with spaces, recording every span."""
    text = ""
    spans: list[PhiSpan] = []
    for sentence in sentences:
        if text:
            text += " "
        cursor = 0
        for match in _SLOT.finditer(sentence):
            text += sentence[cursor : match.start()]
            value = values[match.group(1)]
            entity = _SLOT_ENTITY[match.group(1)]
            spans.append(PhiSpan(entity, len(text), len(text) + len(value), value))
            text += value
            cursor = match.end()
        text += sentence[cursor:]
    return text, tuple(spans)
