"""Public pretraining of the text adapter: what it writes, what a run checks before starting from it."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import fedgen.models.pretrained as pretrained_module
from fedgen.audits.pooling import _pretraining
from fedgen.audits.report import render_html
from fedgen.cli import app
from fedgen.config import MENTAL_HEALTH_CLASSES, load_config
from fedgen.data.demo import make_public_note_folder
from fedgen.errors import FedgenError
from fedgen.manifest import file_sha256
from fedgen.modalities import TextModality
from fedgen.models.base_models import PACKAGED_MODELS
from fedgen.models.pretrained import (
    ADAPTER_WEIGHTS,
    RECORD_NAME,
    SHIPPED,
    SHIPPED_PREFIX,
    adapter_setup_of,
    checkpoint_folder,
    load_pretrained_adapter,
)
from fedgen.models.text import ADAPTER_FILES
from fedgen.pretrain import PROVENANCE_NAME, create_run, pretrain_text_adapter
from tests.test_gate import example_report

TINY_TEXT = {
    "modality": "text",
    "text.base_model": "tiny-random-llama",
    "text.tiny_hidden_size": 32,
    "text.tiny_layers": 1,
    "text.tiny_heads": 2,
    "text.target_modules": ["q_proj", "v_proj", "lm_head"],
    "text.max_length": 768,  # byte tokens: a public note is up to ~600
}


@pytest.fixture(scope="module")
def public_notes(tmp_path_factory):
    return make_public_note_folder(tmp_path_factory.mktemp("public") / "notes", notes=12, seed=5)


@pytest.fixture(scope="module")
def adapter(public_notes, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    pretrain_text_adapter(public_notes, out, load_config(None, TINY_TEXT), epochs=2, batch_size=4, lr=1e-2)
    return out


def _starting_adapter(config, work_dir):
    task = TextModality(config, work_dir=work_dir)
    return task.get_state(task.initial_model())


def test_pretraining_writes_an_adapter_and_its_record(adapter, public_notes):
    record = json.loads((adapter / RECORD_NAME).read_text())
    assert record["notes"] == 12 and record["steps"] == 2 * 3
    assert sum(record["class_counts"].values()) == 12 and len(record["class_counts"]) == 5
    assert record["text_config"]["lora_rank"] == 8 and record["text_config"]["base_model"] == "tiny-random-llama"
    assert len(record["weights_sha256"]) == 64 and len(record["content_sha256"]) == 64
    assert sorted(path.name for path in adapter.iterdir()) == sorted([*ADAPTER_FILES, RECORD_NAME])
    tensors = load_file(adapter / ADAPTER_WEIGHTS)
    lora_b = [t for name, t in tensors.items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # B starts at 0: it trained


def test_a_run_starts_from_the_pretrained_adapter(adapter, tmp_path):
    config = load_config(None, {**TINY_TEXT, "text.init_adapter": str(adapter)})
    start = _starting_adapter(config, tmp_path)
    saved = load_file(adapter / ADAPTER_WEIGHTS)
    assert len(start) == len(saved)
    for name, tensor in start.items():  # PEFT saves without the adapter's name
        assert torch.equal(tensor, saved[name.replace(".default", "")])
    fresh = _starting_adapter(load_config(None, TINY_TEXT), tmp_path)
    assert all(t.abs().sum() == 0 for name, t in fresh.items() if "lora_B" in name)


def test_a_run_records_the_adapter_it_starts_from(adapter, tmp_path, monkeypatch):
    monkeypatch.chdir(adapter.parent)
    run = create_run(tmp_path / "runs", load_config(None, {**TINY_TEXT, "text.init_adapter": adapter.name}), "r")
    record = json.loads((run.root / PROVENANCE_NAME).read_text())
    assert set(record) == {"text"}
    assert record["text"]["checkpoint"] == str(adapter.resolve()) == run.config().text.init_adapter
    assert record["text"]["notes"] == 12

    report = example_report()
    report["run"]["pretraining"] = _pretraining(run)
    html = render_html(report, run_root=run.root)
    assert "The text model started from a checkpoint trained without DP" in html
    assert "public notes" in html and record["text"]["weights_sha256"] in html


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"text.lora_rank": 4}, r"was trained with text\.lora_rank = 8 but the run sets 4"),
        ({"text.user_prompt": "Note on {label}."}, r"was trained with text\.user_prompt = .* but the run sets"),
        ({"data.text_classes": ["calm", "tense"]}, "learned the classes .* but the run's text classes are calm, tense"),
    ],
)
def test_an_adapter_that_does_not_fit_the_run_is_one_line(adapter, tmp_path, change, message):
    config = load_config(None, {**TINY_TEXT, "text.init_adapter": str(adapter), **change})
    with pytest.raises(FedgenError, match=message):
        create_run(tmp_path / "runs", config, "r")
    assert not (tmp_path / "runs" / "r").exists()


def test_changed_adapter_weights_are_refused(adapter, tmp_path):
    changed = tmp_path / "changed"
    changed.mkdir()
    for path in adapter.iterdir():
        (changed / path.name).write_bytes(path.read_bytes())
    tensors = load_file(changed / ADAPTER_WEIGHTS)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, changed / ADAPTER_WEIGHTS)
    config = load_config(None, {**TINY_TEXT, "text.init_adapter": str(changed)})
    with pytest.raises(FedgenError, match=r"adapter_model\.safetensors has SHA-256 .* the weights were changed"):
        _starting_adapter(config, tmp_path)


def test_adapter_pretraining_needs_both_lora_factors_to_train():
    with pytest.raises(FedgenError, match="init_adapter needs aggregation = fedavg"):
        load_config(None, {**TINY_TEXT, "text.init_adapter": "x", "text.aggregation": "ffa"})


def test_pretraining_refuses_notes_of_other_classes_and_an_existing_folder(adapter, tmp_path):
    config = load_config(None, {**TINY_TEXT, "data.text_classes": ["calm", "tense"]})
    public = make_public_note_folder(tmp_path / "notes", notes=5, seed=1)
    with pytest.raises(FedgenError, match="texts.jsonl line 1: .*not in"):
        pretrain_text_adapter(public, tmp_path / "out", config, epochs=1, batch_size=4, lr=1e-3)
    assert not (tmp_path / "out").exists()
    with pytest.raises(FedgenError, match="already exists"):
        pretrain_text_adapter(public, adapter, config, epochs=1, batch_size=4, lr=1e-3)


def test_the_cli_writes_public_notes_and_pretrains_on_them(tmp_path):
    runner = CliRunner()
    notes = tmp_path / "public"
    result = runner.invoke(app, ["demo-public", str(notes), "--notes", "10"])
    assert result.exit_code == 0, result.output
    assert len((notes / "texts.jsonl").read_text().splitlines()) == 10
    config = tmp_path / "tiny.toml"
    config.write_text(
        'modality = "text"\n[text]\nbase_model = "tiny-random-llama"\ntiny_hidden_size = 32\n'
        'tiny_layers = 1\ntiny_heads = 2\nmax_length = 768\ntarget_modules = ["q_proj", "lm_head"]\n'
    )
    out = tmp_path / "adapter"
    args = ["pretrain", "--modality", "text", "--public", str(notes), "--out", str(out), "--config", str(config)]
    result = runner.invoke(app, [*args, "--epochs", "1", "--batch-size", "5"])
    assert result.exit_code == 0, result.output
    assert "pretrained the text adapter on 10 public notes: 2 steps" in result.output
    result = runner.invoke(app, [*args[:-4], "--out", str(tmp_path / "other"), "--ema-decay", "0.9"])
    assert result.exit_code == 1 and "--ema-decay and --balance-classes are for images" in result.output


# --- the adapter fedgen ships ---------------------------------------------------------------------

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "scripts" / "demo.toml"
NOTES_ADAPTER = "public-notes-smollm2"


def test_the_demo_starts_from_the_shipped_notes_adapter_as_recorded():
    config = load_config(DEMO_CONFIG)
    assert config.text.init_adapter == SHIPPED_PREFIX + NOTES_ADAPTER
    record = SHIPPED[NOTES_ADAPTER]
    weights = checkpoint_folder(config.text.init_adapter) / ADAPTER_WEIGHTS
    assert weights.stat().st_size <= 2 * 2**20 and file_sha256(weights) == record["weights_sha256"]
    assert record["recipe"] == "bash scripts/pretrain-notes.sh"
    assert record["text_config"]["base_model_sha256"] == PACKAGED_MODELS[config.text.base_model].sha256
    assert adapter_setup_of(record["text_config"]) == adapter_setup_of(config.text)
    tensors = load_pretrained_adapter(config.text.init_adapter, config.text, sorted(MENTAL_HEALTH_CLASSES))
    # q and v of the top lora_layers layers, an A and a B each
    assert len(tensors) == 2 * len(config.text.target_modules) * config.text.lora_layers


def test_the_shipped_notes_adapter_refuses_changed_weights_and_another_base_model(tmp_path, monkeypatch):
    config = load_config(DEMO_CONFIG)
    copy = shutil.copytree(checkpoint_folder(config.text.init_adapter), tmp_path / NOTES_ADAPTER)
    monkeypatch.setattr(pretrained_module, "SHIPPED_ROOT", tmp_path)
    other = config.text.model_copy(update={"base_model_sha256": "1" * 64})
    with pytest.raises(FedgenError, match=r"adapts smollm2-135m-instruct with SHA-256 .* another version"):
        load_pretrained_adapter(config.text.init_adapter, other, MENTAL_HEALTH_CLASSES)
    tensors = load_file(copy / ADAPTER_WEIGHTS)
    name = next(iter(tensors))
    tensors[name] = tensors[name] * 2
    save_file(tensors, copy / ADAPTER_WEIGHTS)
    with pytest.raises(FedgenError, match=f"fedgen:{NOTES_ADAPTER}: {ADAPTER_WEIGHTS} has SHA-256 .* changed"):
        load_pretrained_adapter(config.text.init_adapter, config.text, MENTAL_HEALTH_CLASSES)
