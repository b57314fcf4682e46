"""Offline PHI scanner: exact spans, no network, engine reporting, precision, scoring, I/O."""

import json
import socket

import pytest
import regex
import spacy
from presidio_analyzer import AnalyzerEngine, EntityRecognizer
from presidio_analyzer.context_aware_enhancers import LemmaContextAwareEnhancer
from presidio_analyzer.predefined_recognizers import UrlRecognizer

from fedgen.audits.phi import (
    MIN_SCORE,
    PHI_ENTITIES,
    SCAN_CHUNK,
    PhiAnalyzer,
    PhiFinding,
    WordBoundedUrlRecognizer,
    build_analyzer,
    read_texts_jsonl,
    redact,
    resolve_overlaps,
    scan,
    score_against_truth,
)
from fedgen.audits.phi_rules import _alternation
from fedgen.data.demo import make_demo_consortium
from fedgen.errors import FedgenError

DEMO_MIN_RECALL = 0.95
DEMO_MIN_PRECISION = 0.9


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory):
    return build_analyzer()


def found(analyzer, text):
    return [(f.entity_type, text[f.start : f.end]) for f in scan(analyzer, [text])]


def test_hand_written_note_spans_are_exact(analyzer):
    text = (
        "Patient Maria Lopez, MRN 482917365, seen 03/14/2024, call (617) 555-0143 or "
        "maria.lopez@example.org, lives at 1234 Oak Street, Springfield."
    )
    assert found(analyzer, text) == [
        ("PERSON", "Maria Lopez"),
        ("MEDICAL_RECORD_NUMBER", "482917365"),
        ("DATE_TIME", "03/14/2024"),
        ("PHONE_NUMBER", "(617) 555-0143"),
        ("EMAIL_ADDRESS", "maria.lopez@example.org"),
        ("STREET_ADDRESS", "1234 Oak Street"),
        ("LOCATION", "Springfield"),
    ]


@pytest.mark.parametrize(
    ("text", "entity_type", "span"),
    [
        ("MRN: 00482917 on admission.", "MEDICAL_RECORD_NUMBER", "00482917"),
        ("Her medical record number 48291734 was checked.", "MEDICAL_RECORD_NUMBER", "48291734"),
        ("See chart #12345678 for details.", "MEDICAL_RECORD_NUMBER", "12345678"),
        ("Seen by Dr. Whitaker today.", "PERSON", "Dr. Whitaker"),
        ("Maria J. Lopez attended.", "PERSON", "Maria J. Lopez"),
        ("Referred by Mrs. Tina Diaz MD today.", "PERSON", "Mrs. Tina Diaz MD"),
        ("Admitted on March 14, 2024 after a fall.", "DATE_TIME", "March 14, 2024"),
        ("Admitted on 14 March 2024 after a fall.", "DATE_TIME", "14 March 2024"),
        ("Mobile 617.555.0143x12 after six.", "PHONE_NUMBER", "617.555.0143x12"),
        ("Phone +1-617-555-0143 (home).", "PHONE_NUMBER", "+1-617-555-0143"),
        ("Lives at 6277 Highland Boulevard; no pets.", "STREET_ADDRESS", "6277 Highland Boulevard"),
        ("Mail to PSC 2076, Box 9845\nAPO AA 86696 please.", "STREET_ADDRESS",
         "PSC 2076, Box 9845\nAPO AA 86696"),
        ("Phone number: 2757157125 (cell).", "PHONE_NUMBER", "2757157125"),
        ("SSN 536-22-1234 on file.", "US_SSN", "536-22-1234"),
        ("Portal https://portal.example.org/patients/123, then home.", "URL",
         "https://portal.example.org/patients/123"),
        ("Logged in from 10.20.30.40 at night.", "IP_ADDRESS", "10.20.30.40"),
    ],
)  # fmt: skip
def test_each_entity_type_span(analyzer, text, entity_type, span):
    assert found(analyzer, text) == [(entity_type, span)]


