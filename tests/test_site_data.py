"""Site folder validation, loading, splitting and image preprocessing (fedgen/data/site.py)."""

from __future__ import annotations

import io
import json
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from fedgen.cli.data import site_table
from fedgen.config import DataConfig
from fedgen.data.check import check_site
from fedgen.data.site import image_splits, load_images, load_site, split_indices, text_splits
from fedgen.errors import FedgenError

DATA = DataConfig()  # image classes: DR grades; text classes: mental-health classes
IMAGE_LIST = "[No_DR, Mild, Moderate, Severe, Proliferate_DR]"
TEXT_LIST = "[Normal, Anxiety, Depression, Stress, Suicidal]"
BASE_IMAGES = {"No_DR": 3, "Mild": 2}
BASE_TEXTS = [
    {"text": "sleeps well, no complaints", "label": "Normal"},
    {"text": "worried all day", "label": "Anxiety"},
    {"text": "racing heart before meetings", "label": "Anxiety"},
    {"text": "fine", "label": "Normal"},
]


# --- building sites -------------------------------------------------------------------------


def write_image(path: Path, *, size=(8, 8), mode="L", color=100, fmt="PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, fmt)
    return path


def write_texts(root: Path, records: list[dict]) -> Path:
    path = root / "texts.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def make_site(root: Path, *, images=BASE_IMAGES, texts=BASE_TEXTS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, n in images.items():
        for i in range(n):
            write_image(root / "images" / name / f"{i}.png")
    if texts:
        write_texts(root, texts)
    return root


def noise_image_bytes(fmt: str) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def append_line(root: Path, raw: bytes) -> Path:
    path = root / "texts.jsonl"
    with path.open("ab") as f:
        f.write(raw + b"\n")
    return path


# --- nothing is ever written ----------------------------------------------------------------


@pytest.fixture(autouse=True)
def private_tmp(tmp_path, monkeypatch):
    """Route tempfile into tmp_path, so the no-write check below also covers temp files."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def check_read_only(root: Path, tmp_path: Path, **options):
    before = snapshot(tmp_path)
    check = check_site(root, DATA, **options)
    assert snapshot(tmp_path) == before, "check_site wrote into the site folder or the temp dir"
    assert not any((tmp_path / "tmp").iterdir())
    return check


# --- a good site ----------------------------------------------------------------------------


def test_good_site_has_no_problems_and_summarises(tmp_path):
    root = make_site(tmp_path / "site-1")
    write_image(root / "images" / "Severe" / "wide.png", size=(16, 12), mode="RGB", color=(10, 20, 30))
    write_image(root / "images" / "Severe" / "small.jpg", size=(6, 5), fmt="JPEG")

    check = check_read_only(root, tmp_path)

    assert check.problems == []
    assert check.name == "site-1"
    assert check.image_counts == {"No_DR": 3, "Mild": 2, "Moderate": 0, "Severe": 2, "Proliferate_DR": 0}
    assert check.text_counts == {"Normal": 2, "Anxiety": 2, "Depression": 0, "Stress": 0, "Suicidal": 0}
    assert (check.image_size_min, check.image_size_max) == ((6, 5), (16, 12))
    assert check.image_kinds == {"gray": 6, "RGB": 1}
    assert check.text_lengths == (4, 20.5, 28)  # lengths 26, 15, 28, 4


def test_table_shows_counts_sizes_and_lengths(tmp_path):
    root = make_site(tmp_path / "site-1")
    console = Console(record=True, width=150)
    table = site_table(check_site(root, DATA))
    console.print(table)
    text = console.export_text()
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in text.splitlines() if "│" in line]

    assert ["image", "No_DR", "3"] in rows
    assert ["", "Moderate", "0"] in rows
    assert ["", "total", "5"] in rows
    assert ["", "sizes (WxH)", "8x8 (min) to 8x8 (max)"] in rows
    assert ["", "kinds", "5 gray"] in rows
    assert ["", "length (chars)", "4 / 20.5 / 28 (min / median / max)"] in rows
    assert table.caption == f"{root}: no problems"


def test_site_missing_classes_and_a_whole_modality_is_accepted(tmp_path):
    root = make_site(tmp_path / "site-3", images={"Severe": 2}, texts=None)
    site = load_site(root, DATA)
    assert site.image_labels == [3, 3]
    assert site.texts == [] and site.text_labels == []


def test_hidden_files_are_ignored(tmp_path):
    root = make_site(tmp_path / "site-1")
    (root / "images" / ".DS_Store").write_bytes(b"\x00\x01")
    (root / "images" / "Mild" / "._0.png").write_bytes(b"")
    assert check_read_only(root, tmp_path).problems == []


def test_unrequested_modality_is_not_read(tmp_path):
    root = make_site(tmp_path / "site-1")
    (root / "images" / "Mild" / "broken.png").write_bytes(b"not a png")
    assert check_read_only(root, tmp_path, modalities=("text",)).problems == []
    assert len(check_read_only(root, tmp_path, modalities=("image",)).problems) == 1


# --- every problem, one line each, nothing written ------------------------------------------


def test_missing_folder(tmp_path):
    root = tmp_path / "nowhere"
    assert check_read_only(root, tmp_path).problems == [f"site folder {root} not found"]


def test_empty_site(tmp_path):
    root = tmp_path / "site-0"
    root.mkdir()
    expected = f"{root}: empty site: no images under images/<class>/ and no records in texts.jsonl"
    assert check_read_only(root, tmp_path).problems == [expected]


def test_site_with_nothing_for_the_requested_modality_is_empty(tmp_path):
    root = make_site(tmp_path / "site-1", images={})
    expected = f"{root}: empty site: no images under images/<class>/"
    assert check_read_only(root, tmp_path, modalities=("image",)).problems == [expected]


def _garbage_png(root: Path) -> str:
    path = root / "images" / "Mild" / "bad.png"
    path.write_bytes(b"this is not a png")
    return f"{path}: not a readable image (Pillow cannot identify the format)"


def _truncated(fmt: str, suffix: str) -> Callable[[Path], str]:
    def breaker(root: Path) -> str:
        path = root / "images" / "Mild" / f"cut{suffix}"
        content = noise_image_bytes(fmt)
        path.write_bytes(content[: len(content) // 2])
        return f"{path}: corrupt or truncated image ("

    return breaker


def _text_file(root: Path) -> str:
    path = root / "images" / "Mild" / "notes.txt"
    path.write_text("grading notes")
    return f"{path}: not an image file (expected .png, .jpg, .jpeg)"


def _zero_byte_image(root: Path) -> str:
    path = root / "images" / "Mild" / "empty.png"
    path.write_bytes(b"")
    return f"{path}: empty file (0 bytes)"


def _zero_byte_texts(root: Path) -> str:
    path = root / "texts.jsonl"
    path.write_bytes(b"")
    return f"{path}: empty file (0 bytes)"


def _file_outside_class_folder(root: Path) -> str:
    path = write_image(root / "images" / "loose.png")
    return f"{path}: file outside a class folder (expected images/<class>/loose.png)"


def _folder_inside_class_folder(root: Path) -> str:
    path = root / "images" / "Mild" / "more"
    write_image(path / "0.png")
    return f"{path}: unexpected folder (images/<class>/ holds image files only)"


def _unknown_class_folder(root: Path) -> str:
    write_image(root / "images" / "Glaucoma" / "0.png")
    return f"{root / 'images' / 'Glaucoma'}: class folder 'Glaucoma' is not in the image class list {IMAGE_LIST}"


def _png_header(width: int, height: int) -> bytes:
    """A PNG's signature, header chunk and an empty data chunk: its size, no pixels."""

    def chunk(body: bytes) -> bytes:
        return (len(body) - 4).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = b"IHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(header) + chunk(b"IDAT") + chunk(b"IEND")


def _huge_image(root: Path) -> str:
    path = root / "images" / "Mild" / "huge.png"
    path.write_bytes(_png_header(13000, 13000))  # 169 megapixels in 57 bytes
    return f"{path}: 13000x13000 pixels, more than the 50,000,000 fedgen reads"


def _link_out_of_the_site(kind: str) -> Callable[[Path], str]:
    def breaker(root: Path) -> str:
        elsewhere = root.parent / "elsewhere"
        if kind == "image":
            target, link = write_image(elsewhere / "x.png"), root / "images" / "Mild" / "x.png"
        elif kind == "class folder":
            target, link = write_image(elsewhere / "Severe" / "0.png").parent, root / "images" / "Severe"
        else:
            target, link = root / "texts.jsonl", root / "texts.jsonl"
            target = target.rename(elsewhere / "texts.jsonl") if elsewhere.mkdir() is None else target
        link.symlink_to(target)
        return f"{link}: a link to {target.resolve()}, outside the site folder (copy the file in instead)"

    return breaker


def _line(raw: bytes, message: str) -> Callable[[Path], str]:
    def breaker(root: Path) -> str:
        path = append_line(root, raw)
        return f"{path} line {len(BASE_TEXTS) + 1}: {message}"

    return breaker


def _site_toml(content: str, message: str) -> Callable[[Path], str]:
    def breaker(root: Path) -> str:
        path = root / "site.toml"
        path.write_text(content, encoding="utf-8")
        return f"{path}: {message}"

    return breaker


PROBLEMS = {
    "garbage png": _garbage_png,
    "truncated png": _truncated("PNG", ".png"),
    "truncated jpeg": _truncated("JPEG", ".jpg"),
    "non-image file": _text_file,
    "zero-byte image": _zero_byte_image,
    "zero-byte texts": _zero_byte_texts,
    "file outside class folder": _file_outside_class_folder,
    "folder inside class folder": _folder_inside_class_folder,
    "unknown class folder": _unknown_class_folder,
    "non-utf8 line": _line(
        b'{"text": "caf\xe9", "label": "Normal"}', "not valid UTF-8 (invalid continuation byte at byte 13)"
    ),
    "invalid json": _line(b'{"text": "x", "label": ', "invalid JSON (Expecting value at column 24)"),
    "not an object": _line(b'["x", "Normal"]', 'expected a JSON object with "text" and "label", got an array'),
    "blank line": _line(b"  ", "blank line (texts.jsonl holds one JSON object per line)"),
    "no text": _line(b'{"label": "Normal"}', 'missing "text"'),
    "no label": _line(b'{"text": "x"}', 'missing "label"'),
    "neither": _line(b'{"note": "x"}', 'missing "text" and "label"'),
    "text not a string": _line(b'{"text": 3, "label": "Normal"}', '"text" must be a string, got a number'),
    "label not a string": _line(b'{"text": "x", "label": null}', '"label" must be a class name (a string), got null'),
    "empty text": _line(b'{"text": "  ", "label": "Normal"}', "empty text"),
    "unknown label": _line(
        b'{"text": "x", "label": "Angry"}', f"label 'Angry' is not in the text class list {TEXT_LIST}"
    ),
    "near-miss label": _line(
        b'{"text": "x", "label": "anxiety"}',
        f"label 'anxiety' is not in the text class list {TEXT_LIST}; did you mean 'Anxiety'?",
    ),
    "invalid toml": _site_toml("name = site-1\n", "invalid TOML (Invalid value (at line 1, column 8))"),
    "unknown toml key": _site_toml(
        'nmae = "x"\n',
        "unknown key 'nmae' (known keys: name, heldout_fraction, different_people, review_dir, require_dp, epsilon_budget, max_delta, min_noise_multiplier, audit_queries, audit_answers)",
    ),
    "heldout zero": _site_toml(
        "heldout_fraction = 0\n", "heldout_fraction = 0 must be a number between 0 and 1 (exclusive)"
    ),
    "heldout above one": _site_toml(
        "heldout_fraction = 1.5\n", "heldout_fraction = 1.5 must be a number between 0 and 1 (exclusive)"
    ),
    "epsilon zero": _site_toml("epsilon_budget = 0.0\n", "epsilon_budget = 0.0 must be a number greater than 0"),
    "epsilon negative": _site_toml("epsilon_budget = -1\n", "epsilon_budget = -1 must be a number greater than 0"),
    "empty name": _site_toml('name = ""\n', "name = '' must be a non-empty string"),
    "different people not a boolean": _site_toml(
        'different_people = "yes"\n', "different_people = 'yes' must be true or false"
    ),
    "huge image": _huge_image,
    "image linked from outside": _link_out_of_the_site("image"),
    "class folder linked from outside": _link_out_of_the_site("class folder"),
    "texts linked from outside": _link_out_of_the_site("texts"),
}


@pytest.mark.parametrize("breaker", PROBLEMS.values(), ids=PROBLEMS.keys())
def test_each_problem_is_one_line_naming_the_file(tmp_path, breaker):
    root = make_site(tmp_path / "site-2")
    expected = breaker(root)
    problems = check_read_only(root, tmp_path).problems
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected) if expected.endswith("(") else problems[0] == expected


