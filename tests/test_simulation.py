"""End to end on Flower's simulation engine: 2 simulated sites, 2 rounds, both modalities."""

import json

import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from PIL import Image
from typer.testing import CliRunner

from fedgen.artifacts import SITE_STATE_DIR, RunDir
from fedgen.cli import app
from fedgen.config import load_config
from fedgen.data.demo import make_demo_consortium
from fedgen.data.site import load_site
from fedgen.errors import FedgenError
from fedgen.modalities import TextModality, coarse_note_length
from fedgen.privacy.ledger import PrivacyLedger
from fedgen.simulations.engine import check_sites, simulate, site_cpus

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
TINY = {
    "modality": "both",
    "federation.rounds": 2,
    "federation.sites": 2,
    "privacy.epsilon": 8.0,
    "image.resolution": 16,
    "image.block_out_channels": [16, 32],
    "image.norm_num_groups": 4,
    "image.batch_size": 16,
    "image.sample_steps": 4,
    "image.ema_decay": 0.5,
    "text.tiny_hidden_size": 32,
    "text.tiny_layers": 1,
    # the tiny random Llama (byte tokens: a demo note is up to 600), learning through lm_head
    "text.base_model": "tiny-random-llama",
    "text.target_modules": ["q_proj", "v_proj", "lm_head"],
    "text.dtype": "float32",
    "text.max_length": 640,
    "text.batch_size": 8,
    "text.max_new_tokens": 24,
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("simulation")
    sites = make_demo_consortium(root / "sites", sites=2, seed=1, images_per_site=40, texts_per_site=30, resolution=16)
    config = load_config(None, TINY)
    check_sites(config, sites)
    run = RunDir.create(root / "runs", config, "tiny")
    simulate(run, sites)
    return run


def site_note_length(run, site_dir):
    """What the site computes from its own train split (its notes never reach the coordinator)."""
    config = run.config()
    site = load_site(site_dir, config.data, modalities=("text",))
    train, _ = TextModality(config, work_dir=site_dir / SITE_STATE_DIR).datasets(site)
    return coarse_note_length(train.tensors[2].sum(dim=1).tolist())


def independent_epsilon(history, delta):
    rdp = sum(compute_rdp(q=q, noise_multiplier=s, steps=n, orders=ORDERS) for s, q, n in history)
    return get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)[0]


@pytest.mark.e2e
@pytest.mark.parametrize("modality", ["image", "text"])
def test_every_round_is_checkpointed_and_ledgered_once_per_site(run, modality):
    assert run.completed_rounds(modality) == [1, 2]
    rows = PrivacyLedger(run.ledger_path).entries(modality=modality)
    assert sorted((r.site, r.round) for r in rows) == [("site-1", 1), ("site-1", 2), ("site-2", 1), ("site-2", 2)]
    metrics = json.loads((run.checkpoint(modality) / "metrics.json").read_text())
    assert set(metrics["sites"]) == {"site-1", "site-2"}
    if modality == "text":  # the longest of the sites' coarse note lengths, for generation
        assert metrics["note_tokens"] == max(site_note_length(run, site) for site in run.simulated_sites())
    else:
        assert "note_tokens" not in metrics


@pytest.mark.e2e
@pytest.mark.parametrize("modality", ["image", "text"])
def test_ledger_epsilon_matches_an_independent_accountant(run, modality):
    ledger = PrivacyLedger(run.ledger_path)
    for site in ("site-1", "site-2"):
        rows = ledger.entries(site=site, modality=modality)
        history = ledger.history(site, modality)
        assert all(s > 0 for s, _, _ in history)
        expected = independent_epsilon(history, rows[-1].delta)
        assert rows[-1].epsilon == pytest.approx(expected, rel=0.01)
        assert rows[0].epsilon < rows[-1].epsilon
        assert all(r.loss is None for r in rows)  # under DP the loss stays at the site


@pytest.mark.e2e
def test_each_sites_modalities_together_spend_its_budget_once(run):
    """The same people's images and notes: one accountant over all of a site's rows."""
    ledger = PrivacyLedger(run.ledger_path)
    for site in ("site-1", "site-2"):
        rows = ledger.entries(site=site)
        assert {r.modality for r in rows} == {"image", "text"}
        assert all(r.composition == "same people" and r.accountant == "rdp" for r in rows)
        composed = independent_epsilon([r.entry for r in rows], rows[-1].delta)
        # σ was calibrated so that the planned rounds of both modalities spend the target once.
        assert 0.95 * 8.0 <= composed <= 8.0 * 1.01
        assert rows[-1].site_epsilon == pytest.approx(composed, rel=0.01)
        assert all(r.epsilon < 0.9 * 8.0 for r in rows)  # neither modality spent it alone


