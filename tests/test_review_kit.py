"""The blinded review kit: built inside the site, equal real and synthetic per class, and no
file name, metadata, size or order that tells a real item from a synthetic one."""

import base64
import io
import json
import re
import shutil
import struct
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from fedgen.artifacts import RunDir
from fedgen.audits.review import KIT_KEY, KIT_PAGE, read_key
from fedgen.audits.review_kit import KIT_README, blind_png, blind_text, build_kit
from fedgen.config import DataConfig, ImageConfig, RunConfig
from fedgen.data.site import load_images, split_indices
from fedgen.errors import FedgenError

IMAGE_CLASSES = ["No_DR", "Mild", "Severe"]
TEXT_CLASSES = ["Normal", "Anxiety"]
RESOLUTION = 16
REAL_PER_CLASS = {"No_DR": 8, "Mild": 6, "Severe": 0}  # Severe: synthetic only, so not in the kit
SYNTHETIC_PER_CLASS = 5
NOTES_PER_CLASS = 6
PATIENT = "Jane Roe"  # in real file names and metadata: must never reach the page


def make_run(root: Path, *, modality: str = "both") -> RunDir:
    """A run folder with a config and synthetic data, and no training (none is needed)."""
    config = RunConfig(
        modality=modality,
        data=DataConfig(image_classes=IMAGE_CLASSES, text_classes=TEXT_CLASSES),
        image=ImageConfig(resolution=RESOLUTION, channels=1),
    )
    run = RunDir.create(root, config, "r1")
    rng = np.random.default_rng(1)
    for name in IMAGE_CLASSES:
        folder = run.synthetic / "images" / name
        folder.mkdir(parents=True)
        for i in range(SYNTHETIC_PER_CLASS):
            Image.fromarray(rng.integers(0, 256, (RESOLUTION, RESOLUTION), dtype=np.uint8)).save(
                folder / f"{i:05d}.png"
            )
    notes = [
        {"text": f"synthetic {name.lower()} note {i}: sleeps badly.", "label": name}
        for name in TEXT_CLASSES
        for i in range(NOTES_PER_CLASS)
    ]
    (run.synthetic / "texts.jsonl").write_text("".join(json.dumps(n) + "\n" for n in notes), encoding="utf-8")
    return run


def make_site(root: Path) -> Path:
    """A site whose real images differ from the synthetic ones in every way a file can: size,
    colour mode, format, EXIF, PNG text chunks, file names; notes with CRLF and trailing spaces."""
    site = root / "site-a"
    rng = np.random.default_rng(2)
    for name, n in REAL_PER_CLASS.items():
        folder = site / "images" / name
        folder.mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (40 + i, 52), dtype=np.uint8)  # gray, as the run trains
            image = Image.fromarray(pixels)
            stem = f"{PATIENT.replace(' ', '_')}_{name}_{i}"
            if i % 2:
                exif = Image.Exif()
                exif[0x010E] = f"patient {PATIENT}"  # ImageDescription
                image.save(folder / f"{stem}.jpg", exif=exif.tobytes(), quality=95)
            else:
                info = PngImagePlugin.PngInfo()
                info.add_text("Patient", PATIENT)
                image.save(folder / f"{stem}.png", pnginfo=info, dpi=(300, 300))
    notes = [
        {"text": f"  Real {name} note {i}\r\nseen today.   \r\nCafe\u0301 visit.  ", "label": name}
        for name in TEXT_CLASSES
        for i in range(NOTES_PER_CLASS)
    ]
    (site / "texts.jsonl").write_text("".join(json.dumps(n) + "\n" for n in notes), encoding="utf-8")
    (site / "site.toml").write_text('name = "site-a"\nheldout_fraction = 0.5\n', encoding="utf-8")
    return site


@pytest.fixture
def made(tmp_path):
    run = make_run(tmp_path / "runs")
    site = make_site(tmp_path)
    kit = build_kit(run.root, site, site / "review-kit", per_class=3, seed=0)
    return run, site, kit


def page_data(page: Path) -> dict:
    html = page.read_text(encoding="utf-8")
    match = re.search(r'<script type="application/json" id="kit-data">(.*?)</script>', html, re.S)
    return json.loads(match.group(1))


def png_chunks(png: bytes) -> list[tuple[str, bytes]]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(png):
        (length,) = struct.unpack(">I", png[at : at + 4])
        chunks.append((png[at + 4 : at + 8].decode("ascii"), png[at + 8 : at + 8 + length]))
        at += 12 + length
    return chunks