@pytest.mark.parametrize(
    ("mode", "color", "channels", "message"),
    [
        ("RGB", (200, 10, 10), 1, "RGB image, but the consortium trains on gray images (channels = 1)"),
        ("L", 50, 3, "gray image, but the consortium trains on RGB images (channels = 3)"),
    ],
)
def test_image_channels_must_match(tmp_path, mode, color, channels, message):
    root = make_site(tmp_path / "site-2", images={})
    path = write_image(root / "images" / "Mild" / "0.png", mode=mode, color=color)
    assert check_read_only(root, tmp_path, channels=channels).problems == [f"{path}: {message}"]
    assert check_read_only(root, tmp_path).problems == []  # channels=None: either kind


def test_gray_palette_image_counts_as_gray(tmp_path):
    root = make_site(tmp_path / "site-2", images={})
    write_image(root / "images" / "Mild" / "0.png", mode="L", color=80)
    Image.open(root / "images" / "Mild" / "0.png").convert("P").save(root / "images" / "Mild" / "1.png")
    check = check_read_only(root, tmp_path, channels=1)
    assert check.problems == [] and check.image_kinds == {"gray": 2, "RGB": 0}


def test_every_problem_is_reported_and_load_site_names_the_first(tmp_path):
    root = make_site(tmp_path / "site-2")
    first = _zero_byte_image(root)
    unknown = _line(b'{"text": "x", "label": "Angry"}', "label 'Angry' is not in the text class list")(root)
    invalid = _line(b"{", "invalid JSON (Expecting property name enclosed in double quotes at column 2)")(root)

    problems = check_read_only(root, tmp_path).problems
    assert problems[0] == first
    assert problems[1].startswith(unknown)
    assert problems[2] == invalid.replace("line 5", "line 6")
    with pytest.raises(FedgenError) as raised:
        load_site(root, DATA)
    assert str(raised.value) == f"{first} (and 2 more problems; run `fedgen data check {root}`)"


