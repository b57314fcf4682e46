"""Offline PHI scanning of clinical text with Presidio.

Presidio's default engine downloads a spaCy model and its e-mail recognizer lets tldextract
fetch the public suffix list; neither may happen at a hospital or in CI. This module builds the
analyzer itself:

- NLP engine: a spaCy pipeline given by path or installed package name (e.g. ``en_core_web_lg``
  at a real site); otherwise a blank English pipeline whose only "NER" is a gazetteer
  EntityRuler for person names (Faker's en_US first and last names), plus a component that sets
  lemmas to the lowercase text so Presidio's context words still raise scores. The pipeline is
  saved to disk and Presidio's ``SpacyNlpEngine`` loads it by path, which skips its download.
- Recognizers: an explicit list of Presidio's own (dates, phones, e-mail with an offline
  tldextract, SSN, URL ending at a word boundary, IP) plus fedgen's medical record numbers,
  street addresses, North American phone numbers by shape (``phonenumbers`` rejects made-up
  area codes) and written dates ("March 14, 2024", otherwise left to a statistical NER).
- Overlaps are resolved to one label per character (see ``resolve_overlaps``).

``PhiAnalyzer.engine`` says which NLP engine ran, for the audit report.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import regex
import spacy
import tldextract
from faker.providers.address.en_US import Provider as FakerAddressProvider
from faker.providers.person.en_US import Provider as FakerPersonProvider
from presidio_analyzer import AnalyzerEngine, Pattern, PatternRecognizer, RecognizerRegistry
from presidio_analyzer.nlp_engine import NerModelConfiguration, SpacyNlpEngine
from presidio_analyzer.predefined_recognizers import (
    DateRecognizer,
    EmailRecognizer,
    IpRecognizer,
    PhoneRecognizer,
    SpacyRecognizer,
    UrlRecognizer,
    UsSsnRecognizer,
)
from spacy.language import Language
from spacy.tokens import Doc

from fedgen.errors import FedgenError
from fedgen.files import read_text_records

__all__ = [
    "PHI_ENTITIES",
    "MIN_SCORE",
    "PhiAnalyzer",
    "PhiFinding",
    "build_analyzer",
    "scan",
    "resolve_overlaps",
    "read_texts_jsonl",
    "score_against_truth",
    "redact",
]

PHI_ENTITIES = (
    "PERSON",
    "DATE_TIME",
    "PHONE_NUMBER",
    "EMAIL_ADDRESS",
    "STREET_ADDRESS",
    "MEDICAL_RECORD_NUMBER",
    "US_SSN",
    "URL",
    "IP_ADDRESS",
)
MIN_SCORE = 0.4  # Presidio's phone score without context; weak-only SSN/MRN/date patterns fall below
LANGUAGE = "en"
PIPE_BATCH_SIZE = 64

# The blank pipeline's person names carry the score a statistical NER entity gets in Presidio.
GAZETTEER_SCORE = 0.85
PERSON_TITLES = ["Mr.", "Mrs.", "Ms.", "Miss", "Mx.", "Dr.", "Prof."]
PERSON_SUFFIXES = ["Jr.", "Sr.", "II", "III", "IV", "MD", "DDS", "DVM", "PhD", "RN", "NP"]
LEMMA_COMPONENT = "fedgen_lowercase_lemmas"
# spaCy labels a statistical model emits that are not PHI here (as in Presidio's conf/spacy.yaml).
NON_PHI_SPACY_LABELS = [
    "ORG", "ORGANIZATION", "CARDINAL", "EVENT", "LANGUAGE", "LAW", "MONEY",
    "ORDINAL", "PERCENT", "PRODUCT", "QUANTITY", "WORK_OF_ART",
]  # fmt: skip

# --- fedgen pattern recognizers --------------------------------------------------------------

MRN_ID = r"(?:[A-Z]{1,3}-?)?\d{5,12}\b"
# Variable-width look-behind (the `regex` module allows it) keeps the label out of the span.
MRN_LABEL = (
    r"(?<=\b(?:mrn|mr\#|medical\s+record(?:\s+(?:number|no\.?|\#))?"
    r"|chart(?:\s+(?:number|no\.?))?)\s*[:\#]?\s*)"
)
MRN_PATTERNS = [
    Pattern("MRN after its label", MRN_LABEL + MRN_ID, 0.85),
    Pattern("MRN (weak, needs context)", r"\b\d{6,10}\b", 0.1),
]
MRN_CONTEXT = ["mrn", "chart", "record"]

# North American numbers by shape, separators required (a bare 10-digit run may be an MRN).
# Presidio's PhoneRecognizer only reports numbers `phonenumbers` deems valid, and made-up
# numbers (Faker's, or a language model's) often have impossible area or exchange codes.
NANP_PHONE_REGEX = (
    r"(?<![\w+-])(?:(?:\+?1|001)[-. ]?)?(?:\(\d{3}\)[ ]?|\d{3}[-. ])\d{3}[-. ]\d{4}"
    r"(?:[ ]?(?:x|ext\.?)[ ]?\d{1,6})?\b"
)
NANP_PHONE_PATTERNS = [
    Pattern("(617) 555-0143, 617.555.0143x12, +1-617-555-0143", NANP_PHONE_REGEX, 0.5),
    Pattern("10 bare digits (weak, needs context)", r"\b\d{10}\b", 0.3),
]
PHONE_REGIONS = ("US",)  # national formats understood; "+44 ..." style numbers match in any region

# Faker's en_US street types, which lack "Boulevard".
STREET_SUFFIXES = sorted(set(FakerAddressProvider.street_suffixes) | {"Boulevard"}, key=len, reverse=True)
STREET_ABBREVIATIONS = ["Blvd", "Pkwy", "Ave", "Cir", "Hwy", "Ter", "Trl", "St", "Rd", "Ln", "Dr", "Ct", "Pl", "Sq"]
_STREET_WORD = r"(?:[A-Z][A-Za-z'-]*|\d+(?:st|nd|rd|th))"
_CITY = r"[A-Z][a-z]+(?:[ -][A-Z][a-z]+){0,2}"
_ZIP = r"\d{5}(?:-\d{4})?"
_BREAK = r"(?:,[ \t]*|[ \t]*\n[ \t]*)"
STREET_ADDRESS_REGEX = (
    r"\b\d{1,6}[A-Z]?"  # building number
    rf"(?:[ \t]+{_STREET_WORD}){{1,4}}"  # street name
    rf"[ \t]+(?:(?:{'|'.join(STREET_SUFFIXES)})\b|(?:{'|'.join(STREET_ABBREVIATIONS)})\b\.?)"  # suffix
    r"(?:,?[ \t]+(?:Apt\.?|Apartment|Suite|Ste\.?|Unit|\#)[ \t]*[A-Za-z0-9-]+)?"  # unit
    # ", City, ST 12345" / ", City 12345" / ", City" at the end of a sentence
    rf"(?:{_BREAK}{_CITY}(?:(?:,[ \t]*|[ \t]+)[A-Z]{{2}}(?:[ \t]+{_ZIP})?|[ \t]+{_ZIP}|(?=[.;:!?)\n]|$)))?"
)
# US military mail: "PSC 2076, Box 9845\nAPO AA 86696", "USNS Lopez\nFPO AE 12345".
MILITARY_ADDRESS_REGEX = (
    r"\b(?:(?:PSC|Unit|CMR)[ \t]+\d{3,5},?[ \t]+Box[ \t]+\d{3,5}|(?:USNS|USNV|USS|USCGC)[ \t]+[A-Z][a-z]+)"
    rf"(?:,?[ \t]+|[ \t]*\n[ \t]*)(?:APO|FPO|DPO)[ \t]+(?:AA|AE|AP)[ \t]+{_ZIP}"
)
STREET_ADDRESS_PATTERNS = [
    Pattern("number street suffix [unit] [city state zip]", STREET_ADDRESS_REGEX, 0.7),
    Pattern("APO/FPO/DPO military address", MILITARY_ADDRESS_REGEX, 0.7),
]
STREET_ADDRESS_CONTEXT = ["address", "live", "lives", "reside", "street"]

_MONTH = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
    r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?"
)
_DAY = r"(?:[1-9]|0[1-9]|[12]\d|3[01])(?:st|nd|rd|th)?"
WRITTEN_DATE_PATTERNS = [
    Pattern("Month d, yyyy", rf"\b{_MONTH}[ \t]+{_DAY},?[ \t]+\d{{4}}\b", 0.6),
    Pattern("d Month yyyy", rf"\b{_DAY}[ \t]+(?:of[ \t]+)?{_MONTH},?[ \t]+\d{{4}}\b", 0.6),
    Pattern("Month yyyy", rf"\b{_MONTH}[ \t]+\d{{4}}\b", 0.5),
]

URL_END = r"(?<![.,;:!?])(?![\w-])"

CASE_SENSITIVE = regex.DOTALL | regex.MULTILINE  # Presidio's default adds IGNORECASE


class OfflineEmailRecognizer(EmailRecognizer):
    """Presidio's e-mail recognizer, validating domains with the suffix list bundled in tldextract.

    The stock class calls the module-level ``tldextract.extract``, whose extractor fetches the
    public suffix list over the network on first use (and can hang offline).
    """

    def __init__(self) -> None:
        super().__init__()
        # No suffix_list_urls: the bundled snapshot; no cache_dir: nothing written to disk.
        self.tld_extractor = tldextract.TLDExtract(cache_dir=None, suffix_list_urls=())

    def validate_result(self, pattern_text: str) -> bool:
        return self.tld_extractor(pattern_text).fqdn != ""


def _word_bounded_url_recognizer() -> UrlRecognizer:
    """Presidio's URL patterns, made to end at a word boundary and before trailing punctuation:
    the stock patterns read "clinic.Mood" (a missing space) as the URL "clinic.Mo" and keep the
    comma of "https://example.org/a, then"."""
    patterns = [Pattern(p.name, p.regex + URL_END, p.score) for p in UrlRecognizer.PATTERNS]
    return UrlRecognizer(patterns=patterns)


def _fedgen_recognizers() -> list[PatternRecognizer]:
    return [
        PatternRecognizer(
            supported_entity="MEDICAL_RECORD_NUMBER",
            name="MedicalRecordNumberRecognizer",
            patterns=MRN_PATTERNS,
            context=MRN_CONTEXT,
        ),
        PatternRecognizer(
            supported_entity="STREET_ADDRESS",
            name="StreetAddressRecognizer",
            patterns=STREET_ADDRESS_PATTERNS,
            context=STREET_ADDRESS_CONTEXT,
            global_regex_flags=CASE_SENSITIVE,
        ),
        PatternRecognizer(
            supported_entity="PHONE_NUMBER",
            name="NanpPhoneShapeRecognizer",
            patterns=NANP_PHONE_PATTERNS,
            context=PhoneRecognizer.CONTEXT,
        ),
        PatternRecognizer(
            supported_entity="DATE_TIME",
            name="WrittenDateRecognizer",
            patterns=WRITTEN_DATE_PATTERNS,
            context=DateRecognizer.CONTEXT,
        ),
    ]


def _registry(nlp_engine: SpacyNlpEngine) -> RecognizerRegistry:
    recognizers = [
        SpacyRecognizer(supported_entities=nlp_engine.get_supported_entities()),
        DateRecognizer(),
        PhoneRecognizer(supported_regions=PHONE_REGIONS),
        OfflineEmailRecognizer(),
        UsSsnRecognizer(),
        _word_bounded_url_recognizer(),
        IpRecognizer(),
        *_fedgen_recognizers(),
    ]
    return RecognizerRegistry(recognizers=recognizers, supported_languages=[LANGUAGE])


# --- the NLP engine ---------------------------------------------------------------------------


@Language.component(LEMMA_COMPONENT)
def _lowercase_lemmas(doc: Doc) -> Doc:
    """Lemma = lowercase text: a blank pipeline has no lemmatizer, and Presidio matches context
    words against lemmas, so without this no context word would ever raise a score."""
    for token in doc:
        token.lemma_ = token.lower_
    return doc


def _person_patterns() -> list[dict]:
    """[Title] First [M.] Last [Suffix] and Title Last [Suffix]; the ruler keeps the longest."""
    title = {"TEXT": {"IN": PERSON_TITLES}}
    first = {"TEXT": {"IN": sorted(set(FakerPersonProvider.first_names))}}
    initial = {"TEXT": {"REGEX": r"^[A-Z]\.$"}}
    last = {"TEXT": {"IN": sorted(set(FakerPersonProvider.last_names))}}
    suffix = {"TEXT": {"IN": PERSON_SUFFIXES}}
    optional = {"OP": "?"}
    token_sequences = [
        [title | optional, first, initial | optional, last, suffix | optional],
        [title, last, suffix | optional],
    ]
    return [{"label": "PERSON", "pattern": seq} for seq in token_sequences]


def _blank_pipeline(person_patterns: list[dict]) -> Language:
    nlp = spacy.blank(LANGUAGE)
    ruler = nlp.add_pipe("entity_ruler")
    ruler.add_patterns(person_patterns)
    nlp.add_pipe(LEMMA_COMPONENT)
    return nlp


def _blank_pipeline_dirname(person_patterns: list[dict]) -> str:
    """Named by its content, so a cache_dir never serves a pipeline built from other rules or
    another spaCy version."""
    content = json.dumps([spacy.__version__, person_patterns], sort_keys=True).encode()
    return f"fedgen-blank-en-{hashlib.sha256(content).hexdigest()[:16]}"


@functools.cache
def _process_temp_dir() -> tempfile.TemporaryDirectory:
    """Lives as long as the process; removed at exit."""
    return tempfile.TemporaryDirectory(prefix="fedgen-spacy-")


@functools.cache
def _saved_blank_pipeline(cache_dir: Path | None) -> Path:
    """Save the blank pipeline once per process (and once per cache_dir across processes)."""
    parent = Path(_process_temp_dir().name) if cache_dir is None else cache_dir
    person_patterns = _person_patterns()
    target = parent / _blank_pipeline_dirname(person_patterns)
    if (target / "config.cfg").is_file():
        return target
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=parent))
    _blank_pipeline(person_patterns).to_disk(staging)
    try:
        os.replace(staging, target)
    except OSError:  # another process saved it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _resolve_spacy_model(spacy_model: str) -> str:
    if Path(spacy_model).is_dir() or spacy.util.is_package(spacy_model):
        return spacy_model
    raise FedgenError(
        f"spaCy model {spacy_model!r} is neither a directory nor an installed package "
        "(install it, or leave it unset to use the blank pipeline with gazetteer rules)"
    )


@dataclasses.dataclass(frozen=True)
class PhiAnalyzer:
    """A Presidio ``AnalyzerEngine`` and a description of the NLP engine behind it."""

    analyzer: AnalyzerEngine = dataclasses.field(repr=False)
    engine: str  # e.g. "spaCy en_core_web_lg (installed)", for the audit report


def build_analyzer(*, spacy_model: str | None = None, cache_dir: Path | None = None) -> PhiAnalyzer:
    """Build a Presidio analyzer that never touches the network.

    ``spacy_model`` is a pipeline directory or an installed package name; ``None`` builds the
    blank English pipeline with gazetteer rules (saved under ``cache_dir``, else a temp dir).
    """
    if spacy_model is None:
        model_path = str(_saved_blank_pipeline(None if cache_dir is None else Path(cache_dir)))
        ner_config = NerModelConfiguration(
            model_to_presidio_entity_mapping={"PERSON": "PERSON"}, default_score=GAZETTEER_SCORE
        )
        engine = "blank English pipeline + gazetteer rules (no statistical NER)"
    else:
        model_path = _resolve_spacy_model(spacy_model)
        ner_config = NerModelConfiguration(labels_to_ignore=NON_PHI_SPACY_LABELS)
        kind = "directory" if Path(spacy_model).is_dir() else "installed"
        engine = f"spaCy {spacy_model} ({kind})"
    nlp_engine = SpacyNlpEngine(
        models=[{"lang_code": LANGUAGE, "model_name": model_path}],
        ner_model_configuration=ner_config,
    )
    nlp_engine.load()  # a path or an installed package: SpacyNlpEngine does not download
    analyzer = AnalyzerEngine(
        registry=_registry(nlp_engine),
        nlp_engine=nlp_engine,
        supported_languages=[LANGUAGE],
        default_score_threshold=MIN_SCORE,
    )
    return PhiAnalyzer(analyzer, engine)


# --- scanning ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PhiFinding:
    """One PHI span: ``texts[index][start:end]`` looks like ``entity_type``."""

    index: int
    entity_type: str
    start: int
    end: int
    score: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _contains(outer: PhiFinding, inner: PhiFinding) -> bool:
    return outer.start <= inner.start and inner.end <= outer.end


def _overlaps(a: PhiFinding, b: PhiFinding) -> bool:
    return a.start < b.end and b.start < a.end


def _rank(finding: PhiFinding) -> tuple:
    """Longer spans first (a date inside an address is part of the address), then score."""
    return (-(finding.end - finding.start), -finding.score, finding.entity_type)


def resolve_overlaps(findings: Iterable[PhiFinding]) -> list[PhiFinding]:
    """One label per character: a finding inside another one's span is dropped (the longer span
    explains it: an e-mail's domain is not a separate URL); of two partly overlapping findings
    the higher score wins."""
    ranked = sorted(findings, key=_rank)
    outermost = [f for i, f in enumerate(ranked) if not any(_contains(g, f) for g in ranked[:i])]
    kept: list[PhiFinding] = []
    for finding in sorted(outermost, key=lambda f: (-f.score, f.start)):
        if not any(_overlaps(finding, k) for k in kept):
            kept.append(finding)
    return sorted(kept, key=lambda f: (f.start, f.end))


def scan(
    analyzer: PhiAnalyzer,
    texts: Sequence[str],
    *,
    entities: Sequence[str] = PHI_ENTITIES,
    progress: Callable[[int, int], None] | None = None,
) -> list[PhiFinding]:
    """PHI findings in every text, ordered by (index, start). ``progress(done, total)`` is
    called after each text."""
    engine = analyzer.analyzer
    artifacts = engine.nlp_engine.process_batch(list(texts), LANGUAGE, batch_size=PIPE_BATCH_SIZE)
    findings: list[PhiFinding] = []
    for index, (text, nlp_artifacts) in enumerate(artifacts):
        results = engine.analyze(
            text, LANGUAGE, entities=list(entities), nlp_artifacts=nlp_artifacts
        )
        candidates = (PhiFinding(index, r.entity_type, r.start, r.end, float(r.score)) for r in results)
        findings.extend(resolve_overlaps(candidates))
        if progress is not None:
            progress(index + 1, len(texts))
    return findings


def read_texts_jsonl(path: Path | str) -> list[str]:
    """The "text" of every line of a texts.jsonl; line i is text i (truth indices rely on it)."""
    return [record["text"] for record in read_text_records(path)]


# --- evaluation and reporting -----------------------------------------------------------------


def _truth_overlaps(finding: PhiFinding, span: dict) -> bool:
    return (
        finding.index == span["index"]
        and finding.entity_type == span["entity_type"]
        and finding.start < span["end"]
        and span["start"] < finding.end
    )


def score_against_truth(findings: Sequence[PhiFinding], truth: Sequence[dict]) -> dict[str, dict]:
    """Per entity type: recall (truth spans overlapped by a finding of the same type), precision
    (findings overlapping a truth span of the same type) and the number of truth spans.

    Types are compared as they are: the scanner reports the truth file's own names (PERSON,
    DATE_TIME, PHONE_NUMBER, EMAIL_ADDRESS, STREET_ADDRESS, MEDICAL_RECORD_NUMBER). A type with
    no truth spans has recall None; a type with no findings has precision None.
    """
    by_index: dict[int, list[PhiFinding]] = {}
    for finding in findings:
        by_index.setdefault(finding.index, []).append(finding)
    truth_by_index: dict[int, list[dict]] = {}
    for span in truth:
        truth_by_index.setdefault(span["index"], []).append(span)

    types = sorted({s["entity_type"] for s in truth} | {f.entity_type for f in findings})
    scores = {}
    for entity_type in types:
        spans = [s for s in truth if s["entity_type"] == entity_type]
        found = [f for f in findings if f.entity_type == entity_type]
        hits = sum(any(_truth_overlaps(f, s) for f in by_index.get(s["index"], [])) for s in spans)
        correct = sum(any(_truth_overlaps(f, s) for s in truth_by_index.get(f.index, [])) for f in found)
        scores[entity_type] = {
            "recall": hits / len(spans) if spans else None,
            "precision": correct / len(found) if found else None,
            "n_truth": len(spans),
        }
    return scores


def redact(value: str) -> str:
    """Show PHI in a report without revealing it: keep the first character of each word and the
    punctuation, mask the rest ("Maria Lopez" -> "M**** L****", "(617) 555-0143" -> "(6**) 5**-0***")."""
    return regex.sub(r"(?<=\w)\w", "*", value)
