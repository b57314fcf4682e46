"""The demo consortium: simulated hospital site folders, made from nothing, offline.

Each site gets fundus phantoms (``phantoms.py``) and assessment notes with planted PHI and
canaries (``notes.py``) in the site folder layout every fedgen command reads, plus the two demo
side files (``phi_truth.jsonl``, ``canaries.jsonl``) that only the audits' ground truth uses.
Sites differ the way hospitals do: class mix drawn from Dirichlet(alpha) per site (non-IID), and
a scanner style (brightness, contrast, vignetting, noise) per site.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import tomli_w
from PIL import Image

from fedgen.config import DR_GRADES, MENTAL_HEALTH_CLASSES
from fedgen.data.notes import CanaryNote, Note, make_site_notes
from fedgen.data.phantoms import ScannerStyle, draw_scanner_style, render_phantom
from fedgen.data.public_notes import make_public_notes
from fedgen.errors import FedgenError
from fedgen.files import atomic_dir
from fedgen.logs import progress_bar

__all__ = [
    "make_demo_consortium",
    "make_public_phantoms",
    "make_public_note_folder",
    "PUBLIC_GRADE_MIX",
    "PUBLIC_STYLE_RANGES",
]

MIN_PER_CLASS = 4  # every class at every site (when the size allows), so held-out splits see it
MIN_RESOLUTION = 8  # the smallest image the model config accepts


def make_demo_consortium(
    out: str | Path,
    *,
    sites: int = 3,
    seed: int = 0,
    images_per_site: int = 300,
    texts_per_site: int = 200,
    alpha: float = 1.0,
    phi_fraction: float = 0.3,
    canaries_per_site: int = 1,
    resolution: int = 32,
    different_people: bool = False,
    progress: bool = False,
) -> list[Path]:
    """Write ``out/site-1 .. out/site-N`` and return their paths; same seed, same bytes.

    ``texts_per_site`` counts ordinary notes; the canaries are inserted on top of them.
    ``different_people``: each site.toml says that its images and notes are of different people
    (true of the demo's records, drawn from separate streams with no patient in common), which
    lets each modality spend the site's whole budget; by default the sites keep the cautious
    assumption that they are the same people.
    The folder appears only when complete: it is built in a hidden sibling and renamed.
    """
    out = Path(out)
    _validate(
        out,
        sites=sites,
        images=images_per_site,
        texts=texts_per_site,
        alpha=alpha,
        phi_fraction=phi_fraction,
        canaries=canaries_per_site,
        resolution=resolution,
    )
    with atomic_dir(out) as staging:  # `out` was validated absent or empty
        site_seeds = np.random.SeedSequence(seed).spawn(sites)
        with progress_bar(
            progress, total=sites * (images_per_site + 1), description="writing the demo consortium"
        ) as advance:
            for number, site_seed in enumerate(site_seeds, start=1):
                _write_site(
                    staging / f"site-{number}",
                    site_seed,
                    images=images_per_site,
                    texts=texts_per_site,
                    alpha=alpha,
                    phi_fraction=phi_fraction,
                    canaries=canaries_per_site,
                    resolution=resolution,
                    different_people=different_people,
                    advance=advance,
                )
    return [out / f"site-{number}" for number in range(1, sites + 1)]


# The public set is another population seen by other cameras, so pretraining on it is an
# honest head start: a screening mix (mostly healthy eyes), and every image from its own
# camera, in ranges wider than any site's (phantoms.STYLE_RANGES).
PUBLIC_GRADE_MIX = (0.5, 0.15, 0.15, 0.1, 0.1)
PUBLIC_STYLE_RANGES = {
    "brightness": (-0.15, 0.15),
    "contrast": (0.6, 1.4),
    "vignetting": (0.0, 0.9),
    "noise": (0.0, 0.04),
}


def make_public_phantoms(
    out: str | Path,
    *,
    images: int = 3000,
    seed: int = 1000,
    resolution: int = 32,
    labelled: bool = False,
    progress: bool = False,
) -> Path:
    """Write ``images`` phantoms of another population for public pretraining.

    Grades follow ``PUBLIC_GRADE_MIX``. Unlabelled (default): a flat folder of PNGs, so the
    class information must come from the sites. ``labelled``: an ImageFolder, one folder per
    grade, as a public graded set (another screening programme's) would be. Use a seed no site
    uses (the demo consortium's default is 0).
    """
    out = Path(out)
    if images < 1:
        raise FedgenError(f"images={images}: the public set needs at least one image")
    if resolution < MIN_RESOLUTION:
        raise FedgenError(f"resolution={resolution}: must be at least {MIN_RESOLUTION}")
    if out.exists():
        raise FedgenError(f"{out} already exists; choose a new folder")
    rng = np.random.default_rng(seed)
    grades = rng.choice(len(DR_GRADES), size=images, p=PUBLIC_GRADE_MIX)
    with (
        atomic_dir(out) as staging,
        progress_bar(progress, total=images, description="writing public phantoms") as advance,
    ):
        for i, grade in enumerate(grades):
            style = ScannerStyle(**{k: float(rng.uniform(*b)) for k, b in PUBLIC_STYLE_RANGES.items()})
            pixels = render_phantom(int(grade), rng, size=resolution, style=style)
            folder = staging / DR_GRADES[grade] if labelled else staging
            folder.mkdir(exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{i:05d}.png")
            advance(1)
    return out


def make_public_note_folder(out: str | Path, *, notes: int = 4000, seed: int = 1000) -> Path:
    """Write ``notes`` public teaching-case notes (``fedgen.data.public_notes``: worded apart
    from the demo sites' notes, no PHI) as ``out/texts.jsonl``, the layout of a site's notes."""
    out = Path(out)
    if out.exists():
        raise FedgenError(f"{out} already exists; choose a new folder")
    rows = [{"text": text, "label": label} for label, text in make_public_notes(notes, seed=seed)]
    with atomic_dir(out) as staging:
        _write_jsonl(staging / "texts.jsonl", rows)
    return out


def _validate(
    out: Path,
    *,
    sites: int,
    images: int,
    texts: int,
    alpha: float,
    phi_fraction: float,
    canaries: int,
    resolution: int,
) -> None:
    if sites < 1:
        raise FedgenError(f"sites={sites}: a consortium needs at least 1 site")
    if images < len(DR_GRADES):
        raise FedgenError(f"images_per_site={images}: need at least one image of each of the {len(DR_GRADES)} grades")
    if texts < len(MENTAL_HEALTH_CLASSES):
        raise FedgenError(
            f"texts_per_site={texts}: need at least one note of each of the {len(MENTAL_HEALTH_CLASSES)} classes"
        )
    if not alpha > 0:
        raise FedgenError(f"alpha={alpha}: the Dirichlet concentration must be > 0")
    if not 0.0 <= phi_fraction <= 1.0:
        raise FedgenError(f"phi_fraction={phi_fraction}: must be between 0 and 1")
    if canaries < 0:
        raise FedgenError(f"canaries_per_site={canaries}: must be 0 or more")
    if resolution < MIN_RESOLUTION:
        raise FedgenError(f"resolution={resolution}: must be at least {MIN_RESOLUTION}")
    if out.exists() and not out.is_dir():
        raise FedgenError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise FedgenError(f"{out} exists and is not empty; choose a new folder")


def _class_counts(total: int, classes: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """A floor for every class, the rest spread by Dirichlet(alpha) class proportions."""
    floor = min(MIN_PER_CLASS, total // classes)
    proportions = rng.dirichlet(np.full(classes, alpha))
    return floor + rng.multinomial(total - floor * classes, proportions)


def _write_site(
    site: Path,
    seed: np.random.SeedSequence,
    *,
    images: int,
    texts: int,
    alpha: float,
    phi_fraction: float,
    canaries: int,
    resolution: int,
    different_people: bool,
    advance: Callable[[int], None],
) -> None:
    # Separate streams: changing the number of notes leaves the images as they were.
    image_rng, text_rng = (np.random.default_rng(s) for s in seed.spawn(2))
    site.mkdir()
    settings = {"name": site.name} | ({"different_people": True} if different_people else {})
    (site / "site.toml").write_text(tomli_w.dumps(settings), encoding="utf-8")
    _write_images(
        site / "images",
        image_rng,
        total=images,
        alpha=alpha,
        resolution=resolution,
        advance=advance,
    )

    counts = _class_counts(texts, len(MENTAL_HEALTH_CLASSES), alpha, text_rng)
    labels = text_rng.permutation(np.repeat(MENTAL_HEALTH_CLASSES, counts)).tolist()
    notes = make_site_notes(labels, text_rng, phi_fraction=phi_fraction, canaries=canaries)
    _write_notes(site, notes)
    advance(1)


def _write_images(
    folder: Path,
    rng: np.random.Generator,
    *,
    total: int,
    alpha: float,
    resolution: int,
    advance: Callable[[int], None],
) -> None:
    style = draw_scanner_style(rng)
    counts = _class_counts(total, len(DR_GRADES), alpha, rng)
    for grade, (name, count) in enumerate(zip(DR_GRADES, counts)):
        (folder / name).mkdir(parents=True)
        for i in range(count):
            pixels = render_phantom(grade, rng, size=resolution, style=style)
            Image.fromarray(pixels).save(folder / name / f"{i:05d}.png")
            advance(1)


def _write_notes(site: Path, notes: Sequence[Note]) -> None:
    texts, phi, canaries = [], [], []
    for index, note in enumerate(notes):
        texts.append({"text": note.text, "label": note.label})
        phi.extend({"index": index, **asdict(span)} for span in note.phi)
        if isinstance(note, CanaryNote):
            canaries.append(
                {
                    "index": index,
                    "text": note.text,
                    "label": note.label,
                    "template": note.template,
                    "secret": note.secret,
                }
            )
    _write_jsonl(site / "texts.jsonl", texts)
    _write_jsonl(site / "phi_truth.jsonl", phi)
    _write_jsonl(site / "canaries.jsonl", canaries)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    path.write_text(lines, encoding="utf-8")
