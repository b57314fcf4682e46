"""Validate a site folder: every problem one line, naming the file (and the line of texts.jsonl).

The site folder (see DESIGN.md)::

    SITE_DIR/
      images/<class name>/*.png|*.jpg|*.jpeg   any size, gray or RGB
      texts.jsonl   one {"text": ..., "label": <class name>} per line (extra keys ignored)
      site.toml     optional: name, heldout_fraction, different_people, review_dir and the
                    site's policy (fedgen.site_policy: require_dp, epsilon_budget, max_delta, ...)

`check_site` reads everything once and reports every problem it finds; it never writes
anything. fedgen.data.site loads a site only when this finds nothing wrong. Labels are indices
into the consortium's class lists (`DataConfig`), so every site agrees on them; a site may lack
some classes.

Conventions worth knowing:

- Hidden files (names starting with ".", e.g. ``.DS_Store``) are ignored everywhere.
- A symbolic link whose target lies outside the site folder is a problem, not followed: the
  folder is what the site vouches for.
- An image of more than ``MAX_IMAGE_PIXELS`` pixels is refused from its header, before any
  pixel is decoded.
- texts.jsonl may not contain blank lines: record ``i`` is line ``i + 1``, the numbering that
  the demo's ``phi_truth.jsonl`` and ``canaries.jsonl`` use ("index" = 0-based line).
"""

from __future__ import annotations

import difflib
import io
import json
import statistics
import tomllib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageMode, UnidentifiedImageError

from fedgen.config import DataConfig, RunConfig
from fedgen.errors import FedgenError
from fedgen.site_policy import POLICY_KEYS, policy_setting_problem