def test_load_site_with_one_problem_has_no_hint(tmp_path):
    root = make_site(tmp_path / "site-2")
    first = _zero_byte_image(root)
    with pytest.raises(FedgenError) as raised:
        load_site(root, DATA)
    assert str(raised.value) == first


# --- loading --------------------------------------------------------------------------------


def test_labels_index_the_consortium_class_lists(tmp_path):
    root = make_site(tmp_path / "site-1", images={"Proliferate_DR": 1, "No_DR": 2, "Moderate": 1})
    site = load_site(root, DATA)

    assert site.image_classes == DATA.image_classes and site.text_classes == DATA.text_classes
    names = [(path.parent.name, path.name) for path in site.image_paths]
    assert names == [("No_DR", "0.png"), ("No_DR", "1.png"), ("Moderate", "0.png"), ("Proliferate_DR", "0.png")]
    assert site.image_labels == [0, 0, 2, 4]
    assert site.texts == [record["text"] for record in BASE_TEXTS]
    assert site.text_labels == [0, 1, 1, 0]


def test_site_toml_overrides_name_split_and_budget(tmp_path):
    root = make_site(tmp_path / "site-1")
    plain = load_site(root, DATA)
    assert (plain.name, plain.heldout_fraction, plain.epsilon_budget) == ("site-1", 0.2, None)

    (root / "site.toml").write_text('name = "st-marys"\nheldout_fraction = 0.5\nepsilon_budget = 4\n')
    site = load_site(root, DATA)
    assert (site.name, site.heldout_fraction, site.epsilon_budget) == ("st-marys", 0.5, 4)