def test_the_kit_pairs_each_class_with_as_many_synthetic_as_held_out_real_items(made):
    run, site, kit = made
    key = json.loads(kit.key.read_text(encoding="utf-8"))
    # held-out real images: No_DR 4 of 8, Mild 3 of 6 (heldout_fraction 0.5); capped at 3 per class;
    # Severe has no real image, so it is left out rather than shown unpaired
    assert kit.items_per_class == {"image": {"No_DR": 3, "Mild": 3}, "text": {"Normal": 3, "Anxiety": 3}}
    for section in key["modalities"].values():
        truths = list(section["items"].values())
        for name, n in section["items_per_class"].items():
            assert sum(t["source"] == "real" and t["class"] == name for t in truths) == n
            assert sum(t["source"] == "synthetic" and t["class"] == name for t in truths) == n
    # every real item is a held-out record (the split the federation did not train on)
    paths = sorted((site / "images").rglob("*.*"), key=lambda p: (IMAGE_CLASSES.index(p.parent.name), p.name))
    _, heldout = split_indices([IMAGE_CLASSES.index(p.parent.name) for p in paths], heldout_fraction=0.5, seed=0)
    heldout_records = {paths[i].relative_to(site).as_posix() for i in heldout}
    real_records = {t["record"] for t in key["modalities"]["image"]["items"].values() if t["source"] == "real"}
    assert real_records and real_records <= heldout_records
    assert read_key(kit.root).site == "site-a" and read_key(kit.root).run == "r1"


