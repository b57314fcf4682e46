"""Public pretraining and DP fine-tuning levers: what trains, what ε is spent."""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from PIL import Image
from typer.testing import CliRunner

from fedgen.audits.pooling import _pretraining
from fedgen.audits.report import render_html
from fedgen.cli import app
from fedgen.clients.local import train_site
from fedgen.config import load_config
from fedgen.data.demo import make_demo_consortium, make_public_phantoms
from fedgen.data.site import load_site
from fedgen.errors import FedgenError
from fedgen.modalities import ImageModality
from fedgen.pretrain import PROVENANCE_NAME, class_balanced_draws, create_run, pretrain_image_model, read_public_images
from fedgen.training import train_local
from tests.test_gate import example_report

TINY = {
    "image.resolution": 16,
    "image.block_out_channels": [16, 32],
    "image.norm_num_groups": 4,
    "image.batch_size": 8,
    "image.local_epochs": 1,
    "federation.rounds": 2,
    "privacy.epsilon": 4.0,
}
CLASSES = ["No_DR", "Mild", "Moderate", "Severe", "Proliferate_DR"]


@pytest.fixture(scope="module")
def public_dir(tmp_path_factory):
    return make_public_phantoms(tmp_path_factory.mktemp("public") / "public", images=24, resolution=16)


@pytest.fixture(scope="module")
def pretrained(public_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrained") / "model"
    pretrain_image_model(public_dir, out, load_config(None, TINY), epochs=1, batch_size=8, lr=1e-3)
    return out


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sites")
    return make_demo_consortium(root / "sites", sites=1, seed=3, images_per_site=30, texts_per_site=20, resolution=16)[
        0
    ]


def _write_png(path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), value, dtype=np.uint8)).save(path)


def test_a_flat_folder_is_unlabelled_and_class_folders_are_labels(tmp_path):
    _write_png(tmp_path / "flat" / "a.png")
    assert read_public_images(tmp_path / "flat", CLASSES).labels is None
    _write_png(tmp_path / "folder" / "Severe" / "a.png")
    _write_png(tmp_path / "folder" / "No_DR" / "b.png")
    _write_png(tmp_path / "folder" / "No_DR" / ".hidden.png")
    public = read_public_images(tmp_path / "folder", CLASSES)
    assert [p.name for p in public.paths] == ["b.png", "a.png"]
    assert public.labels == [0, 3]
    assert public.describe()["class_counts"] == {"No_DR": 1, "Severe": 1}
    _write_png(tmp_path / "other" / "cats" / "a.png")  # folders that are not consortium classes
    assert read_public_images(tmp_path / "other", CLASSES).labels is None


def test_pretraining_writes_a_model_and_what_it_was_trained_on(public_dir, pretrained):
    record = json.loads((pretrained / PROVENANCE_NAME).read_text())
    assert record["images"] == 24 and record["labelled"] is False
    assert record["steps"] == 3  # 24 images / batch 8, one epoch
    assert record["content_sha256"] == read_public_images(public_dir, CLASSES).describe()["content_sha256"]
    assert math.isfinite(record["final_mean_loss"])
    embedding = UNet2DModel.from_pretrained(pretrained).class_embedding.weight
    assert torch.equal(embedding[:-1], embedding[-1:].expand_as(embedding[:-1]))  # unlabelled: classes start as null