__all__ = [
    "IMAGE_SUFFIXES",
    "MODALITIES",
    "SiteCheck",
    "SiteScan",
    "check_site",
    "scan_site",
    "site_folders",
    "CLASS_LISTS",
    "site_class_names",
    "classes_from_sites",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGES_DIR = "images"
TEXTS_FILE = "texts.jsonl"
SITE_TOML = "site.toml"
SITE_TOML_KEYS = ("name", "heldout_fraction", "different_people", "review_dir", *POLICY_KEYS)
MODALITIES = ("image", "text")

MAX_IMAGE_PIXELS = 50_000_000  # 50 megapixels: far above any scan a site trains on at 64 px
GRAY, RGB = "gray", "RGB"
CHANNEL_KINDS = {1: GRAY, 3: RGB}
PIL_MODES = {1: "L", 3: "RGB"}


@dataclass(frozen=True)
class SiteCheck:
    """What `check_site` found: a summary of the usable records and every problem."""

    root: Path
    name: str
    modalities: tuple[str, ...]
    problems: list[str]
    image_counts: dict[str, int] = field(default_factory=dict)  # class -> usable images (0 if none)
    text_counts: dict[str, int] = field(default_factory=dict)
    image_size_min: tuple[int, int] | None = None  # (width, height) of the smallest image, by area
    image_size_max: tuple[int, int] | None = None
    image_kinds: dict[str, int] = field(default_factory=dict)  # "gray" / "RGB" -> number of images
    text_lengths: tuple[int, float, int] | None = None  # characters: min, median, max

    @property
    def ok(self) -> bool:
        return not self.problems


class _Invalid(Exception):
    """One record is unusable; the message says why (without the file name)."""


@dataclass(frozen=True)
class _Image:
    path: Path
    label: int
    size: tuple[int, int]
    kind: str


@dataclass(frozen=True)
class SiteScan:
    check: SiteCheck
    images: list[_Image]
    texts: list[tuple[str, int]]
    settings: dict

    @property
    def different_people(self) -> bool:
        """Whether site.toml declares its images and notes to be of different people (default: the same)."""
        return self.settings.get("different_people", False)


# --- checking -------------------------------------------------------------------------------


def check_site(
    root: str | Path,
    data: DataConfig,
    *,
    modalities: Sequence[str] = MODALITIES,
    channels: int | None = None,
) -> SiteCheck:
    """Validate a site folder without writing anything; `SiteCheck.problems` lists what is wrong.

    Only the requested modalities are read. ``channels`` (1 = gray, 3 = RGB) flags images of
    the other kind; None accepts both. A site that lacks a modality is fine as long as it has
    something for at least one requested modality.
    """
    return scan_site(Path(root), data, modalities=tuple(modalities), channels=channels).check


def scan_site(root: Path, data: DataConfig, *, modalities: tuple[str, ...], channels: int | None) -> SiteScan:
    unknown = set(modalities) - set(MODALITIES)
    if unknown:
        raise ValueError(f"unknown modalities {sorted(unknown)}; expected a subset of {MODALITIES}")
    if channels is not None and channels not in CHANNEL_KINDS:
        raise ValueError(f"channels must be 1 or 3 (or None), got {channels}")

    if not root.is_dir():
        reason = "is not a folder" if root.exists() else "not found"
        problem = f"site folder {root} {reason}"
        check = SiteCheck(root=root, name=root.name, modalities=modalities, problems=[problem])
        return SiteScan(check, images=[], texts=[], settings={})

    settings, problems = _read_site_toml(root / SITE_TOML)
    images: list[_Image] = []
    texts: list[tuple[str, int]] = []
    summary: dict = {}
    found = 0  # files under images/ and lines of texts.jsonl, usable or not
    if "image" in modalities:
        images, image_problems, found_images = _scan_images(root / IMAGES_DIR, data.image_classes, root)
        problems += image_problems + _channel_problems(images, channels)
        found += found_images
        images = [image for image in images if _channels_match(image, channels)]
        summary.update(_image_summary(images, data.image_classes))
    if "text" in modalities:
        texts, text_problems, found_lines = _scan_texts(root / TEXTS_FILE, data.text_classes, root)
        problems += text_problems
        found += found_lines
        summary.update(_text_summary(texts, data.text_classes))
    if found == 0:
        problems.append(_empty_site_problem(root, modalities))

    name = settings.get("name", root.resolve().name)
    check = SiteCheck(root=root, name=name, modalities=modalities, problems=problems, **summary)
    return SiteScan(check, images=images, texts=texts, settings=settings)


def _image_summary(images: list[_Image], classes: list[str]) -> dict:
    sizes = [image.size for image in images]
    return {
        "image_counts": _count(classes, [image.label for image in images]),
        "image_size_min": min(sizes, key=_area, default=None),
        "image_size_max": max(sizes, key=_area, default=None),
        "image_kinds": {kind: sum(image.kind == kind for image in images) for kind in (GRAY, RGB)},
    }


def _text_summary(texts: list[tuple[str, int]], classes: list[str]) -> dict:
    lengths = [len(text) for text, _ in texts]
    stats = (min(lengths), statistics.median(lengths), max(lengths)) if lengths else None
    return {"text_counts": _count(classes, [label for _, label in texts]), "text_lengths": stats}


def _empty_site_problem(root: Path, modalities: tuple[str, ...]) -> str:
    missing = {
        "image": f"no images under {IMAGES_DIR}/<class>/",
        "text": f"no records in {TEXTS_FILE}",
    }
    return f"{root}: empty site: " + " and ".join(missing[m] for m in modalities)


def _read_site_toml(path: Path) -> tuple[dict, list[str]]:
    """The valid settings of site.toml (absent = none) and a problem line per bad entry."""
    if not path.exists():
        return {}, []
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        return {}, [f"{path}: cannot read ({err.strerror})"]
    except UnicodeDecodeError as err:
        return {}, [f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})"]
    except tomllib.TOMLDecodeError as err:
        return {}, [f"{path}: invalid TOML ({err})"]

    settings, problems = {}, []
    for key, value in values.items():
        problem = _site_setting_problem(key, value)
        if problem:
            problems.append(f"{path}: {problem}")
        else:
            settings[key] = value
    return settings, problems


def _site_setting_problem(key: str, value: object) -> str | None:
    if key not in SITE_TOML_KEYS:
        return f"unknown key {key!r} (known keys: {', '.join(SITE_TOML_KEYS)})"
    if key == "name" and not (isinstance(value, str) and value.strip()):
        return f"name = {value!r} must be a non-empty string"
    if key == "heldout_fraction" and not (_is_number(value) and 0 < value < 1):
        return f"heldout_fraction = {value!r} must be a number between 0 and 1 (exclusive)"
    if key == "different_people" and not isinstance(value, bool):
        return f"different_people = {value!r} must be true or false"
    if key == "review_dir" and not (isinstance(value, str) and value.strip()):
        return f"review_dir = {value!r} must be a folder path (absolute, or relative to the site folder)"
    return policy_setting_problem(key, value)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _outside(path: Path, root: Path) -> str | None:
    """The problem of a link whose target lies outside the site folder (None: inside, or no link)."""
    if not path.resolve().is_relative_to(root.resolve()):
        return f"{path}: a link to {path.resolve()}, outside the site folder (copy the file in instead)"
    return None


