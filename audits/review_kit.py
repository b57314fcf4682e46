"""A blinded real-or-synthetic review kit, made AT a site: real records never leave it.

``build_kit`` writes, into a folder inside the site folder::

    KIT/
      review.html      the page reviewers open: one file, no server, no network
      answer-key.json  which item is real and of which class: stays with the site
      README.txt       what to hand to whom

The kit goes inside the site folder, or inside the folder its site.toml names as
``review_dir`` (e.g. a share reserved for the site's clinicians): nowhere else.

The page shows a shuffled mix of the site's HELD-OUT real records (the split the federation
did not train on) and the run's synthetic records, the same number of each per class, and
asks per item: real or synthetic, how confident, and which class the reviewer reads. It
saves one answers file per reviewer; ``fedgen.audits.review.score_kit`` scores them.

Blinding, side channel by side channel:

- images: real and synthetic alike are cropped and resized exactly as training saw them
  (``load_images`` at the run's resolution and channels), then encoded by one encoder as an
  UNCOMPRESSED PNG with no metadata chunk: every image of a kit has the same bytes-length, the
  same chunks (IHDR, IDAT, IEND) and no EXIF, text, time or size that differs by source;
- texts: Unicode NFC, "\\n" line ends, no trailing spaces on a line or around the note;
- no file name, path, record index or class reaches the page; items are numbered in a
  random order drawn from the operating system's randomness (``seed`` fixes it for tests);
- the key is a separate file; the page holds only the kit id that answers files quote.

What blinding cannot remove is the content itself (a truncated synthetic note, a texture):
that is what the review measures.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import secrets
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import jinja2
import numpy as np
from PIL import Image

from fedgen.artifacts import RunDir
from fedgen.audits.report import REPORT_JSON
from fedgen.audits.review import (
    ANSWERS_FORMAT,
    CONFIDENCE_LEVELS,
    KEY_FORMAT,
    KIT_KEY,
    KIT_PAGE,
    REAL,
    SOURCES,
    SYNTHETIC,
)
from fedgen.config import RunConfig
from fedgen.data.check import IMAGES_DIR
from fedgen.data.site import SiteData, load_images, load_site, split_indices
from fedgen.errors import FedgenError
from fedgen.files import atomic_dir
from fedgen.generate import synthetic_image_files, synthetic_text_records

__all__ = [
    "DEFAULT_PER_CLASS",
    "KIT_README",
    "Kit",
    "build_kit",
    "open_synthetic",
    "kit_location",
    "blind_png",
    "blind_text",
]

DEFAULT_PER_CLASS = 10  # real items per class (and as many synthetic): 2 x 10 x 5 classes = 100 items
KIT_README = "README.txt"
ITEM_PREFIX = {"image": "I", "text": "T"}

README_TEXT = """\
Blinded real-or-synthetic review kit {kit}
run {run}, site {site}, made {created}

{page}
    Give this page to the reviewers. It holds real held-out records of this site: keep it
    where this site's records may be (it was written inside the site's folders for that reason).
    Each reviewer opens it in a browser (no network is used), answers every item and presses
    "Save answers", which downloads one answers file per reviewer.

{key}
    The answer key: which item is real. Keep it with the site's data steward; never give it
    to a reviewer or send it to the coordinator.