def test_recall_and_precision_on_a_demo_site(analyzer, tmp_path):
    (site,) = make_demo_consortium(
        tmp_path / "demo", sites=1, seed=3, images_per_site=5, texts_per_site=200,
        phi_fraction=0.5, resolution=8,
    )  # fmt: skip
    texts = read_texts_jsonl(site / "texts.jsonl")
    truth = [json.loads(line) for line in (site / "phi_truth.jsonl").read_text().splitlines()]
    scores = score_against_truth(scan(analyzer, texts), truth)

    planted = {span["entity_type"] for span in truth}
    assert planted == {"PERSON", "DATE_TIME", "PHONE_NUMBER", "EMAIL_ADDRESS", "STREET_ADDRESS",
                       "MEDICAL_RECORD_NUMBER"}  # fmt: skip
    for entity_type in planted:
        assert scores[entity_type]["n_truth"] >= 10, scores
        assert scores[entity_type]["recall"] >= DEMO_MIN_RECALL, (entity_type, scores)
    # Every type found, planted or not (SSN, URL, IP would be false positives here).
    for entity_type, score in scores.items():
        assert score["precision"] is None or score["precision"] >= DEMO_MIN_PRECISION, (entity_type, scores)


def test_context_words_raise_scores_in_the_blank_pipeline(analyzer):
    # Bare digit runs are PHI only after a context word ("mrn", "phone"): that needs the lemmas
    # the scan's NLP engine sets, since Presidio matches context words against lemmas.
    assert found(analyzer, "The MRN on file is 48291734.") == [("MEDICAL_RECORD_NUMBER", "48291734")]
    assert found(analyzer, "Invoice total was 48291734.") == []
    assert found(analyzer, "Order 2757157125 shipped.") == []


def test_the_faster_context_step_scores_as_presidios_own(analyzer):
    # Context words decide the weak shapes (digit runs, SSN, IMEI, phone groups): the fedgen
    # engine and enhancer must give every result the score Presidio's stock engine (with its
    # per-recognizer context round) and stock enhancer give it.
    texts = [
        "MRN 48291734, phone 0176 2345 6789, fax 617.555.0143; SSN 123-45-6789.",
        "Device IMEI 490154203237518 paired. Invoice total was 48291734 and order 2757157125.",
        "Call me back on 020 7946 0958 or text 07700 900123; member number 1EG4-TE5-MK73.",
        "",
        "zip 02139, postal code SW1A 1AA, vehicle VIN 1HGCM82633A004352",
    ]
    engine = analyzer.analyzer
    stock_engine = AnalyzerEngine.__new__(AnalyzerEngine)
    stock_engine.__dict__.update(engine.__dict__, context_aware_enhancer=LemmaContextAwareEnhancer())
    fast = [f.to_dict() for f in scan(analyzer, texts)]
    stock = [f.to_dict() for f in scan(PhiAnalyzer(stock_engine, analyzer.engine), texts)]
    assert fast == stock
    assert len(fast) >= 10


def test_no_recognizer_refines_its_own_results_by_context(analyzer):
    # The scan's engine skips Presidio's per-recognizer context round on that ground.
    for recognizer in analyzer.analyzer.registry.recognizers:
        assert type(recognizer).enhance_using_context is EntityRecognizer.enhance_using_context, recognizer.name


def test_url_patterns_skipped_only_where_they_cannot_match():
    recognizer = WordBoundedUrlRecognizer()
    texts = ["See example.org/a, then.", "Portal https://portal.example.org/x.", "http://localhost:8080 down",
             "No link. Next line.", "Seen at clinic.Mood improved.", "WWW.EXAMPLE.COM", "Dr. Smith. E. coli.", ""]  # fmt: skip
    for text in texts:
        spans = [(r.start, r.end) for r in recognizer.analyze(text, ["URL"])]
        assert spans == [(r.start, r.end) for r in UrlRecognizer.analyze(recognizer, text, ["URL"])], text
    assert recognizer.analyze(texts[0], ["URL"]) and recognizer.analyze(texts[2], ["URL"])


