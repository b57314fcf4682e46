"""How long a generated note may run: each site's coarse note length, the run's record of the
longest, and the bound `fedgen generate` stops at. Tiny random Llama (byte tokens: a note of k
bytes is k + 1 tokens with its end token)."""

from __future__ import annotations

import json
import math

import pytest
from flwr.app import ArrayRecord

from fedgen.artifacts import NOTE_TOKENS_KEY, RunDir
from fedgen.config import load_config
from fedgen.generate import generate_texts
from fedgen.modalities import NOTE_TOKENS, TextModality, coarse_note_length
from fedgen.models.text import encode_examples
from fedgen.privacy.ledger import PrivacyLedger
from fedgen.server.train_app import longest_note, save_checkpoint

TINY = {
    "modality": "text",
    "text.base_model": "tiny-random-llama",
    "text.tiny_hidden_size": 16,
    "text.tiny_layers": 1,
    "text.tiny_heads": 2,
    "text.dtype": "float32",
    "text.max_length": 320,
}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return TextModality(load_config(None, TINY), work_dir=tmp_path_factory.mktemp("base"))


def notes(task: TextModality, byte_lengths: list[int]):
    """A train set of notes of the given lengths in bytes."""
    records = [("Anxiety", "x" * k) for k in byte_lengths]
    return encode_examples(task.tokenizer(), records, prompts=task.prompts(), max_length=task.config.text.max_length)


def test_the_length_is_a_high_quantile_rounded_up_and_never_from_fewer_than_20_notes():
    assert coarse_note_length([10] * 19) is None
    assert coarse_note_length([10] * 20) == 32
    assert coarse_note_length([32] * 20) == 32
    assert coarse_note_length([33] * 20) == 64
    # The 18th of 20: the two longest notes do not move it, a third does.
    assert coarse_note_length([10] * 18 + [100, 5000]) == 32
    assert coarse_note_length([10] * 17 + [100, 100, 5000]) == 128
    assert coarse_note_length(list(range(1, 101))) == 96  # the 90th of 100


def test_a_text_site_reports_its_note_and_end_token_lengths_only_from_20_notes(task):
    assert task.reply_metrics(notes(task, [9] * 17 + [99] * 3)) == {NOTE_TOKENS: 128}  # 100 tokens
    assert task.reply_metrics(notes(task, [9] * 18 + [99] * 2)) == {NOTE_TOKENS: 32}  # 10 tokens
    assert math.isnan(task.reply_metrics(notes(task, [9] * 19))[NOTE_TOKENS])


def test_generation_stops_at_the_recorded_length_unless_the_configuration_says(task, tmp_path):
    longest_prompt = max(len(p) for p in task.prompts().prompts.values())
    bound = 320 - longest_prompt
    assert task.max_new_tokens() == bound
    assert task.max_new_tokens(96) == 96
    assert task.max_new_tokens(10_000) == bound  # never past what every training note fits in
    explicit = TextModality(load_config(None, {**TINY, "text.max_new_tokens": 7}), work_dir=task.work_dir)
    assert explicit.max_new_tokens(96) == 7


def test_the_run_keeps_the_longest_length_any_site_reported():
    assert longest_note(None, {}) is None
    assert longest_note(None, {"site-1": 64, "site-2": 128}) == 128
    assert longest_note(160, {"site-1": 64}) == 160  # a site that missed this round still counts
    assert longest_note(64, {"site-1": 96}) == 96


def test_fedgen_generate_reads_the_length_from_the_checkpoint(task, tmp_path, monkeypatch, capsys):
    run = RunDir.create(tmp_path / "runs", task.config, "run")
    model = task.build_model()
    ledger = PrivacyLedger(run.ledger_path)
    save_checkpoint(run, task, model, ArrayRecord(torch_state_dict=task.get_state(model)), 1, ledger,
                    round_info={NOTE_TOKENS_KEY: 64})  # fmt: skip
    asked = []

    def sampler(*args, max_new_tokens, labels, progress, **kwargs):
        asked.append(max_new_tokens)
        progress(max_new_tokens, max_new_tokens)
        return ["a note"] * len(labels)

    monkeypatch.setattr("fedgen.models.text.generate_texts", sampler)
    path = generate_texts(run, per_class=2, classes=["Anxiety"])
    assert asked == [64]
    assert "sampling 2 texts of at most 64 tokens: 64/64 decoding steps" in capsys.readouterr().err
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"text": "a note", "label": "Anxiety"}] * 2