# --- splitting ------------------------------------------------------------------------------


def test_split_is_stratified_disjoint_and_complete():
    labels = [0] * 10 + [1] * 2 + [2] * 1 + [3] * 7
    train, heldout = split_indices(labels, heldout_fraction=0.2, seed=0)

    assert np.intersect1d(train, heldout).size == 0
    assert sorted(np.concatenate([train, heldout]).tolist()) == list(range(len(labels)))
    held_per_class = np.bincount(np.asarray(labels)[heldout], minlength=4).tolist()
    assert held_per_class == [2, 1, 0, 1]  # round(10*.2)=2, at least 1 of 2, a singleton trains, round(1.4)=1


def test_split_is_deterministic_and_seeded():
    labels = [0] * 50 + [1] * 50
    first = split_indices(labels, heldout_fraction=0.3, seed=7)
    again = split_indices(labels, heldout_fraction=0.3, seed=7)
    other = split_indices(labels, heldout_fraction=0.3, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[1], other[1])


def test_split_of_a_class_ignores_other_classes():
    """Adding records of another class leaves a class's own split unchanged."""
    _, held_alone = split_indices([0] * 20, heldout_fraction=0.25, seed=3)
    _, held_mixed = split_indices([0] * 20 + [1] * 9, heldout_fraction=0.25, seed=3)
    assert np.array_equal(held_alone, held_mixed[held_mixed < 20])


