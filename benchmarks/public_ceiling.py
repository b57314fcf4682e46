"""How far does the public set itself carry? Its REAL images scored as if they were synthetic.

A model pretrained on public data and fine-tuned at the sites draws what it learned mostly from
the public set. This scores a class-balanced sample of the labelled public images exactly as
``benchmarks.privacy_utility`` scores a run's synthetic images: a utility classifier trained on
them alone, tested on the sites' pooled real held-out images (ratio to the real-trained one),
and FID in the same feature space. Synthetic images well below this ratio lose to the public
domain; above it, the sites' fine-tuning taught the model something the public set lacks.

    python -m benchmarks.public_ceiling PUBLIC_DIR SITES_DIR [--per-class 192]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.privacy_utility import CLASSIFIER_SEEDS, RealSides, synthetic_image_scores
from fedgen.config import load_config
from fedgen.data.check import site_folders
from fedgen.data.site import load_images
from fedgen.pretrain import read_public_images


def balanced_sample(labels: torch.Tensor, per_class: int, *, seed: int = 0) -> torch.Tensor:
    """Up to ``per_class`` indices of each class, drawn without replacement."""
    generator = torch.Generator().manual_seed(seed)
    picks = []
    for c in labels.unique():
        members = torch.nonzero(labels == c).flatten()
        picks.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(picks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("public", type=Path, help="a labelled public ImageFolder (fedgen demo-public --labelled)")
    parser.add_argument("sites", type=Path)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument(
        "--per-class",
        type=int,
        default=192,
        help="public images per class (the benchmark's synthetic count is as many as real train images)",
    )
    args = parser.parse_args()
    config = load_config(args.config)
    classes = config.data.image_classes
    public = read_public_images(args.public, classes)
    if public.labels is None:
        raise SystemExit(f"{args.public} is unlabelled: this scores a labelled public set")
    labels = torch.tensor(public.labels)
    picked = balanced_sample(labels, args.per_class)
    pixels = load_images(
        [public.paths[i] for i in picked], resolution=config.image.resolution, channels=config.image.channels
    )
    real = RealSides(site_folders(args.sites), CLASSIFIER_SEEDS)(config, "image")
    scores = synthetic_image_scores(real, (pixels, labels[picked]), classes, seeds=CLASSIFIER_SEEDS)
    print(
        f"{len(picked)} public images: real-trained {scores['real_accuracy']:.3f}, public-trained "
        f"{scores['synthetic_accuracy']:.3f} (sd {scores['synthetic_accuracy_sd']:.3f}; {scores['classifier']}), "
        f"ratio {scores['ratio']:.2f}, FID {scores['fid']:.1f} (held-out n = {scores['n_test']})"
    )


if __name__ == "__main__":
    main()