def _scan_images(images_dir: Path, classes: list[str], root: Path) -> tuple[list[_Image], list[str], int]:
    """Usable images (consortium class order, then file name), problems, files seen."""
    if not images_dir.exists():
        return [], [], 0
    if _outside(images_dir, root):
        return [], [_outside(images_dir, root)], 1
    if not images_dir.is_dir():
        return [], [f"{images_dir}: expected a folder of class folders"], 1

    problems: list[str] = []
    found = 0
    by_class: dict[int, list[_Image]] = {}
    for entry in _visible(images_dir):
        if entry.is_file():
            found += 1
            expected = f"{IMAGES_DIR}/<class>/{entry.name}"
            problems.append(f"{entry}: file outside a class folder (expected {expected})")
        elif entry.name not in classes:
            found += sum(1 for path in entry.rglob("*") if path.is_file())
            problems.append(f"{entry}: class folder {_not_in_list(entry.name, 'image', classes)}")
        elif _outside(entry, root):
            found += 1
            problems.append(_outside(entry, root))
        else:
            label = classes.index(entry.name)
            images, class_problems, class_found = _scan_class_folder(entry, label, root)
            by_class[label] = images
            problems += class_problems
            found += class_found
    images = [image for label in sorted(by_class) for image in by_class[label]]
    return images, problems, found


def _scan_class_folder(folder: Path, label: int, root: Path) -> tuple[list[_Image], list[str], int]:
    images, problems, found = [], [], 0
    for path in _visible(folder):
        found += 1
        if _outside(path, root):
            problems.append(_outside(path, root))
            continue
        try:
            if path.is_dir():
                raise _Invalid(f"unexpected folder ({IMAGES_DIR}/<class>/ holds image files only)")
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise _Invalid(f"not an image file (expected {', '.join(IMAGE_SUFFIXES)})")
            size, kind = _inspect_image(path)
        except _Invalid as err:
            problems.append(f"{path}: {err}")
        else:
            images.append(_Image(path=path, label=label, size=size, kind=kind))
    return images, problems, found


def _visible(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if not path.name.startswith("."))


def site_folders(sites_dir: Path) -> list[Path]:
    """The site folders in a consortium folder (hidden folders, e.g. a state folder, are not sites)."""
    return [path for path in _visible(sites_dir) if path.is_dir()]


# --- the consortium's classes ---------------------------------------------------------------

CLASS_LISTS = {"image": "image_classes", "text": "text_classes"}  # modality -> DataConfig field


def site_class_names(root: str | Path) -> dict[str, set[str]]:
    """The class names a site folder uses, per modality: its image class folders that hold a
    visible file, and the string labels of texts.jsonl. Whatever else is wrong with the folder
    is left to ``check_site``."""
    root = Path(root)
    images_dir, texts_file = root / IMAGES_DIR, root / TEXTS_FILE
    image_names = set()
    if images_dir.is_dir():
        image_names = {
            entry.name
            for entry in _visible(images_dir)
            if entry.is_dir() and any(path.is_file() for path in _visible(entry))
        }
    text_names = set()
    if texts_file.is_file():
        for raw in texts_file.read_bytes().removeprefix(b"\xef\xbb\xbf").split(b"\n"):
            try:
                record = json.loads(raw)
            except ValueError:  # not JSON, or not UTF-8
                continue
            if isinstance(record, dict) and isinstance(record.get("label"), str):
                text_names.add(record["label"])
    return {"image": image_names, "text": text_names}


def classes_from_sites(
    config: RunConfig, site_dirs: Sequence[str | Path], *, modalities: Sequence[str] | None = None
) -> RunConfig:
    """``config`` with each class list it leaves out, for ``modalities`` (default: the ones it
    trains), set to the sorted union of the sites' class names: the consortium's classes, one
    list for every site (a site may lack some). A list the configuration gives is kept."""
    wanted = config.modalities if modalities is None else modalities
    missing = [m for m in wanted if CLASS_LISTS[m] not in config.data.model_fields_set]
    if not missing:
        return config
    found = [site_class_names(root) for root in site_dirs]
    update = {}
    for modality in missing:
        names = sorted(set().union(*(site[modality] for site in found)))
        if not names:
            where = f"{IMAGES_DIR}/<class>/ folders" if modality == "image" else f"labels in {TEXTS_FILE}"
            raise FedgenError(f"no site has {where}: no {modality} classes to train")
        update[CLASS_LISTS[modality]] = names
    return config.model_copy(update={"data": config.data.model_copy(update=update)})


