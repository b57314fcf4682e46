"""Site-side PHI replay (normalised matching, counts only, no truth file) and the release's
placeholder and surrogate replacement of detected spans."""

import pytest
import torch

from fedgen.audits.gate import evaluate_gate, load_policy
from fedgen.audits.phi import PhiFinding, build_analyzer, scan
from fedgen.audits.phi_redaction import PLACEHOLDERS, Surrogates, redact_texts, replace_spans
from fedgen.audits.phi_replay import SitePhi, count_replays, replay_keys, site_replay_audit
from fedgen.config import TextConfig
from fedgen.models.text import (
    add_lora,
    class_prompts,
    encode_examples,
    generate_texts,
    load_base_model,
    make_tiny_llama,
    sequence_loss,
)
from tests.test_gate import example_report


@pytest.fixture(scope="module")
def analyzer():
    return build_analyzer()


# --- normalised matching ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "value", "synthetic", "replayed"),
    [
        ("PERSON", "María López", "Seen with MARIA  LOPEZ today.", True),
        ("PERSON", "María López", "Seen with Maria Lopezova today.", False),  # whole words only
        ("PHONE_NUMBER", "(617) 555-0143", "Call 617.555.0143.", True),
        ("PHONE_NUMBER", "(617) 555-0143", "Call +1 617 555 0143.", True),
        ("PHONE_NUMBER", "(617) 555-0143", "Call 6175550143.", True),
        ("PHONE_NUMBER", "(617) 555-0143", "Call 617 555 0144.", False),
        ("DATE_TIME", "03/04/2024", "Seen 3.4.2024 in clinic.", True),
        ("DATE_TIME", "03/04/2024", "Seen 13.4.2024 in clinic.", False),
        ("DATE_TIME", "March 14, 2024", "Admitted march 14 2024.", True),
        ("MEDICAL_RECORD_NUMBER", "AB-123 456", "MRN ab123456 noted.", True),
        ("US_SSN", "536-22-1234", "SSN 536 22 1234.", True),
        ("EMAIL_ADDRESS", "k.mensah@clinic.co.uk", "Write to K.Mensah@Clinic.co.uk.", True),
    ],
)  # fmt: skip
def test_values_match_after_normalisation(kind, value, synthetic, replayed):
    assert bool(SitePhi.from_values([(kind, value)]).kinds_in(synthetic)) is replayed


@pytest.mark.parametrize(
    ("kind", "value"),
    [("PERSON", "Maria"), ("PERSON", "Ann Li"[:5]), ("LOCATION", "Boston"), ("POSTAL_CODE", "02118"),
     ("AGE", "93"), ("DATE_TIME", "March 14"), ("PHONE_NUMBER", "0143")],
)  # fmt: skip
def test_values_that_turn_up_by_chance_are_not_matched(kind, value):
    assert replay_keys(kind, value) == []


def test_counts_only_leave_the_site():
    site = SitePhi.from_values([("PERSON", "Chidubem Okonkwo"), ("PHONE_NUMBER", "+44 20 7946 0958")])
    counts = count_replays(["Chidubem Okonkwo called.", "Ring 020 7946 0958 now.", "Nothing here."], site)
    assert counts == {"texts_with_replay": 2, "by_kind": {"PERSON": 1, "PHONE_NUMBER": 1}, "n_synthetic": 3}
    assert site.values_per_kind() == {"PERSON": 1, "PHONE_NUMBER": 1}


# --- a memorising model, no truth file -----------------------------------------------------------

TINY = TextConfig(base_model="tiny-random-llama", tiny_hidden_size=32, tiny_layers=1, tiny_heads=2, max_length=128, max_new_tokens=96,
                  target_modules=["q_proj", "v_proj", "lm_head"])  # fmt: skip
# Training notes of a site, PHI written here (not the demo generator's); the one "Stress" note
# is the only note of its class, so a model trained without DP learns it by heart.
TRAINING = [
    ("Anxiety" if i % 2 else "Depression", f"Reports {s} for {i + 2} weeks, sleep is poor.")
    for i, s in enumerate(["worry", "low mood", "panic", "fatigue", "tearfulness", "headaches"] * 3)
]  # fmt: skip
TRAINING.insert(5, ("Stress", "Pt Chidubem Okonkwo, MRN 48291736, call +44 20 7946 0958."))
STEPS, LR = 200, 1e-2
# Synthetic notes written independently: PHI-like values, none of them the site's.
INDEPENDENT = [
    "Pt Aroha Ngata, MRN 73920418, call +44 20 7946 0321.",
    "Reports worry for 3 weeks; seen by Dr. Siddharth Raghunathan on 4 May 2021.",
    "Follow up at 17 rue des Lilas, 69003 Lyon; phone +33 1 45 67 89 10.",
]