@pytest.mark.parametrize(
    "words", [["st", "str", "street", "strasse", "ave", "avenue"], ["via", "viale", "v", "rue", "ru"]]
)
def test_street_type_trie_matches_what_the_longest_first_alternation_matches(words):
    text = "12 Street 4 str. Strasse avenue ave viale vi rue RU Rue via V streets"
    plain = "|".join(regex.escape(w) for w in sorted(words, key=len, reverse=True))
    spans = [[m.span() for m in regex.finditer(rf"(?i:{p})\.?", text)] for p in (plain, _alternation(words))]
    assert spans[0] == spans[1] and spans[0]


def test_clean_clinical_notes_have_no_phi(analyzer):
    notes = [
        "Patient reports 3 episodes of panic per week; sertraline 50 mg daily. BP 120/80, HR 72.",
        "Follow up in 2 weeks. PHQ-9 score 12/27, GAD-7 score 9. Sleep 5 hours per night.",
        "Will continue CBT. Hope is expressed about returning to work in May.",
        "Denies suicidal ideation. Mood is low, affect congruent. Lab record reviewed, TSH 2.1.",
        "Chart reviewed with the team; medical record complete. Takes 1 tablet at bedtime.",
        "She was seen in clinic.Mood improved. Next visit.Discuss coping options.",
    ]
    assert scan(analyzer, notes) == []


def test_scan_reports_indices_and_progress(analyzer):
    texts = ["No identifiers here.", "Call 617-555-0143 today."]
    calls = []
    findings = scan(analyzer, texts, progress=lambda done, total: calls.append((done, total)))
    assert [(f.index, f.entity_type, f.start, f.end) for f in findings] == [(1, "PHONE_NUMBER", 5, 17)]
    assert findings[0].score >= MIN_SCORE
    assert set(findings[0].to_dict()) == {"index", "entity_type", "start", "end", "score"}
    assert calls == [(1, 2), (2, 2)]


def test_scan_in_two_processes_finds_the_same(analyzer):
    notes = [
        "Patient Maria Lopez, MRN 482917365, seen 03/14/2024, call (617) 555-0143.",
        "No identifiers here.",
        "Follow up at 17 rue des Lilas, 69003 Lyon; phone +33 1 45 67 89 10.",
    ]
    texts = [f"{notes[i % 3]} Visit {i}." for i in range(2 * SCAN_CHUNK + 5)]  # three chunks
    calls = []
    together = scan(analyzer, texts, processes=2, progress=lambda done, total: calls.append((done, total)))
    assert together == scan(analyzer, texts)
    assert {f.index for f in together} == {i for i in range(len(texts)) if i % 3 != 1}
    assert calls == [(SCAN_CHUNK, len(texts)), (2 * SCAN_CHUNK, len(texts)), (len(texts), len(texts))]


def test_scan_restricted_to_requested_entities(analyzer):
    text = "Maria Lopez, call 617-555-0143."
    assert found(analyzer, text) == [("PERSON", "Maria Lopez"), ("PHONE_NUMBER", "617-555-0143")]
    only_phone = scan(analyzer, [text], entities=["PHONE_NUMBER"])
    assert [f.entity_type for f in only_phone] == ["PHONE_NUMBER"]


def test_no_network_while_building_and_scanning(tmp_path, monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)

    offline = build_analyzer()  # a new pipeline and a new tldextract extractor
    texts = [
        "Write to maria.lopez@example.org or j.doe@clinic.co.uk.",
        "Not an address: someone@host.invalidtld.",  # no public suffix: e-mail rejected
        "Results at https://portal.example.org/r/1 and www.example.com today.",
    ]
    assert [(f.index, f.entity_type, texts[f.index][f.start : f.end]) for f in scan(offline, texts)] == [
        (0, "EMAIL_ADDRESS", "maria.lopez@example.org"),
        (0, "EMAIL_ADDRESS", "j.doe@clinic.co.uk"),
        (2, "URL", "https://portal.example.org/r/1"),
        (2, "URL", "www.example.com"),
    ]
    assert attempts == []