Scoring, at the site:  fedgen review score {kit_dir} ANSWERS.json ...
writes aggregates only (SCORES.json); that file is what the coordinator may receive.
"""


@dataclass(frozen=True)
class Kit:
    """What ``build_kit`` wrote."""

    root: Path
    page: Path
    key: Path
    kit_id: str
    items_per_class: dict[str, dict[str, int]]  # modality -> class -> real items (as many synthetic)


# --------------------------------------------------------------------------- blinding


def blind_png(pixels: np.ndarray) -> bytes:
    """An [H, W, C] uint8 image as an uncompressed PNG with no metadata: its length depends on
    H, W and C only, and it holds the chunks IHDR, IDAT and IEND alone."""
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def blind_text(text: str) -> str:
    """The note as reviewers see it: NFC, "\\n" line ends, no trailing spaces, stripped."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def _uint8(images) -> np.ndarray:
    """``load_images`` output ([N, C, H, W] in [-1, 1], from 8-bit pixels) back to [N, H, W, C] uint8."""
    return ((images + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


# --------------------------------------------------------------------------- where a kit may go


def kit_location(site: SiteData, out: str | Path) -> Path:
    """``out``, resolved, after checking that real records may go there: inside the site folder
    (not its images/ folder, which holds the site's data) or inside the folder the site names
    in site.toml as ``review_dir``; and not an existing folder with content."""
    out = Path(out).resolve()
    root = site.root.resolve()
    allowed = [root] + ([site.review_dir.resolve()] if site.review_dir is not None else [])
    if out in allowed:
        raise FedgenError(
            f"{out} is the site's own folder: name a new folder inside it (e.g. --out {out / 'review-kit'})"
        )
    if not any(out.is_relative_to(folder) for folder in allowed):
        named = (
            f" or the review_dir of its site.toml ({allowed[1]})"
            if len(allowed) > 1
            else " (or a review_dir the site names in site.toml)"
        )
        raise FedgenError(
            f"{out} is outside the site folder {root}: a review kit holds real records and is written only "
            f"inside the site folder{named}; e.g. --out {root / 'review-kit'}"
        )
    if out.is_relative_to(root / IMAGES_DIR):
        raise FedgenError(f"{out} is inside the site's {IMAGES_DIR}/ folder: choose a folder beside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FedgenError(f"{out} already exists: choose a new folder (an earlier kit's key must not be lost)")
    return out


# --------------------------------------------------------------------------- choosing items


@dataclass(frozen=True)
class _Item:
    source: str
    label: int
    payload: str  # base64 PNG or the note
    record: str  # where it came from (stays in the key)


def _per_class(real: list[int], synthetic: list[int], classes: list[str], limit: int) -> dict[int, int]:
    """Items per class and source: as many as both sources have, at most ``limit``."""
    counts = {}
    for label in range(len(classes)):
        n = min(real.count(label), synthetic.count(label), limit)
        if n > 0:
            counts[label] = n
    return counts


def _pick(labels: list[int], label: int, n: int, rng: np.random.Generator) -> list[int]:
    members = [i for i, x in enumerate(labels) if x == label]
    return sorted(rng.choice(members, size=n, replace=False).tolist())


def _heldout(labels: list[int], site: SiteData, split_seed: int) -> list[int]:
    """Indices of the site's held-out records: the split the federation trained without."""
    _, heldout = split_indices(labels, heldout_fraction=site.heldout_fraction, seed=split_seed)
    return heldout.tolist()


def _image_items(run: RunDir, config: RunConfig, site: SiteData, rng: np.random.Generator, limit: int) -> list[_Item]:
    classes = config.data.image_classes
    synthetic_paths, synthetic_labels = synthetic_image_files(run, classes)
    heldout = _heldout(site.image_labels, site, config.data.split_seed)
    real_labels = [site.image_labels[i] for i in heldout]
    chosen: list[tuple[str, int, Path, str]] = []
    for label, n in _per_class(real_labels, synthetic_labels, classes, limit).items():
        for i in _pick(real_labels, label, n, rng):
            path = site.image_paths[heldout[i]]
            chosen.append((REAL, label, path, path.relative_to(site.root).as_posix()))
        for i in _pick(synthetic_labels, label, n, rng):
            path = synthetic_paths[i]
            chosen.append((SYNTHETIC, label, path, path.relative_to(run.root).as_posix()))
    if not chosen:
        return []
    # One pipeline for both sources: the training view, then one encoder.
    pixels = _uint8(
        load_images([c[2] for c in chosen], resolution=config.image.resolution, channels=config.image.channels)
    )
    return [
        _Item(source, label, base64.b64encode(blind_png(image)).decode("ascii"), record)
        for (source, label, _, record), image in zip(chosen, pixels)
    ]


def _text_items(run: RunDir, config: RunConfig, site: SiteData, rng: np.random.Generator, limit: int) -> list[_Item]:
    synthetic_texts, synthetic_labels = synthetic_text_records(run, config.data.text_classes)
    heldout = _heldout(site.text_labels, site, config.data.split_seed)
    real_labels = [site.text_labels[i] for i in heldout]
    items = []
    for label, n in _per_class(real_labels, synthetic_labels, config.data.text_classes, limit).items():
        for i in _pick(real_labels, label, n, rng):
            items.append(_Item(REAL, label, blind_text(site.texts[heldout[i]]), f"texts.jsonl line {heldout[i] + 1}"))
        for i in _pick(synthetic_labels, label, n, rng):
            items.append(_Item(SYNTHETIC, label, blind_text(synthetic_texts[i]), f"synthetic/texts.jsonl line {i + 1}"))
    return items


ITEM_BUILDERS = {"image": _image_items, "text": _text_items}


# --------------------------------------------------------------------------- the page


def _script_json(value) -> str:
    """JSON that can sit inside a <script> element: no "<", ">" or "&" (so no "</script>")
    and no U+2028/U+2029, which end a line in older JavaScript."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    for char, escape in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escape)
    return text


def _template() -> jinja2.Template:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("fedgen.audits", "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    return environment.get_template(KIT_PAGE)


def render_page(kit_id: str, sections: dict[str, dict]) -> str:
    """The review page. ``sections``: modality -> {"classes", "items": [{"id", "png" | "text"}]}."""
    data = {
        "kit": kit_id,
        "format": ANSWERS_FORMAT,
        "sources": list(SOURCES),
        "confidence": list(CONFIDENCE_LEVELS),
        "sections": sections,
    }
    n_items = sum(len(section["items"]) for section in sections.values())
    return _template().render(data_json=_script_json(data), n_items=n_items, modalities=list(sections))


# --------------------------------------------------------------------------- building


def open_synthetic(folder: str | Path) -> tuple[RunDir, RunConfig, str]:
    """(folder, run configuration, run id) of a run folder or of a release of one.

    A release (``fedgen release``: synthetic/ and audit/report.json, no config.toml) is what a
    site should review: its synthetic data passed the audit. The configuration and the run id
    then come from the report.
    """
    run = RunDir(folder)
    if run.config_path.is_file():
        return run, run.config(), run.root.name
    report_path = run.root / "audit" / REPORT_JSON
    if not report_path.is_file():
        raise FedgenError(
            f"{run.root} is neither a fedgen run folder (no config.toml) nor a release of one (no audit/{REPORT_JSON})"
        )
    try:
        recorded = json.loads(report_path.read_text(encoding="utf-8"))["run"]
        return run, RunConfig.model_validate(recorded["config"]), str(recorded["id"])
    except (ValueError, KeyError, TypeError) as err:
        raise FedgenError(f"{report_path}: not an audit report with the run's configuration ({err})") from None


def build_kit(
    source: str | Path,
    site_dir: str | Path,
    out: str | Path,
    *,
    per_class: int = DEFAULT_PER_CLASS,
    modalities: Sequence[str] | None = None,
    seed: int | None = None,
) -> Kit:
    """Write a review kit for the synthetic data of ``source`` (a run folder, or a release of one)
    and the site's held-out records into ``out``.

    ``out`` must be a new folder inside the site folder or its ``review_dir`` (``kit_location``). ``per_class``: real
    items per class, at most (each class gets as many real as synthetic items: the smaller of
    its held-out and synthetic counts, capped). ``seed`` fixes the choice and the order (tests);
    by default both come from the operating system's randomness.
    """
    if per_class < 1:
        raise FedgenError(f"--per-class must be at least 1, got {per_class}")
    run, config, run_id = open_synthetic(source)
    wanted = list(modalities) if modalities else list(config.modalities)
    unknown = [m for m in wanted if m not in config.modalities]
    if unknown:
        raise FedgenError(f"run {run_id} has no {unknown[0]} model (its modalities: {', '.join(config.modalities)})")
    site = load_site(
        site_dir, config.data, modalities=wanted, channels=config.image.channels if "image" in wanted else None
    )
    target = kit_location(site, out)
    rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
    kit_id = secrets.token_hex(8)

    sections, key_sections, items_per_class = {}, {}, {}
    for modality in wanted:
        classes = config.data.image_classes if modality == "image" else config.data.text_classes
        items = ITEM_BUILDERS[modality](run, config, site, rng, per_class)
        if not items:
            continue
        order = rng.permutation(len(items))
        width = len(str(len(items)))
        numbered = {f"{ITEM_PREFIX[modality]}-{n + 1:0{width}d}": items[i] for n, i in enumerate(order)}
        field = "png" if modality == "image" else "text"
        sections[modality] = {
            "classes": classes,
            "items": [{"id": item_id, field: item.payload} for item_id, item in numbered.items()],
        }
        counts = {
            classes[label]: sum(1 for it in items if it.label == label and it.source == REAL)
            for label in range(len(classes))
        }
        items_per_class[modality] = {name: n for name, n in counts.items() if n}
        key_sections[modality] = {
            "classes": classes,
            "items_per_class": items_per_class[modality],
            "items": {
                item_id: {"source": item.source, "class": classes[item.label], "record": item.record}
                for item_id, item in numbered.items()
            },
        }
    if not sections:
        raise FedgenError(
            f"no class has both held-out records at {site.root} and synthetic {'/'.join(wanted)} records in {run.root}: nothing to review"
        )

    page = render_page(kit_id, sections)
    created = datetime.now(UTC).isoformat(timespec="seconds")
    key = {
        "format": KEY_FORMAT,
        "kit": kit_id,
        "run": run_id,
        "site": site.name,
        "created_at": created,
        "page_sha256": hashlib.sha256(page.encode("utf-8")).hexdigest(),
        "modalities": key_sections,
    }
    readme = README_TEXT.format(
        kit=kit_id, run=run_id, site=site.name, created=created, page=KIT_PAGE, key=KIT_KEY, kit_dir=target
    )
    with atomic_dir(target) as staging:
        (staging / KIT_PAGE).write_text(page, encoding="utf-8")
        (staging / KIT_KEY).write_text(json.dumps(key, indent=2), encoding="utf-8")
        (staging / KIT_README).write_text(readme, encoding="utf-8")
    return Kit(target, target / KIT_PAGE, target / KIT_KEY, kit_id, items_per_class)
