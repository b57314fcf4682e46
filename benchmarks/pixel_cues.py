"""What does a linear model on pixels learn from a run's synthetic images, and what does it miss?

The gate holds the audit's pixel logistic regression (``audits.utility``'s reference) to 0.5 of
real. A linear model on whole images sees mostly how bright each class is: where a grade has
more dark lesions, its fundus is darker on average. This prints, per class, the mean brightness
inside the fundus (pixels above the black border) minus the mean over all classes, for each
site's real train images and for the synthetic images; then the reference's per-site ratio
(macro-F1 trained on synthetic / trained on real, each site's held-out images, pooled by
held-out count as the audit pools it) for the synthetic images as they are and with each
site's real class offsets put in their place. If the second ratio is well above the first, the
synthetic images draw the classes' lesions but not their brightness.

    python -m benchmarks.pixel_cues RUN SITES_DIR [--checkpoint fedgen:fundus-phantoms-32]

``--checkpoint`` also scores images sampled from that checkpoint (64 a class, the run's sampler):
the public pretraining before any site fine-tuned it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from benchmarks.privacy_utility import site_image_splits
from fedgen.artifacts import RunDir
from fedgen.audits.inputs import load_synthetic_images
from fedgen.audits.utility import _reference_scores
from fedgen.data.check import site_folders
from fedgen.models.diffusion import sample_images
from fedgen.models.pretrained import load_pretrained

BORDER = -0.95  # pixels at or below this are the black surround of the fundus
CHECKPOINT_PER_CLASS = 64


def class_offsets(images: torch.Tensor, labels: torch.Tensor, classes: int) -> np.ndarray:
    """Per class: mean brightness inside the fundus minus the mean over all images."""
    inside = (images > BORDER).float()
    brightness = (images * inside).flatten(1).sum(1) / inside.flatten(1).sum(1).clamp(min=1)
    return np.array([(brightness[labels == c].mean() - brightness.mean()).item() for c in range(classes)])


def with_offsets(synthetic, offsets: np.ndarray):
    """The synthetic images with their class offsets replaced by ``offsets`` inside the fundus."""
    images, labels = synthetic
    shift = offsets - class_offsets(images, labels, len(offsets))
    inside = (images > BORDER).to(images.dtype)
    return images + inside * torch.as_tensor(shift, dtype=images.dtype)[labels].view(-1, 1, 1, 1), labels


def reference_f1(data, test, classes) -> float:
    """Macro-F1 on ``test`` of the audit's reference trained on ``data``."""
    return _reference_scores(data, test, class_names=classes, seed=0)["macro_f1"]


def reference_ratio(sites, synthetic_for_site, classes) -> float:
    """The pooled reference ratio, the synthetic set chosen per site by ``synthetic_for_site``."""
    synthetic = [reference_f1(synthetic_for_site(site["offsets"]), site["test"], classes) for site in sites]
    weights = [len(site["test"][1]) for site in sites]
    real = [site["real_f1"] for site in sites]
    return float(np.average(synthetic, weights=weights) / np.average(real, weights=weights))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder with generated images")
    parser.add_argument("sites", type=Path, help="the run's site folders' parent")
    parser.add_argument("--checkpoint", help="also sample this image checkpoint (e.g. fedgen:fundus-phantoms-32)")
    args = parser.parse_args()
    run = RunDir(args.run)
    config = run.config()
    classes = config.data.image_classes
    print("class brightness offsets, in the order " + ", ".join(classes))
    sites = []
    for name, train, test in site_image_splits(site_folders(args.sites), config):
        offsets = class_offsets(*train, len(classes))
        sites.append({"test": test, "offsets": offsets, "real_f1": reference_f1(train, test, classes)})
        print(f"{name} real train images: " + "  ".join(f"{o:+.3f}" for o in offsets))
    sets = {"synthetic": load_synthetic_images(run, config)}
    if args.checkpoint:
        unet = load_pretrained(args.checkpoint, config.image, classes)
        labels = torch.arange(len(classes)).repeat_interleave(CHECKPOINT_PER_CLASS)
        sets[args.checkpoint] = (
            sample_images(unet, labels, config=config.image, generator=torch.Generator().manual_seed(config.seed)),
            labels,
        )
    for name, data in sets.items():
        offsets = class_offsets(*data, len(classes))
        print(f"{name}: " + "  ".join(f"{o:+.3f}" for o in offsets))
        as_is = reference_ratio(sites, lambda _: data, classes)
        placed = reference_ratio(sites, lambda real_offsets: with_offsets(data, real_offsets), classes)
        print(f"  reference ratio {as_is:.3f}; with each site's real class offsets {placed:.3f} (n = {len(data[1])})")


if __name__ == "__main__":
    main()