def test_split_of_nothing_is_empty():
    train, heldout = split_indices([], heldout_fraction=0.2, seed=0)
    assert train.shape == heldout.shape == (0,)


# --- images ---------------------------------------------------------------------------------


def test_load_images_crops_the_centre_and_area_downsamples(tmp_path):
    pixels = np.zeros((4, 8), dtype=np.uint8)  # 8 wide, 4 high: the centre square is columns 2..5
    pixels[:, 4:] = 255
    path = tmp_path / "halves.png"
    Image.fromarray(pixels).save(path)

    batch = load_images([path], resolution=2, channels=1)
    assert batch.dtype == torch.float32 and batch.shape == (1, 1, 2, 2)
    assert batch[0, 0].tolist() == [[-1.0, 1.0], [-1.0, 1.0]]


def test_load_images_upsamples_and_maps_to_minus_one_one(tmp_path):
    gray = write_image(tmp_path / "gray.png", size=(4, 4), color=51)
    red = write_image(tmp_path / "red.jpg", size=(4, 6), mode="RGB", color=(255, 0, 0), fmt="JPEG")

    as_gray = load_images([gray], resolution=8, channels=1)
    assert as_gray.shape == (1, 1, 8, 8)
    assert torch.allclose(as_gray, torch.full_like(as_gray, 51 / 127.5 - 1))

    as_rgb = load_images([gray, red], resolution=8, channels=3)
    assert torch.equal(as_rgb[0, 0], as_rgb[0, 2])  # gray replicated to three channels
    assert as_rgb.min() >= -1 and as_rgb.max() <= 1
    assert as_rgb[1].mean(dim=(1, 2)).tolist() == pytest.approx([1.0, -1.0, -1.0], abs=0.03)


def test_load_images_scales_sixteen_bit_gray(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 65535], [0, 65535]], dtype=np.uint16)).save(path)
    assert load_images([path], resolution=2, channels=1)[0, 0].tolist() == [[-1.0, 1.0], [-1.0, 1.0]]


def test_image_and_text_splits_follow_split_indices(tmp_path):
    root = make_site(tmp_path / "site-1", images={"No_DR": 5, "Severe": 5})
    site = load_site(root, DATA)
    train, heldout = image_splits(site, resolution=4, channels=1, seed=0)

    _, held_idx = split_indices(site.image_labels, heldout_fraction=0.2, seed=0)
    assert (len(train), len(heldout)) == (8, 2)
    assert heldout.tensors[1].tolist() == [site.image_labels[i] for i in held_idx] == [0, 3]
    image, label = train[0]
    assert image.shape == (1, 4, 4) and label.dtype == torch.long

    text_train, text_held = text_splits(site, seed=0)
    pairs = list(zip(site.texts, site.text_labels))
    assert sorted(text_train + text_held) == sorted(pairs)
    assert {label for _, label in text_held} == {0, 1}  # both classes have 2 notes: one each held out
