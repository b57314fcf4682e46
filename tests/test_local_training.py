"""A site's round in plain PyTorch (clients/local.py): budget refusal, DP plan, checkpoints."""

import math

import pytest
import torch
from torch.utils.data import TensorDataset

from fedgen.clients import local
from fedgen.clients.local import BudgetExhausted, train_site
from fedgen.clients.text_audit import text_member_scores, text_note_logprobs
from fedgen.config import load_config
from fedgen.data.demo import make_demo_consortium
from fedgen.data.site import load_site
from fedgen.modalities import FROZEN_STATES_DIR, MIN_NOTES_FOR_LENGTH, NOTE_TOKENS, ImageModality, TextModality
from fedgen.privacy.accounting import epsilon_from_history
from fedgen.privacy.plan import plan_privacy

TINY = {
    "image.resolution": 16,
    "image.block_out_channels": [16, 32],
    "image.norm_num_groups": 4,
    "image.batch_size": 8,
    "image.local_epochs": 1,
    "federation.rounds": 2,
    "privacy.epsilon": 4.0,
    "text.tiny_hidden_size": 32,
    "text.tiny_layers": 1,
    # the tiny random Llama (byte tokens: a demo note is up to 600), learning through lm_head
    "text.base_model": "tiny-random-llama",
    "text.target_modules": ["q_proj", "v_proj", "lm_head"],
    "text.dtype": "float32",
    "text.max_length": 640,
}


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    return make_demo_consortium(root / "sites", sites=1, seed=3, images_per_site=30, texts_per_site=20, resolution=16)[
        0
    ]


@pytest.mark.slow
def test_a_site_refuses_the_round_that_would_overspend_its_budget(site_dir, tmp_path):
    config = load_config(None, TINY)
    site = load_site(site_dir, config.data, modalities=("image",), channels=1)
    task = ImageModality(config, work_dir=tmp_path)
    plan = plan_privacy(config, site, modality="image")
    spent = [plan.round_entry(), plan.round_entry()]  # both planned rounds already trained
    assert epsilon_from_history(spent, delta=plan.delta) <= 4.0
    state = task.get_state(task.build_model())
    with pytest.raises(BudgetExhausted, match=r"site-1 refuses to train image: its ε would reach .* past its budget 4"):
        train_site(task, site, state, histories={"image": spent}, seed=0)
    update = train_site(task, site, state, histories={"image": spent[:1]}, seed=0)
    assert update.metrics["epsilon"] == pytest.approx(epsilon_from_history(spent, delta=plan.delta), rel=1e-6)
    assert update.metrics["epsilon-next"] > 4.0  # the server learns it cannot ask again


def test_a_text_checkpoint_trains_on_from_where_it_stopped(site_dir, tmp_path):
    config = load_config(None, {**TINY, "modality": "text"})
    task = TextModality(config, work_dir=tmp_path)
    model = task.build_model()
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in task.get_state(model).items()}
    task.set_state(model, state)
    task.save(model, tmp_path / "ckpt")
    again = task.get_state(task.load_trainable(tmp_path / "ckpt"))
    assert again.keys() == state.keys()
    assert all(torch.equal(again[k], state[k]) for k in state)


def test_text_trains_with_ghost_clipping_and_the_same_accounting(site_dir, tmp_path):
    config = load_config(None, {**TINY, "modality": "text", "text.grad_sample_mode": "ghost", "text.max_new_tokens": 8})
    site = load_site(site_dir, config.data, modalities=("text",))
    task = TextModality(config, work_dir=tmp_path)
    before = task.get_state(task.build_model())
    update = train_site(task, site, before, histories={}, seed=0)
    assert update.metrics["epsilon"] == pytest.approx(
        epsilon_from_history(update.history, delta=update.metrics["delta"])
    )
    assert any(not torch.equal(update.state[k], before[k]) for k in before)  # the adapter moved
    assert update.metrics["num-examples"] < MIN_NOTES_FOR_LENGTH
    assert math.isnan(update.metrics[NOTE_TOKENS])  # too few notes to say how long they run


def test_each_modality_trains_with_its_own_clipping_bound(site_dir, tmp_path, monkeypatch):
    config = load_config(None, {**TINY, "modality": "text", "text.max_grad_norm": 0.02, "image.max_grad_norm": 3.0})
    site = load_site(site_dir, config.data, modalities=("text",))
    task = TextModality(config, work_dir=tmp_path)
    bounds = []
    train = local.train_local

    def recording(*args, **kwargs):
        bounds.append(kwargs["max_grad_norm"])
        return train(*args, **kwargs)

    monkeypatch.setattr(local, "train_local", recording)
    train_site(task, site, task.get_state(task.build_model()), histories={}, seed=0)
    assert bounds == [0.02]


def test_a_site_keeps_the_frozen_layers_outputs_for_its_next_rounds(site_dir, tmp_path, monkeypatch):
    config = load_config(None, {**TINY, "modality": "text", "text.tiny_layers": 3, "text.lora_layers": 1})
    site = load_site(site_dir, config.data, modalities=("text",))
    task = TextModality(config, work_dir=tmp_path)
    before = task.get_state(task.build_model())
    update = train_site(task, site, before, histories={}, seed=0)  # the first round computes them
    assert any(not torch.equal(update.state[k], before[k]) for k in before)
    cached = list((tmp_path / FROZEN_STATES_DIR).glob("*.safetensors"))
    assert len(cached) == 1

    def recompute(*args, **kwargs):
        raise AssertionError("the frozen layers ran again")

    monkeypatch.setattr("fedgen.models.text.frozen_states", recompute)
    train, _ = task.datasets(site)
    model = task.build_model()
    with_states = task.training_set(model, train)  # the next round reads them
    assert len(with_states.tensors) == 4 and with_states.tensors[3].shape[:2] == train.tensors[0].shape
    with pytest.raises(AssertionError, match="ran again"):  # other notes: other states
        task.training_set(model, TensorDataset(*(t[1:] for t in train.tensors)))


def test_the_text_audit_scores_members_from_that_cache_as_if_every_layer_ran(site_dir, tmp_path, monkeypatch):
    config = load_config(None, {**TINY, "modality": "text", "text.tiny_layers": 3, "text.lora_layers": 1})
    site = load_site(site_dir, config.data, modalities=("text",))
    task = TextModality(config, work_dir=tmp_path)
    model = task.build_model()
    with torch.no_grad():  # adapters away from their zero start, so the upper layers matter
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    train, heldout = task.datasets(site)
    every_layer = [text_note_logprobs(model, split) for split in (train, heldout)]
    task.training_set(model, train)  # what the site's training rounds leave in its state folder

    def recompute(*args, **kwargs):
        raise AssertionError("the frozen layers ran again")

    monkeypatch.setattr("fedgen.models.text.frozen_states", recompute)
    scores = text_member_scores(task, site, model)
    for split, logprobs in enumerate(every_layer):
        expected = [lp.mean() for lp in logprobs]
        assert scores["loss"][split] == pytest.approx(expected, rel=1e-5)