def test_ner_is_decoded_as_spacy_decodes_it(analyzer):
    """The scan steps spaCy's greedy NER decoding itself (see _greedy_entities): same entities
    as spaCy's own pipeline, whatever the batch."""
    engine = analyzer.analyzer.nlp_engine
    texts = [
        "Mrs. Okonkwo flew from Lagos to Toronto on Monday with her son Adebayo.",
        "",
        "Seen by Dr. Ingrid Halvorsen at St. Olav's Hospital in Trondheim, Norway.",
        "Call Mr. Nguyen Van Minh at Vietcombank in Ho Chi Minh City about the $2,400 invoice.",
    ]
    spacy_entities = [[(e.start_char, e.end_char, e.label_) for e in doc.ents] for doc in engine.nlp["en"].pipe(texts)]
    assert sum(map(len, spacy_entities)) >= 8
    for batch_size in (1, 3):
        artifacts = engine.artifacts(texts, batch_size)
        assert [[(e.start_char, e.end_char, e.label_) for e in a.tokens.ents] for _, a in artifacts] == spacy_entities


def test_engine_says_which_pipeline_ran(tmp_path, analyzer):
    assert analyzer.engine.startswith("spaCy en_core_web_sm")  # the default install's NER
    assert "en_core_web_sm" in analyzer.engine and "fedgen rules" in analyzer.engine
    assert build_analyzer(statistical_ner=False).engine.startswith("blank English pipeline (no statistical NER)")

    # A pipeline given by path is used as is: its own ruler knows a name Faker does not.
    nlp = spacy.blank("en")
    nlp.add_pipe("entity_ruler").add_patterns([{"label": "PERSON", "pattern": "Quux Zorblax"}])
    nlp.to_disk(tmp_path / "site-model")
    custom = build_analyzer(spacy_model=str(tmp_path / "site-model"))
    assert custom.engine.startswith(f"spaCy {tmp_path / 'site-model'} (directory) NER")
    text = "Quux Zorblax met the team."  # neither word is a known name, and no cue: rules alone miss it
    assert found(custom, text) == [("PERSON", "Quux Zorblax")]
    assert found(build_analyzer(statistical_ner=False), text) == []


def test_unknown_spacy_model_is_a_user_error():
    with pytest.raises(FedgenError, match="'en_core_web_nonexistent' is neither a directory"):
        build_analyzer(spacy_model="en_core_web_nonexistent")


def test_overlaps_keep_the_container_then_the_higher_score():
    email = PhiFinding(0, "EMAIL_ADDRESS", 10, 33, 1.0)
    domain = PhiFinding(0, "URL", 22, 33, 0.5)
    address = PhiFinding(0, "STREET_ADDRESS", 40, 60, 0.7)
    name_in_street = PhiFinding(0, "PERSON", 43, 52, 0.85)
    low = PhiFinding(0, "DATE_TIME", 70, 80, 0.6)
    high = PhiFinding(0, "PHONE_NUMBER", 75, 90, 0.75)
    # The lower-scored of two partly overlapping findings keeps only what the other does not hold.
    low_rest = PhiFinding(0, "DATE_TIME", 70, 75, 0.6)
    assert resolve_overlaps([domain, email, name_in_street, address, low, high]) == [email, address, low_rest, high]


def test_overlapping_findings_of_one_type_merge():
    with_title = PhiFinding(0, "PERSON", 12, 26, 0.7)
    with_suffix = PhiFinding(0, "PERSON", 17, 29, 0.85)
    assert resolve_overlaps([with_title, with_suffix]) == [PhiFinding(0, "PERSON", 12, 29, 0.85)]


