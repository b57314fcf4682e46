"""A site's records: load a checked site folder and split it into train and held-out.

`load_site` refuses a site that fedgen.data.check finds problems in, naming the first. The
split is stratified per class and seeded per (seed, class), so adding records of one class does
not reshuffle the split of another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import TensorDataset

from fedgen.config import DataConfig
from fedgen.data.check import MODALITIES, scan_site
from fedgen.errors import FedgenError
from fedgen.site_policy import SitePolicy, policy_from_settings

__all__ = [
    "SiteData",
    "load_site",
    "split_indices",
    "heldout_size",
    "heldout_records",
    "load_images",
    "image_splits",
    "text_splits",
]

PIL_MODES = {1: "L", 3: "RGB"}
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L")  # 16-bit gray PNGs open in one of these
SIXTEEN_TO_EIGHT_BIT = 257.0  # 65535 / 255


@dataclass(frozen=True)
class SiteData:
    """A validated site. Labels index the consortium class lists."""

    root: Path
    name: str
    image_classes: list[str]
    text_classes: list[str]
    image_paths: list[Path]
    image_labels: list[int]
    texts: list[str]
    text_labels: list[int]
    heldout_fraction: float
    epsilon_budget: float | None  # the policy's, kept here for the privacy plan
    # site.toml's declaration that its image and note records are of different people (the
    # modalities then compose in parallel, fedgen.privacy.plan); otherwise they are the same.
    different_people: bool = False
    # Where the site keeps review kits (they hold real records) besides its own folder; None: none.
    review_dir: Path | None = None
    policy: SitePolicy = SitePolicy()  # what the site accepts (fedgen.site_policy)


# --- loading --------------------------------------------------------------------------------


def load_site(
    root: str | Path,
    data: DataConfig,
    *,
    modalities: Sequence[str] = MODALITIES,
    channels: int | None = None,
) -> SiteData:
    """The site's records, after `check_site`; raises FedgenError naming the first problem."""
    root = Path(root)
    scan = scan_site(root, data, modalities=tuple(modalities), channels=channels)
    problems = scan.check.problems
    if problems:
        more = len(problems) - 1
        hint = f" (and {more} more problem{'s' if more > 1 else ''}; run `fedgen data check {root}`)"
        raise FedgenError(problems[0] + (hint if more else ""))
    return SiteData(
        root=root,
        name=scan.check.name,
        image_classes=list(data.image_classes),
        text_classes=list(data.text_classes),
        image_paths=[image.path for image in scan.images],
        image_labels=[image.label for image in scan.images],
        texts=[text for text, _ in scan.texts],
        text_labels=[label for _, label in scan.texts],
        heldout_fraction=scan.settings.get("heldout_fraction", data.heldout_fraction),
        epsilon_budget=scan.settings.get("epsilon_budget"),
        different_people=scan.different_people,
        review_dir=root / scan.settings["review_dir"] if "review_dir" in scan.settings else None,
        policy=policy_from_settings(scan.settings),
    )


def heldout_size(n: int, heldout_fraction: float) -> int:
    """How many of a class's ``n`` records the split holds out: ``round(n * heldout_fraction)``,
    at least one and at most ``n - 1`` (a class of a single record trains)."""
    return min(max(round(n * heldout_fraction), 1), n - 1) if n else 0


def heldout_records(site: SiteData, *, seed: int) -> dict[str, list]:
    """What the split of ``site`` holds out: per modality, the image files and the 1-based
    line numbers of texts.jsonl (the records the audit scores as non-members)."""
    _, images = split_indices(site.image_labels, heldout_fraction=site.heldout_fraction, seed=seed)
    _, texts = split_indices(site.text_labels, heldout_fraction=site.heldout_fraction, seed=seed)
    return {"image": [site.image_paths[i] for i in images], "text": [int(i) + 1 for i in texts]}


def split_indices(labels: Sequence[int], *, heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, held-out) index arrays, sorted, disjoint, covering every index.

    Each class holds out ``round(n * heldout_fraction)`` of its ``n`` examples, at least one and
    at most ``n - 1`` when ``n >= 2``; a class with one example trains. Each class is shuffled
    by its own generator seeded with ``(seed, class)``.
    """
    assert 0 < heldout_fraction < 1, heldout_fraction
    labels = np.asarray(labels, dtype=np.int64)
    train, heldout = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n_heldout = heldout_size(len(members), heldout_fraction)
        shuffled = np.random.default_rng([seed, int(label)]).permutation(members)
        heldout.append(shuffled[:n_heldout])
        train.append(shuffled[n_heldout:])
    return _sorted_concat(train), _sorted_concat(heldout)


def _sorted_concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.sort(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)


def load_images(paths: Sequence[Path], *, resolution: int, channels: int) -> torch.Tensor:
    """Images as float32 [N, channels, resolution, resolution] in [-1, 1].

    Each image is centre-cropped to a square, then resized: area averaging (box filter) when it
    shrinks, bicubic when it grows. 16-bit gray is scaled to 8 bits, alpha is dropped.
    """
    batch = torch.empty((len(paths), channels, resolution, resolution), dtype=torch.float32)
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            upright = _eight_bit(ImageOps.exif_transpose(image)).convert(PIL_MODES[channels])
        square = _square(upright, resolution)
        pixels = np.asarray(square, dtype=np.float32).reshape(resolution, resolution, channels)
        batch[i] = torch.from_numpy(pixels.transpose(2, 0, 1) / 127.5 - 1.0)
    return batch


def _eight_bit(image: Image.Image) -> Image.Image:
    """Pillow's convert clips 16-bit gray at 255; scale it instead."""
    if image.mode not in SIXTEEN_BIT_MODES:
        return image
    pixels = np.clip(np.asarray(image, dtype=np.float64) / SIXTEEN_TO_EIGHT_BIT, 0, 255)
    return Image.fromarray(np.round(pixels).astype(np.uint8))


def _square(image: Image.Image, resolution: int) -> Image.Image:
    side = min(image.size)
    method = Image.Resampling.BOX if side >= resolution else Image.Resampling.BICUBIC
    return ImageOps.fit(image, (resolution, resolution), method=method)


def image_splits(site: SiteData, *, resolution: int, channels: int, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """(train, held-out) datasets of (image [C, H, W] in [-1, 1], label) pairs."""
    train, heldout = split_indices(site.image_labels, heldout_fraction=site.heldout_fraction, seed=seed)
    images = load_images(site.image_paths, resolution=resolution, channels=channels)
    labels = torch.tensor(site.image_labels, dtype=torch.long)
    return tuple(
        TensorDataset(images[torch.from_numpy(part)], labels[torch.from_numpy(part)]) for part in (train, heldout)
    )


def text_splits(site: SiteData, *, seed: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, held-out) lists of (text, label) pairs."""
    train, heldout = split_indices(site.text_labels, heldout_fraction=site.heldout_fraction, seed=seed)
    return tuple([(site.texts[i], site.text_labels[i]) for i in part] for part in (train, heldout))
