"""A new user's data: classes come from the site folders when the configuration gives none."""

import json
import socket
import tomllib

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fedgen.artifacts import RunDir
from fedgen.cli import app
from fedgen.config import DR_GRADES, load_config
from fedgen.data.check import classes_from_sites, site_class_names
from fedgen.errors import FedgenError

ANIMALS = ["zebra", "ant", "bee"]  # not the demo's classes, and not in sorted order


def make_site(root, classes, *, per_class=12, size=32, seed=0, labels=()):
    """A site folder of gray images, one mean brightness per class, and notes with ``labels``.

    Each image's brightness is drawn around its class's, so neighbouring classes overlap and a
    classifier's validation loss levels off, as on real images, instead of creeping to zero."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        folder = root / "images" / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            brightness = rng.normal(60 + 60 * k, 30)
            pixels = np.clip(rng.normal(brightness, 20, (size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    if labels:
        lines = [json.dumps({"text": f"note {i} about {label}", "label": label}) for i, label in enumerate(labels)]
        (root / "texts.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_the_consortium_classes_are_the_sorted_union_of_its_sites(tmp_path):
    one = make_site(tmp_path / "one", ["zebra", "ant"], per_class=1, labels=["worried", "calm"])
    two = make_site(tmp_path / "two", ["bee", "ant"], per_class=1, labels=["calm", "low"])
    (two / "images" / "empty").mkdir()  # a folder without images is no class
    assert site_class_names(two) == {"image": {"ant", "bee"}, "text": {"calm", "low"}}
    config = classes_from_sites(load_config(None, {"modality": "both"}), [one, two])
    assert config.data.image_classes == ["ant", "bee", "zebra"]
    assert config.data.text_classes == ["calm", "low", "worried"]
    given = classes_from_sites(
        load_config(None, {"modality": "both", "data.image_classes": ["zebra", "ant", "bee"]}), [one, two]
    )
    assert given.data.image_classes == ["zebra", "ant", "bee"]  # a list the configuration gives is kept
    assert given.data.text_classes == ["calm", "low", "worried"]
    image_only = classes_from_sites(load_config(None), [one, two])
    assert image_only.data.text_classes == load_config(None).data.text_classes  # text is not trained
    with pytest.raises(FedgenError, match=r"no site has labels in texts.jsonl: no text classes to train"):
        classes_from_sites(load_config(None, {"modality": "text"}), [tmp_path / "nothing"])


def test_data_check_shows_the_classes_a_site_has_without_a_config(tmp_path):
    site = make_site(tmp_path / "site", ANIMALS, per_class=2, labels=["calm", "worried"])
    result = CliRunner().invoke(app, ["data", "check", str(site)])
    assert result.exit_code == 0, result.output
    assert "image classes (from this site's folders): ant, bee, zebra" in result.output
    assert "text classes (from this site's folders): calm, worried" in result.output
    assert "no problems" in result.output and "problem:" not in result.output
    config = tmp_path / "grades.toml"
    config.write_text(f"[data]\nimage_classes = {json.dumps(DR_GRADES)}\n")
    refused = CliRunner().invoke(app, ["data", "check", str(site), "--config", str(config)])
    assert refused.exit_code == 1
    assert "class folder 'ant' is not in the image class list" in refused.output


def test_the_coordinator_needs_the_class_lists_in_its_config(tmp_path):
    config = tmp_path / "fed.toml"
    config.write_text('modality = "image"\n')
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = CliRunner().invoke(
        app,
        [
            "server",
            "--insecure",
            "--config",
            str(config),
            "--runs-dir",
            str(tmp_path / "runs"),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ],
    )
    assert result.exit_code == 1
    assert "list data.image_classes in --config: the coordinator cannot see the sites' folders" in result.output
    assert not (tmp_path / "runs").exists()


def test_pretraining_takes_its_classes_from_the_public_class_folders(tmp_path):
    public = make_site(tmp_path / "public", ANIMALS, per_class=4, size=16) / "images"
    config = tmp_path / "tiny.toml"
    config.write_text("[image]\nresolution = 16\nblock_out_channels = [16, 32]\nnorm_num_groups = 4\n")
    args = ["pretrain", "--config", str(config), "--epochs", "1", "--batch-size", "6"]
    result = CliRunner().invoke(app, [*args, "--public", str(public), "--out", str(tmp_path / "model")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "model" / "pretraining.json").read_text())
    assert record["classes"] == ["ant", "bee", "zebra"] and record["labelled"] is True
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted(public.rglob("*.png"))[:6]:
        (flat / f"{path.parent.name}-{path.name}").write_bytes(path.read_bytes())
    unlabelled = CliRunner().invoke(app, [*args, "--public", str(flat), "--out", str(tmp_path / "flat-model")])
    assert unlabelled.exit_code == 1 and "list the consortium's data.image_classes in --config" in unlabelled.output
    assert not (tmp_path / "flat-model").exists()


@pytest.mark.e2e
def test_a_consortium_of_other_classes_trains_and_audits_without_a_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # 40 images a class: 24 held out per site, enough for a site to answer the audit's aggregates
    sites = [make_site(tmp_path / "sites" / f"clinic-{i}", ANIMALS, per_class=40, seed=i) for i in (1, 2)]
    runner = CliRunner()
    simulate = runner.invoke(
        app,
        [
            "simulate",
            "--site",
            str(sites[0]),
            "--site",
            str(sites[1]),
            "--modality",
            "image",
            "--rounds",
            "1",
            "--run-id",
            "animals",
        ],
    )
    assert simulate.exit_code == 0, simulate.output
    run = RunDir.open(tmp_path / "runs" / "animals")
    recorded = tomllib.loads((run.root / "config.toml").read_text())
    assert recorded["data"]["image_classes"] == ["ant", "bee", "zebra"]  # the sorted union, recorded
    generate = runner.invoke(app, ["generate", str(run.root), "--per-class", "7", "--steps", "5"])
    assert generate.exit_code == 0, generate.output
    assert sorted(p.name for p in (run.synthetic / "images").iterdir()) == ["ant", "bee", "zebra"]
    audit = runner.invoke(app, ["audit", str(run.root)])
    assert audit.exit_code == 0, audit.output
    report = json.loads((run.audit / "report.json").read_text())
    assert report["run"]["config"]["data"]["image_classes"] == ["ant", "bee", "zebra"]
    assert report["gate"]["checks"] and "image" in report["utility"]  # the sites answered, the gate judged


def test_data_check_warns_of_held_out_splits_too_small_for_the_policy(tmp_path):
    site = make_site(tmp_path / "site", ANIMALS, per_class=12)  # 3 x round(12 * 0.2) = 6 held out
    result = CliRunner().invoke(app, ["data", "check", str(site)])
    assert result.exit_code == 0, result.output  # a warning, not a problem
    assert (
        "warning: site: 6 held-out image records; the site answers the utility audit only over at least 20"
        in result.output
    )
    assert (
        "TPR at 1% FPR needs at least 100 over the consortium (the other sites must hold out 94 more together)"
        in result.output
    )
    assert "leaves out classes with fewer than 5 held-out records: ant (2), bee (2), zebra (2)" in result.output
    (site / "site.toml").write_text("heldout_fraction = 0.5\n")
    roomier = CliRunner().invoke(app, ["data", "check", str(site)])
    assert "18 held-out image records" in roomier.output and "ant (6)" not in roomier.output


def test_a_site_lists_exactly_the_records_a_run_held_out(tmp_path):
    from fedgen.data.site import image_splits, load_images, load_site, text_splits
    from fedgen.pretrain import create_run

    site = make_site(tmp_path / "site", ANIMALS, per_class=10, labels=["calm", "low"] * 15)
    config = classes_from_sites(load_config(None, {"modality": "both", "data.split_seed": 7}), [site])
    run = create_run(tmp_path / "runs", config, "r")
    result = CliRunner().invoke(app, ["data", "heldout", str(site), "--run", str(run.root)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    images = [site / line.split(maxsplit=1)[1] for line in lines if line.startswith("image ")]
    text_lines = [int(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("text ")]
    loaded = load_site(site, config.data)
    _, heldout = image_splits(loaded, resolution=32, channels=1, seed=7)
    assert torch.equal(load_images(images, resolution=32, channels=1), heldout.tensors[0])  # the audit's non-members
    notes = (site / "texts.jsonl").read_text().splitlines()
    assert [json.loads(notes[i - 1])["text"] for i in text_lines] == [
        text for text, _ in text_splits(loaded, seed=7)[1]
    ]
    assert "site holds out 6 of 30 image records and 6 of 30 text records (fraction 0.2, split seed 7)" in result.output