def _inspect_image(path: Path) -> tuple[tuple[int, int], str]:
    """Size and kind (gray/RGB) of an image file that decodes completely."""
    try:
        content = path.read_bytes()
    except OSError as err:
        raise _Invalid(f"cannot read ({err.strerror})") from None
    if not content:
        raise _Invalid("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():  # Pillow's own size warning: the limit below is checked first
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(content))
        with image:
            width, height = image.size  # from the header: nothing decoded yet
            if width * height > MAX_IMAGE_PIXELS:
                raise _Invalid(f"{width}x{height} pixels, more than the {MAX_IMAGE_PIXELS:,} fedgen reads")
            image.verify()  # structure and checksums; the image is unusable afterwards
        with Image.open(io.BytesIO(content)) as image:
            image.load()  # full decode: catches truncated pixel data
            return image.size, _kind(image)
    except _Invalid:
        raise
    except Image.DecompressionBombError:
        raise _Invalid(f"more pixels than the {MAX_IMAGE_PIXELS:,} fedgen reads") from None
    except UnidentifiedImageError:
        raise _Invalid("not a readable image (Pillow cannot identify the format)") from None
    except Exception as err:  # a malformed file can make a decoder raise almost anything
        raise _Invalid(f"corrupt or truncated image ({err})") from None


def _kind(image: Image.Image) -> str:
    """GRAY or RGB; a palette image is gray when every palette entry is."""
    base = ImageMode.getmode(image.mode).basemode
    if base == "P":
        palette = image.getpalette("RGB") or []
        reds, greens, blues = palette[0::3], palette[1::3], palette[2::3]
        return GRAY if reds == greens == blues else RGB
    return GRAY if base == "L" else RGB


def _channels_match(image: _Image, channels: int | None) -> bool:
    return channels is None or image.kind == CHANNEL_KINDS[channels]


def _channel_problems(images: list[_Image], channels: int | None) -> list[str]:
    return [
        f"{image.path}: {image.kind} image, but the consortium trains on "
        f"{CHANNEL_KINDS[channels]} images (channels = {channels})"
        for image in images
        if not _channels_match(image, channels)
    ]


def _scan_texts(path: Path, classes: list[str], root: Path) -> tuple[list[tuple[str, int]], list[str], int]:
    """Usable (text, label) records in file order, problems, lines seen."""
    if not path.exists():
        return [], [], 0
    if _outside(path, root):
        return [], [_outside(path, root)], 1
    try:
        content = path.read_bytes()
    except OSError as err:
        return [], [f"{path}: cannot read ({err.strerror})"], 1
    if not content:
        return [], [f"{path}: empty file (0 bytes)"], 0

    lines = content.split(b"\n")
    if lines[-1] == b"":  # the newline that ends the last line
        lines.pop()
    lines[0] = lines[0].removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
    records, problems = [], []
    for number, raw in enumerate(lines, start=1):
        try:
            records.append(_parse_record(raw, classes))
        except _Invalid as err:
            problems.append(f"{path} line {number}: {err}")
    return records, problems, len(lines)


def _parse_record(raw: bytes, classes: list[str]) -> tuple[str, int]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _Invalid(f"not valid UTF-8 ({err.reason} at byte {err.start})") from None
    if not line.strip():
        raise _Invalid(f"blank line ({TEXTS_FILE} holds one JSON object per line)")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise _Invalid(f"invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise _Invalid(f'expected a JSON object with "text" and "label", got {_json_type(record)}')
    missing = [key for key in ("text", "label") if key not in record]
    if missing:
        raise _Invalid("missing " + " and ".join(f'"{key}"' for key in missing))
    text, label = record["text"], record["label"]
    if not isinstance(text, str):
        raise _Invalid(f'"text" must be a string, got {_json_type(text)}')
    if not text.strip():
        raise _Invalid("empty text")
    if not isinstance(label, str):
        raise _Invalid(f'"label" must be a class name (a string), got {_json_type(label)}')
    if label not in classes:
        raise _Invalid(f"label {_not_in_list(label, 'text', classes)}")
    return text, classes.index(label)


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _not_in_list(value: str, modality: str, classes: list[str]) -> str:
    message = f"{value!r} is not in the {modality} class list [{', '.join(classes)}]"
    close = difflib.get_close_matches(value, classes, n=1)
    return f"{message}; did you mean {close[0]!r}?" if close else message


def _count(classes: list[str], labels: list[int]) -> dict[str, int]:
    return {name: labels.count(index) for index, name in enumerate(classes)}


def _area(size: tuple[int, int]) -> tuple[int, int, int]:
    width, height = size
    return width * height, width, height