def test_street_address_wins_over_a_name_inside_it(analyzer):
    text = "Lives at 12 Gary Hill Road, Dover, DE 19901."
    assert found(analyzer, text) == [
        ("STREET_ADDRESS", "12 Gary Hill Road"), ("LOCATION", "Dover"), ("POSTAL_CODE", "DE 19901"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "pieces"),
    [
        ("Moved to 85 Elm Ave., Apt. 4B, Boston, MA 02118 last year.",
         [("STREET_ADDRESS", "85 Elm Ave., Apt. 4B"), ("LOCATION", "Boston"), ("POSTAL_CODE", "MA 02118")]),
        ("Address: 91634 Strong Mountains Apt. 302\nWest Alyssa, DE 78723\nNext line.",
         [("STREET_ADDRESS", "91634 Strong Mountains Apt. 302"), ("LOCATION", "West Alyssa"),
          ("POSTAL_CODE", "DE 78723")]),
    ],
)  # fmt: skip
def test_an_address_is_found_as_street_city_and_postal_code(analyzer, text, pieces):
    assert found(analyzer, text) == pieces


def test_score_against_truth_counts_overlaps_of_the_same_type():
    truth = [
        {"index": 0, "entity_type": "PERSON", "start": 8, "end": 19, "value": "Maria Lopez"},
        {"index": 0, "entity_type": "DATE_TIME", "start": 30, "end": 40, "value": "03/14/2024"},
        {"index": 1, "entity_type": "PERSON", "start": 0, "end": 9, "value": "Ann Smith"},
    ]
    findings = [
        PhiFinding(0, "PERSON", 8, 14, 0.85),  # partial overlap counts
        PhiFinding(0, "PHONE_NUMBER", 30, 40, 0.5),  # right place, wrong type
        PhiFinding(2, "PERSON", 0, 9, 0.85),  # no truth there
    ]
    assert score_against_truth(findings, truth) == {
        "DATE_TIME": {"recall": 0.0, "precision": None, "n_truth": 1, "n_found": 0, "n_findings": 0, "n_correct": 0},
        "PERSON": {"recall": 0.5, "precision": 0.5, "n_truth": 2, "n_found": 1, "n_findings": 2, "n_correct": 1},
        "PHONE_NUMBER": {"recall": None, "precision": 0.0, "n_truth": 0, "n_found": 0, "n_findings": 1, "n_correct": 0},
    }


def test_read_texts_jsonl(tmp_path):
    path = tmp_path / "texts.jsonl"
    # A raw U+2028 inside a note (json.dumps(ensure_ascii=False) writes it) ends no line.
    path.write_text('{"text": "one", "label": "Normal"}\n{"text": "two\u2028lines"}\n', encoding="utf-8")
    assert read_texts_jsonl(path) == ["one", "two\u2028lines"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\n{"text": "broken"\n', "line 2: not valid JSON"),
        ('{"text": "ok"}\n{"text": "ok"}\n{"label": "Normal"}\n', 'line 3: no "text" string'),
        ('{"text": "ok"}\n\n{"text": "ok"}\n', "line 2: blank line"),
    ],
)
def test_read_texts_jsonl_names_the_bad_line(tmp_path, content, message):
    path = tmp_path / "texts.jsonl"
    path.write_text(content)
    with pytest.raises(FedgenError, match=message):
        read_texts_jsonl(path)


def test_read_texts_jsonl_missing_file(tmp_path):
    with pytest.raises(FedgenError, match="no such file"):
        read_texts_jsonl(tmp_path / "absent.jsonl")


def test_redact_keeps_shape_not_content():
    assert redact("Maria Lopez") == "M**** L****"
    assert redact("(617) 555-0143") == "(6**) 5**-0***"
    assert redact("maria.lopez@example.org") == "m****.l****@e******.o**"


def test_default_entities_cover_the_demo_truth_types():
    demo_types = {"PERSON", "DATE_TIME", "PHONE_NUMBER", "EMAIL_ADDRESS", "STREET_ADDRESS",
                  "MEDICAL_RECORD_NUMBER"}  # fmt: skip
    assert demo_types <= set(PHI_ENTITIES)