def test_pretraining_with_ema_writes_the_warmed_up_average_of_each_steps_weights(public_dir, tmp_path, monkeypatch):
    import fedgen.pretrain

    steps = []

    def recording(model, *args, progress, **kwargs):
        def record(step, loss):
            steps.append({k: v.clone() for k, v in model.state_dict().items()})
            progress(step, loss)

        return train_local(model, *args, progress=record, **kwargs)

    monkeypatch.setattr(fedgen.pretrain, "train_local", recording)
    out = tmp_path / "ema"
    record = pretrain_image_model(
        public_dir, out, load_config(None, TINY), epochs=1, batch_size=8, lr=1e-2, ema_decay=0.5
    )
    assert record["ema_decay"] == 0.5 and len(steps) == 3
    expected = steps[0]["conv_in.weight"]
    for step, weights in enumerate(steps[1:], start=2):  # decay min(0.5, (1 + step) / (10 + step))
        decay = min(0.5, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * weights["conv_in.weight"]
    saved = UNet2DModel.from_pretrained(out).conv_in.weight
    assert torch.allclose(saved, expected, atol=1e-6)
    assert not torch.allclose(saved, steps[-1]["conv_in.weight"], atol=1e-4)
    with pytest.raises(FedgenError, match=r"ema decay must be in \[0, 1\)"):
        pretrain_image_model(
            public_dir, tmp_path / "bad", load_config(None, TINY), epochs=1, batch_size=8, lr=1e-2, ema_decay=1.0
        )


def test_bad_public_input_is_one_line_and_writes_nothing(tmp_path):
    config = load_config(None, TINY)
    (tmp_path / "empty").mkdir()
    for folder, message in [(tmp_path / "missing", "not found"), (tmp_path / "empty", "holds no images")]:
        with pytest.raises(FedgenError, match=message):
            pretrain_image_model(folder, tmp_path / "out", config, epochs=1, batch_size=4, lr=1e-3)
    _write_png(tmp_path / "bad" / "a.png")
    (tmp_path / "bad" / "b.png").write_bytes(b"not a png")
    with pytest.raises(FedgenError, match="cannot be read"):
        pretrain_image_model(tmp_path / "bad", tmp_path / "out", config, epochs=1, batch_size=4, lr=1e-3)
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(
        app, ["pretrain", "--public", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 1 and "public data folder not found" in result.output
    assert "Traceback" not in result.output


def test_the_federation_starts_from_the_pretrained_weights(pretrained, tmp_path):
    config = load_config(None, {**TINY, "image.init_checkpoint": str(pretrained)})
    task = ImageModality(config, work_dir=tmp_path)
    start = task.get_state(task.initial_model())
    saved = task.get_state(task.load(pretrained))
    assert all(torch.equal(start[k], saved[k]) for k in saved)
    assert not torch.equal(start["conv_in.weight"], task.get_state(task.build_model())["conv_in.weight"])


def test_a_pretrained_model_of_another_architecture_is_refused(pretrained, tmp_path):
    config = load_config(None, {**TINY, "image.block_out_channels": [16, 64], "image.init_checkpoint": str(pretrained)})
    with pytest.raises(
        FedgenError, match=r"trained with image.block_out_channels = \[16, 32\] but the run sets \[16, 64\]"
    ):
        create_run(tmp_path / "runs", config, "r")
    assert not (tmp_path / "runs").exists()


def test_a_pretrained_model_of_another_prediction_type_is_refused(pretrained, tmp_path):
    config = load_config(None, {**TINY, "image.prediction_type": "epsilon", "image.init_checkpoint": str(pretrained)})
    with pytest.raises(
        FedgenError, match="trained with image.prediction_type = 'v_prediction' but the run sets 'epsilon'"
    ):
        create_run(tmp_path / "runs", config, "r")
    assert not (tmp_path / "runs").exists()


def test_labelled_public_phantoms_are_an_image_folder_of_the_grades(tmp_path):
    public = read_public_images(
        make_public_phantoms(tmp_path / "public", images=40, resolution=16, labelled=True), CLASSES
    )
    assert len(public.paths) == 40 and public.labels is not None
    assert [CLASSES[i] for i in public.labels] == [p.parent.name for p in public.paths]
    assert public.describe()["class_counts"]["No_DR"] > public.describe()["class_counts"]["Severe"]  # a screening mix


def test_class_balanced_draws_make_a_rare_class_as_frequent_as_a_common_one():
    labels = torch.tensor([0] * 90 + [1] * 10 + [3] * 20)  # class 2 absent
    draws = class_balanced_draws(labels, 30_000, seed=0)
    shares = torch.bincount(labels[draws], minlength=4).double() / len(draws)
    assert torch.allclose(shares, torch.tensor([1 / 3, 1 / 3, 0.0, 1 / 3], dtype=torch.double), atol=0.01)
    assert torch.equal(draws, class_balanced_draws(labels, 30_000, seed=0))


def test_balanced_pretraining_takes_as_many_steps_and_needs_labels(public_dir, tmp_path):
    labelled = make_public_phantoms(tmp_path / "labelled", images=24, resolution=16, labelled=True)
    config = load_config(None, TINY)
    record = pretrain_image_model(
        labelled, tmp_path / "balanced", config, epochs=2, batch_size=8, lr=1e-3, balance_classes=True
    )
    assert record["balance_classes"] is True and record["steps"] == 2 * 3
    with pytest.raises(FedgenError, match="unlabelled: balancing classes needs class folders"):
        pretrain_image_model(
            public_dir, tmp_path / "out", config, epochs=1, batch_size=8, lr=1e-3, balance_classes=True
        )
    assert not (tmp_path / "out").exists()


def test_a_run_records_its_pretraining_with_an_absolute_checkpoint(pretrained, tmp_path, monkeypatch):
    monkeypatch.chdir(pretrained.parent)
    run = create_run(tmp_path / "runs", load_config(None, {**TINY, "image.init_checkpoint": pretrained.name}), "r")
    record = json.loads((run.root / PROVENANCE_NAME).read_text())["image"]
    assert record["checkpoint"] == str(pretrained.resolve()) == run.config().image.init_checkpoint
    assert record["images"] == 24 and len(record["weights_sha256"]) == 64

    report = example_report()
    report["run"]["pretraining"] = _pretraining(run)
    html = render_html(report, run_root=run.root)
    assert "Public pretraining" in html and record["content_sha256"] in html and record["weights_sha256"] in html
    assert "no public pretraining" in render_html(example_report(), run_root=run.root)


def test_an_unknown_trainable_pattern_names_what_exists(tmp_path):
    task = ImageModality(load_config(None, {**TINY, "image.trainable": ["class_embeding"]}), work_dir=tmp_path)
    with pytest.raises(FedgenError, match=r"\['class_embeding'\] match no UNet parameter; .*class_embedding"):
        task.build_model()


def _independent_epsilon(sigma, q, steps, delta):
    orders = RDPAccountant.DEFAULT_ALPHAS
    return get_privacy_spent(
        orders=orders, rdp=compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders), delta=delta
    )[0]


def test_with_every_lever_on_only_declared_parameters_train_and_epsilon_is_exact(pretrained, site_dir, tmp_path):
    """Pretrained start, partial fine-tuning, noise multiplicity 2 and physical batches of 3
    under logical batches of 8: the accounting must be that of (σ, q = 8/n, logical steps)."""
    config = load_config(
        None,
        {
            **TINY,
            "image.init_checkpoint": str(pretrained),
            "image.trainable": ["class_embedding", "time_emb_proj"],
            "image.noise_multiplicity": 2,
            "image.max_physical_batch_size": 3,
        },
    )
    site = load_site(site_dir, config.data, modalities=("image",), channels=1)
    task = ImageModality(config, work_dir=tmp_path)
    start = task.get_state(task.initial_model())
    update = train_site(task, site, start, histories={}, seed=0)

    n = len(task.datasets(site)[0])
    batches = math.ceil(n / 8)
    m = update.metrics
    assert m["sample-rate"] == pytest.approx(1 / batches) and m["steps"] == batches  # logical steps
    expected = _independent_epsilon(m["noise-multiplier"], 1 / batches, batches, m["delta"])
    assert m["epsilon"] == pytest.approx(expected, rel=0.01)
    # the run's budget of 4 over 2 rounds: one round spends less than all of it
    assert m["epsilon"] < 4.0 and m["epsilon-next"] == pytest.approx(4.0, rel=0.05)

    declared = {k for k in start if "class_embedding" in k or "time_emb_proj" in k}
    changed = {k for k in start if not torch.equal(update.state[k], start[k])}
    assert changed == declared