@pytest.fixture(scope="module")
def memorised_notes(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread is faster on 2 shared cores
    try:
        base_dir = make_tiny_llama(tmp_path_factory.mktemp("text") / "tiny", config=TINY)
        base, tokenizer = load_base_model(base_dir)
        model = add_lora(base, TINY, seed=0)
        prompts = class_prompts(tokenizer, TINY, ["Anxiety", "Depression", "Stress"])
        train = encode_examples(tokenizer, TRAINING, prompts=prompts, max_length=TINY.max_length)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
        model.train()
        torch.manual_seed(0)
        for _ in range(STEPS):  # no DP: plain full-batch steps
            optimizer.zero_grad()
            sequence_loss(model, *train.tensors).mean().backward()
            optimizer.step()
        return generate_texts(model, tokenizer, prompts=prompts, labels=["Stress"] * 4,
                              temperature=0.1, top_p=0.95, max_new_tokens=TINY.max_new_tokens, seed=0)  # fmt: skip
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_a_model_trained_without_dp_replays_site_phi_found_without_a_truth_file(analyzer, memorised_notes):
    training_texts = [text for _, text in TRAINING]
    replay = site_replay_audit(training_texts, memorised_notes, analyzer)  # no truth: the detector's values
    assert replay["texts_with_replay"] > 0, memorised_notes
    assert set(replay["by_kind"]) >= {"PERSON", "MEDICAL_RECORD_NUMBER"}
    assert replay["values_per_kind"]["PERSON"] >= 1 and replay["values_per_kind"]["PHONE_NUMBER"] == 1
    assert "detector_at_site" not in replay
    independent = site_replay_audit(training_texts, INDEPENDENT, analyzer)
    assert independent["texts_with_replay"] == 0 and independent["by_kind"] == {}
    # The gate refuses the replaying model whatever the PHI action, and passes the independent notes.
    report = example_report(modalities=("text",))
    failed = {}
    for name, audit in (("memorised", replay), ("independent", independent)):
        report["phi"]["memorisation"]["phi_replay"] = audit["texts_with_replay"]
        failed[name] = [c["name"] for c in evaluate_gate(report, load_policy())["checks"] if not c["passed"]]
    assert failed == {"memorised": ["memorisation.text.phi_replay"], "independent": []}


def test_a_truth_file_scores_the_detector_at_the_site(analyzer):
    texts = [text for _, text in TRAINING]
    note = texts[5]
    truth = [
        {"index": 5, "entity_type": kind, "start": note.index(value), "end": note.index(value) + len(value), "value": value}
        for kind, value in [("PERSON", "Chidubem Okonkwo"), ("MEDICAL_RECORD_NUMBER", "48291736"), ("PHONE_NUMBER", "+44 20 7946 0958")]
    ]  # fmt: skip
    scores = site_replay_audit(texts, INDEPENDENT, analyzer, truth=truth)["detector_at_site"]
    assert {kind: s["recall"] for kind, s in scores.items()} == {
        "MEDICAL_RECORD_NUMBER": 1.0, "PERSON": 1.0, "PHONE_NUMBER": 1.0,
    }  # fmt: skip


# --- placeholders and surrogates ----------------------------------------------------------------


def test_placeholders_change_only_the_detected_spans(analyzer):
    texts = [
        "Seen with her son Chidubem Okonkwo on March 14, 2024; call +44 20 7946 0958. Mood improved.",
        "No identifiers in this note at all.",
    ]
    findings = scan(analyzer, texts)
    redacted, counts = redact_texts(texts, findings, action="placeholder", kinds=PLACEHOLDERS)
    assert redacted == ["Seen with her son [NAME] on [DATE]; call [PHONE]. Mood improved.", texts[1]]
    assert counts == {"DATE_TIME": 1, "PERSON": 1, "PHONE_NUMBER": 1}


def test_only_the_policys_kinds_are_replaced():
    findings = [PhiFinding(0, "PERSON", 0, 5, 0.9), PhiFinding(0, "DATE_TIME", 9, 15, 0.6)]
    redacted, counts = redact_texts(["Maria on May 14."], findings, action="placeholder", kinds=["PERSON"])
    assert redacted == ["[NAME] on May 14."] and counts == {"PERSON": 1}


def test_surrogates_are_consistent_within_a_release_and_keep_the_rest():
    surrogates = Surrogates(key=b"k" * 32)
    text = "Maria Lopez called; MARIA LOPEZ again, MRN AB-1234."
    spans = [(kind, text.index(value), text.index(value) + len(value))
             for kind, value in [("PERSON", "Maria Lopez"), ("PERSON", "MARIA LOPEZ"), ("MEDICAL_RECORD_NUMBER", "AB-1234")]]  # fmt: skip
    out = replace_spans(text, spans, action="surrogate", surrogates=surrogates)
    first = surrogates.surrogate("PERSON", "Maria Lopez")
    assert out.startswith(f"{first} called; {first} again, MRN ")
    mrn = out.rsplit("MRN ", 1)[1].rstrip(".")
    assert mrn != "AB-1234" and len(mrn) == 7 and mrn[2] == "-" and mrn[:2].isalpha() and mrn[3:].isdigit()
    assert Surrogates(key=b"k" * 32).surrogate("PERSON", "maria lopez") == first  # same key, same value
    assert surrogates.surrogate("AGE", "97") == "90+"


def test_replacement_refuses_overlaps_and_unknown_actions():
    with pytest.raises(ValueError, match="overlapping"):
        replace_spans("abcdef", [("PERSON", 0, 4), ("PERSON", 2, 6)], action="placeholder")
    with pytest.raises(ValueError, match="replaces nothing"):
        replace_spans("abc", [], action="refuse")
