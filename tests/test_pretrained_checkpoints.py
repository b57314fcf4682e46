"""A pretrained image checkpoint loads only as recorded: weights SHA-256, architecture, classes.

Covers `fedgen pretrain` outputs (their pretraining.json is the record) and the checkpoint
fedgen ships (its record is in fedgen.models.pretrained.SHIPPED).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import fedgen.models.pretrained as pretrained_module
from fedgen.cli import app
from fedgen.config import DR_GRADES, load_config, save_config
from fedgen.data.demo import make_demo_consortium, make_public_phantoms
from fedgen.errors import FedgenError
from fedgen.manifest import file_sha256
from fedgen.modalities import ImageModality
from fedgen.models.diffusion import WEIGHTS_NAME, load_image_model
from fedgen.models.pretrained import SHIPPED, SHIPPED_PREFIX, checkpoint_folder, load_pretrained
from fedgen.pretrain import PROVENANCE_NAME, create_run, pretrain_image_model

TINY = {"image.resolution": 16, "image.block_out_channels": [16, 32], "image.norm_num_groups": 4}
SHIPPED_NAME = "tiny-phantoms"


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    public = make_public_phantoms(root / "public", images=24, resolution=16, labelled=True)
    out = root / "model"
    pretrain_image_model(public, out, load_config(None, TINY), epochs=1, batch_size=8, lr=1e-3)
    return out


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


def _change_weights(folder):
    """A valid safetensors file with one weight changed: loads fine, hashes differently."""
    state = load_file(folder / WEIGHTS_NAME)
    state["conv_in.bias"] = state["conv_in.bias"] + 0.01
    save_file(state, folder / WEIGHTS_NAME, metadata={"format": "pt"})


def _change_config(folder, key, value):
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def test_pretraining_records_the_weights_digest_and_the_class_order(labelled):
    record = json.loads((labelled / PROVENANCE_NAME).read_text())
    assert record["weights_sha256"] == file_sha256(labelled / WEIGHTS_NAME)
    assert record["classes"] == DR_GRADES and record["labelled"] is True


def test_changed_weights_are_refused_in_one_line(labelled, tmp_path):
    copy = _copy(labelled, tmp_path)
    _change_weights(copy)
    config = load_config(None, {**TINY, "image.init_checkpoint": str(copy)})
    with pytest.raises(
        FedgenError,
        match=r"has SHA-256 [0-9a-f]{12}\.\.\., its record [0-9a-f]{12}\.\.\.: the weights were changed or damaged",
    ):
        create_run(tmp_path / "runs", config, "r")
    assert not (tmp_path / "runs").exists()


def test_the_cli_refuses_a_changed_checkpoint_with_one_line_and_writes_no_run(labelled, tmp_path):
    copy = _copy(labelled, tmp_path)
    _change_weights(copy)
    site = make_demo_consortium(
        tmp_path / "sites", sites=1, seed=1, images_per_site=20, texts_per_site=10, resolution=16
    )[0]
    save_config(load_config(None, {**TINY, "image.init_checkpoint": str(copy)}), tmp_path / "fed.toml")
    result = CliRunner().invoke(
        app,
        ["simulate", "--site", str(site), "--config", str(tmp_path / "fed.toml"), "--runs-dir", str(tmp_path / "runs")],
    )
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "the weights were changed or damaged" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_a_config_json_that_no_longer_builds_the_recorded_architecture_is_refused(labelled, tmp_path):
    copy = _copy(labelled, tmp_path)
    _change_config(copy, "act_fn", "mish")  # same tensors, another network
    with pytest.raises(
        FedgenError, match="config.json has act_fn='mish' but the recorded architecture builds act_fn='silu'"
    ):
        load_pretrained(str(copy), load_config(None, TINY).image, DR_GRADES)


def test_classes_named_in_another_order_get_their_own_embedding_rows(labelled, tmp_path):
    classes = sorted(DR_GRADES)  # a consortium's classes as its folders sort them
    config = load_config(None, {**TINY, "data.image_classes": classes, "image.init_checkpoint": str(labelled)})
    start = ImageModality(config, work_dir=tmp_path).initial_model().class_embedding.weight
    saved = load_image_model(labelled).class_embedding.weight
    for i, name in enumerate(classes):
        assert torch.equal(start[i], saved[DR_GRADES.index(name)])
    assert torch.equal(start[-1], saved[-1])  # the null class stays last
    other = load_config(None, {**TINY, "data.image_classes": ["cat", "dog"], "image.init_checkpoint": str(labelled)})
    with pytest.raises(
        FedgenError, match="learned the classes No_DR, Mild, .* but the run's image classes are cat, dog"
    ):
        create_run(tmp_path / "runs", other, "r")


@pytest.fixture
def shipped(labelled, tmp_path, monkeypatch):
    """The tiny labelled checkpoint installed as a shipped one, with its record in the code."""
    root = tmp_path / "installed"
    shutil.copytree(labelled, root / SHIPPED_NAME)
    record = json.loads((labelled / PROVENANCE_NAME).read_text())
    code_record = {key: record[key] for key in ("weights_sha256", "image_config", "classes", "labelled")}
    monkeypatch.setattr(pretrained_module, "SHIPPED_ROOT", root)
    monkeypatch.setitem(SHIPPED, SHIPPED_NAME, code_record)
    return root / SHIPPED_NAME


def test_a_run_starts_from_a_shipped_checkpoint_by_name(shipped, tmp_path):
    name = SHIPPED_PREFIX + SHIPPED_NAME
    run = create_run(tmp_path / "runs", load_config(None, {**TINY, "image.init_checkpoint": name}), "r")
    assert run.config().image.init_checkpoint == name  # resolves wherever fedgen is installed
    record = json.loads((run.root / PROVENANCE_NAME).read_text())["image"]
    assert record["checkpoint"] == name and record["weights_sha256"] == SHIPPED[SHIPPED_NAME]["weights_sha256"]
    start = ImageModality(run.config(), work_dir=tmp_path).initial_model().state_dict()
    saved = load_file(shipped / WEIGHTS_NAME)
    assert all(torch.equal(start[k], saved[k]) for k in saved)


def test_a_changed_shipped_checkpoint_is_refused_in_one_line(shipped, tmp_path):
    config = load_config(None, {**TINY, "image.init_checkpoint": SHIPPED_PREFIX + SHIPPED_NAME})
    _change_config(shipped, "norm_eps", 1e-3)
    with pytest.raises(
        FedgenError, match="config.json has norm_eps=0.001 but the recorded architecture builds norm_eps=1e-05"
    ):
        create_run(tmp_path / "runs", config, "r")
    _change_weights(shipped)
    # the record in the code decides: rewriting pretraining.json beside the weights does not help
    record = json.loads((shipped / PROVENANCE_NAME).read_text())
    record["weights_sha256"] = file_sha256(shipped / WEIGHTS_NAME)
    (shipped / PROVENANCE_NAME).write_text(json.dumps(record))
    with pytest.raises(
        FedgenError,
        match=f"fedgen:{SHIPPED_NAME}: diffusion_pytorch_model.safetensors has SHA-256 .* the weights were changed or damaged",
    ):
        create_run(tmp_path / "runs", config, "r")
    assert not (tmp_path / "runs").exists()


def test_a_shipped_checkpoint_needs_its_recorded_architecture_and_an_existing_name(shipped, tmp_path):
    wider = load_config(
        None, {**TINY, "image.init_checkpoint": SHIPPED_PREFIX + SHIPPED_NAME, "image.block_out_channels": [16, 64]}
    )
    with pytest.raises(
        FedgenError, match=r"trained with image.block_out_channels = \[16, 32\] but the run sets \[16, 64\]"
    ):
        create_run(tmp_path / "runs", wider, "r")
    unknown = load_config(None, {**TINY, "image.init_checkpoint": "fedgen:retina-64"})
    with pytest.raises(FedgenError, match=f"fedgen ships no such checkpoint \\(it ships .*fedgen:{SHIPPED_NAME}"):
        create_run(tmp_path / "runs", unknown, "r")


# --- the checkpoint fedgen ships ------------------------------------------------------------------

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "scripts" / "demo.toml"
PHANTOMS = "fundus-phantoms-32"


def test_the_demo_starts_from_the_shipped_phantom_checkpoint_as_recorded():
    config = load_config(DEMO_CONFIG)
    assert config.image.init_checkpoint == SHIPPED_PREFIX + PHANTOMS
    folder = checkpoint_folder(config.image.init_checkpoint)
    weights = folder / WEIGHTS_NAME
    assert weights.stat().st_size <= 10 * 2**20  # what may ship in the package
    assert file_sha256(weights) == SHIPPED[PHANTOMS]["weights_sha256"]
    assert (
        SHIPPED[PHANTOMS]["classes"] == DR_GRADES and SHIPPED[PHANTOMS]["recipe"] == "bash scripts/pretrain-phantoms.sh"
    )
    unet = load_pretrained(
        config.image.init_checkpoint, config.image, sorted(DR_GRADES)
    )  # a consortium's sorted classes
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in load_image_model(folder).parameters())


def test_the_shipped_phantom_checkpoint_refuses_changed_weights_and_another_architecture(tmp_path, monkeypatch):
    config = load_config(DEMO_CONFIG)
    copy = shutil.copytree(checkpoint_folder(config.image.init_checkpoint), tmp_path / PHANTOMS)
    monkeypatch.setattr(pretrained_module, "SHIPPED_ROOT", tmp_path)
    wider = load_config(DEMO_CONFIG, {"image.block_out_channels": [32, 64, 128]})
    with pytest.raises(
        FedgenError, match=r"trained with image.block_out_channels = \[32, 64, 64\] but the run sets \[32, 64, 128\]"
    ):
        load_pretrained(config.image.init_checkpoint, wider.image, DR_GRADES)
    _change_weights(copy)
    with pytest.raises(
        FedgenError, match=f"fedgen:{PHANTOMS}: {WEIGHTS_NAME} has SHA-256 .* the weights were changed or damaged"
    ):
        load_pretrained(config.image.init_checkpoint, config.image, DR_GRADES)