@pytest.mark.e2e
def test_generate_writes_class_labelled_pngs_and_a_contact_sheet(run):
    result = CliRunner().invoke(
        app, ["generate", str(run.root), "--modality", "image", "--per-class", "2", "--steps", "3"]
    )
    assert result.exit_code == 0, result.output
    classes = run.config().data.image_classes
    folders = sorted(p.name for p in (run.synthetic / "images").iterdir())
    assert folders == sorted(classes)
    for name in classes:
        files = sorted((run.synthetic / "images" / name).glob("*.png"))
        assert len(files) == 2
        assert Image.open(files[0]).size == (16, 16)
    sheet = Image.open(run.synthetic / "contact-sheet.png")
    assert sheet.width > sheet.height / 2  # one column per class


@pytest.mark.e2e
def test_generate_writes_labelled_texts(run):
    result = CliRunner().invoke(
        app,
        [
            "generate",
            str(run.root),
            "--modality",
            "text",
            "--per-class",
            "2",
            "--class",
            "Anxiety",
            "--class",
            "Stress",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (run.synthetic / "texts.jsonl").read_text().splitlines()]
    assert [note["label"] for note in lines] == ["Anxiety", "Anxiety", "Stress", "Stress"]
    assert all(isinstance(note["text"], str) for note in lines)


@pytest.mark.parametrize(
    ("option", "error"),
    [
        (["--class", "Glaucoma"], "unknown class 'Glaucoma'"),
        (["--sampler", "euler"], "unknown sampler 'euler': choose one of ddim, dpm, ddpm"),
    ],
)
@pytest.mark.e2e
def test_an_unknown_class_or_sampler_is_refused_and_nothing_is_written(run, option, error):
    before = sorted(p.relative_to(run.root) for p in run.root.rglob("*"))
    result = CliRunner().invoke(app, ["generate", str(run.root), *option])
    assert result.exit_code == 1
    assert error in result.output
    assert sorted(p.relative_to(run.root) for p in run.root.rglob("*")) == before


@pytest.mark.e2e
def test_a_missing_checkpoint_round_is_one_line(run):
    result = CliRunner().invoke(app, ["generate", str(run.root), "--round", "7"])
    assert result.exit_code == 1
    assert "no complete image checkpoint for round 7" in result.output


def test_a_note_longer_than_the_model_takes_is_refused_before_the_run(tmp_path):
    sites = make_demo_consortium(tmp_path / "sites", sites=1, seed=2, images_per_site=10, texts_per_site=10)
    config = load_config(
        None,
        {
            "modality": "text",
            "text.max_length": 64,
            "text.base_model": "tiny-random-llama",
            "text.tiny_hidden_size": 32,
            "text.tiny_layers": 1,
        },
    )
    with pytest.raises(
        FedgenError, match=r"site-1: text record \d+ is \d+ tokens with its prompt, longer than text.max_length 64"
    ):
        check_sites(config, sites)


@pytest.mark.e2e
def test_the_image_checkpoint_keeps_the_ema_of_the_global_model(run):
    from safetensors.torch import load_file

    from fedgen.models.diffusion import update_ema

    rounds = [load_file(str(run.round_dir(r) / "image" / "diffusion_pytorch_model.safetensors")) for r in (1, 2)]
    ema = load_file(str(run.round_dir(2) / "image" / "ema" / "diffusion_pytorch_model.safetensors"))
    expected = update_ema(update_ema(None, rounds[0], 0.5), rounds[1], 0.5)
    for key in ("conv_in.weight", "class_embedding.weight"):
        assert torch.allclose(ema[key], expected[key], atol=1e-6)
    assert not torch.allclose(ema["conv_in.weight"], rounds[1]["conv_in.weight"])
    assert run.sampling_checkpoint("image") == run.round_dir(2) / "image" / "ema"  # what generate samples


@pytest.mark.e2e
def test_each_checkpoint_records_round_time_and_the_sites_training_time(run):
    info = json.loads((run.checkpoint("image") / "metrics.json").read_text())
    assert set(info["site_train_seconds"]) == {"site-1", "site-2"}
    assert 0 < max(info["site_train_seconds"].values()) < info["round_seconds"]
    assert info["failures"] == []


@pytest.mark.parametrize(
    ("cores", "threads", "sites", "cpus", "at_once"),
    [(2, 1, 2, 1, 2), (2, 1, 3, 0.66, 3), (2, 1, 7, 0.28, 7), (8, 2, 3, 2, 3), (2, 2, 1, 2, 1), (1, 1, 1, 1, 1)],
)
def test_simulated_sites_share_the_cores_so_that_all_train_at_once(monkeypatch, cores, threads, sites, cpus, at_once):
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    assert site_cpus(threads, sites) == pytest.approx(cpus)
    assert int(cores / site_cpus(threads, sites)) >= at_once  # Flower's actor pool: cores // share