def test_every_file_of_the_kit_is_inside_the_site_folder(tmp_path):
    run = make_run(tmp_path / "runs")
    site = make_site(tmp_path)
    before = {p for p in tmp_path.rglob("*")}
    kit = build_kit(run.root, site, site / "kits" / "first", per_class=3, seed=0)
    written = {p for p in tmp_path.rglob("*")} - before
    assert written and all(p.resolve().is_relative_to(site.resolve()) for p in written)
    assert {p.name for p in kit.root.iterdir()} == {KIT_PAGE, KIT_KEY, KIT_README}
    # the page really holds the site's real images, in the training view (so the check is about real records)
    key = json.loads(kit.key.read_text(encoding="utf-8"))
    real = next(i for i, t in key["modalities"]["image"]["items"].items() if t["source"] == "real")
    view = load_images([site / key["modalities"]["image"]["items"][real]["record"]], resolution=RESOLUTION, channels=1)
    shown = {item["id"]: item["png"] for item in page_data(kit.page)["sections"]["image"]["items"]}
    assert base64.b64decode(shown[real]) == blind_png(((view[0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
    # refused, writing nothing: outside the site, in the run folder, inside images/, an existing kit
    for out in (tmp_path / "elsewhere", run.root / "kit", site / "images" / "kit", site, kit.root, site / ".." / "x"):
        with pytest.raises(FedgenError, match="outside the site folder|site.s own folder|images/|already exists"):
            build_kit(run.root, site, out, per_class=3, seed=0)
    assert {p for p in tmp_path.rglob("*")} - before == written


def test_a_kit_may_go_to_the_review_dir_the_site_names_and_nowhere_else(tmp_path):
    run = make_run(tmp_path / "runs")
    site = make_site(tmp_path)
    share = tmp_path / "clinicians-share"
    with (site / "site.toml").open("a", encoding="utf-8") as toml:
        toml.write(f'review_dir = "{share}"\n')
    before = {p for p in tmp_path.rglob("*")}
    kit = build_kit(run.root, site, share / "kit-1", per_class=2, seed=0)
    written = {p for p in tmp_path.rglob("*")} - before
    assert kit.root == (share / "kit-1").resolve()
    assert written and all(p.resolve().is_relative_to(share.resolve()) for p in written)
    with pytest.raises(FedgenError, match="or the review_dir of its site.toml"):
        build_kit(run.root, site, tmp_path / "elsewhere", per_class=2, seed=0)
    (site / "site.toml").write_text('name = "site-a"\nreview_dir = 3\n', encoding="utf-8")
    with pytest.raises(FedgenError, match="review_dir = 3 must be a folder path"):
        build_kit(run.root, site, share / "kit-2", per_class=2, seed=0)


def test_no_file_name_metadata_size_or_encoding_tells_real_from_synthetic(made):
    run, site, kit = made
    html = kit.page.read_text(encoding="utf-8")
    data = page_data(kit.page)
    key = json.loads(kit.key.read_text(encoding="utf-8"))
    truth = {i: t for section in key["modalities"].values() for i, t in section["items"].items()}
    images = data["sections"]["image"]["items"]
    pngs = {item["id"]: base64.b64decode(item["png"]) for item in images}
    # one layout for every item: an id and the content, nothing else
    assert {tuple(sorted(item)) for item in images} == {("id", "png")}
    assert {tuple(sorted(item)) for item in data["sections"]["text"]["items"]} == {("id", "text")}
    # same length, same chunks, same header: the bytes differ only in the pixels
    assert len({len(png) for png in pngs.values()}) == 1
    chunk_names = {tuple(name for name, _ in png_chunks(png)) for png in pngs.values()}
    assert chunk_names == {("IHDR", "IDAT", "IEND")}
    assert len({png_chunks(png)[0][1] for png in pngs.values()}) == 1
    for png in pngs.values():
        image = Image.open(io.BytesIO(png))
        assert image.size == (RESOLUTION, RESOLUTION) and image.mode == "L"
        assert not image.info and not image.getexif()
    # no file name, path, record, site, run or patient name reaches the page (outside the content)
    outside_content = re.sub(r'"(png|text)":"(?:[^"\\]|\\.)*"', "", html)
    assert len(outside_content) < len(html) - sum(len(item["png"]) for item in images)
    for text in (
        PATIENT,
        PATIENT.replace(" ", "_"),
        "00000",
        ".jpg",
        "texts.jsonl",
        "images/",
        "site-a",
        "r1",
        str(site),
    ):
        assert text not in outside_content
    # nor the key: no item's source or class sits beside its id
    assert set(data) == {"kit", "format", "sources", "confidence", "sections"}
    assert all(set(section) == {"classes", "items"} for section in data["sections"].values())
    assert not any(t["record"] in html for t in truth.values())
    # the ids carry no source: sources interleave in id order
    image_ids = sorted(pngs)
    sources = [truth[i]["source"] for i in image_ids]
    assert sources != sorted(sources) and sources != sorted(sources, reverse=True)
    # notes: one normal form, one line end, no trailing blanks, whatever the source file held
    for item in data["sections"]["text"]["items"]:
        text = item["text"]
        assert text == blind_text(text) and unicodedata.is_normalized("NFC", text)
        assert "\r" not in text and not re.search(r"[ \t]$", text, re.M) and text == text.strip()


def test_blind_text_normalises_line_ends_spaces_and_unicode():
    assert blind_text("  a \r\nb\t\rc\u0301  \n\n") == "a\nb\n\u0107"  # c + combining acute -> one character


def test_a_site_without_held_out_records_of_the_run_classes_gets_a_clear_error(tmp_path):
    run = make_run(tmp_path / "runs", modality="image")
    site = tmp_path / "site-b"
    (site / "images" / "Severe").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((20, 20), i * 40, dtype=np.uint8)).save(site / "images" / "Severe" / f"{i}.png")
    run_synthetic = run.synthetic / "images" / "Severe"
    for path in run_synthetic.iterdir():
        path.unlink()
    run_synthetic.rmdir()
    with pytest.raises(FedgenError, match="nothing to review"):
        build_kit(run.root, site, site / "kit", seed=0)
    assert not (site / "kit").exists()
    with pytest.raises(FedgenError, match="no text model"):
        build_kit(run.root, site, site / "kit", modalities=["text"], seed=0)


def test_the_review_commands_make_a_kit_and_score_it(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fedgen.audits.review import ANSWERS_FORMAT, SCORES_FORMAT
    from fedgen.cli import app
    from fedgen.cli.common import console

    monkeypatch.setattr(console, "width", 200)  # the table whole, whatever width the console was made with

    runner = CliRunner()
    run = make_run(tmp_path / "runs")
    site = make_site(tmp_path)
    made = runner.invoke(
        app, ["review", "kit", str(run.root), "--data", str(site), "--out", str(site / "kit"), "--per-class", "2"]
    )
    assert made.exit_code == 0, made.output
    assert "image: 8 items" in made.output and "text: 8 items" in made.output and KIT_PAGE in made.output
    refused = runner.invoke(app, ["review", "kit", str(run.root), "--data", str(site), "--out", str(tmp_path / "out")])
    assert refused.exit_code == 1 and "outside the site folder" in refused.output and not (tmp_path / "out").exists()

    key = json.loads((site / "kit" / KIT_KEY).read_text(encoding="utf-8"))
    truth = {i: t for section in key["modalities"].values() for i, t in section["items"].items()}
    answers = {i: {"source": "real", "confidence": 2, "reading": t["class"]} for i, t in truth.items()}  # always "real"
    path = tmp_path / "answers.json"
    path.write_text(json.dumps({"format": ANSWERS_FORMAT, "kit": key["kit"], "reviewer": "Dr R", "answers": answers}))
    scored = runner.invoke(app, ["review", "score", str(site / "kit"), str(path)])
    assert scored.exit_code == 0, scored.output
    scores = json.loads((site / "kit" / "SCORES.json").read_text(encoding="utf-8"))
    assert scores["format"] == SCORES_FORMAT and scores["site"] == "site-a"
    assert scores["modalities"]["image"]["pooled"]["detection"]["value"] == 0.5
    # 4 of 8 right per modality: Clopper-Pearson (0.157, 0.843), p = 1
    assert "0.50 (0.16-0.84)" in scored.output and f"reviewer 1: {path}" in scored.output


def test_a_release_of_the_run_serves_as_well_as_the_run_folder(tmp_path):
    """A site reviews the released synthetic data: synthetic/ and audit/report.json, no config.toml."""
    run = make_run(tmp_path / "runs")
    site = make_site(tmp_path)
    release = tmp_path / "release"
    shutil.copytree(run.synthetic, release / "synthetic")
    (release / "audit").mkdir()
    report = {"run": {"id": "r1", "config": json.loads(json.dumps(run.config().model_dump()))}}
    (release / "audit" / "report.json").write_text(json.dumps(report), encoding="utf-8")
    kit = build_kit(release, site, site / "kit", per_class=2, seed=0)
    assert read_key(kit.root).run == "r1" and kit.items_per_class["image"] == {"No_DR": 2, "Mild": 2}
    with pytest.raises(FedgenError, match="neither a fedgen run folder"):
        build_kit(tmp_path / "nothing", site, site / "kit-2", seed=0)
