"""What does the image model learn from a training budget? Central training on pooled sites.

A researcher's probe, not a federation: pools the sites' train splits, trains the run's image
model (from ``image.init_checkpoint`` and only ``image.trainable`` when the config says so),
optionally under DP calibrated to ``--epsilon`` over this one training, samples ``--per-class``
images per class, and scores a synthetic-only classifier on the pooled real held-out splits
(ratio to the real-trained one). Minutes per setting, where a federated curve takes an hour.
``--epochs 0`` scores a checkpoint as it is (``--set image.init_checkpoint=...``), e.g. a run's
last round at several ``--guidance`` values: the sampling levers without retraining.

    python -m benchmarks.budget_probe SITES_DIR --epochs 8 --batch-size 16 [--epsilon 10]
        [--set image.init_checkpoint='"pretrained"' --set image.trainable='["class_embedding"]']
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from benchmarks.privacy_utility import (
    CLASSIFIER_SEEDS,
    RealSides,
    add_config_options,
    parse_sets,
    synthetic_image_scores,
)
from fedgen.config import load_config
from fedgen.data.check import site_folders
from fedgen.modalities import ImageModality
from fedgen.models.diffusion import contact_sheet, sample_images
from fedgen.privacy.accounting import calibrate_noise_multiplier, planned_steps
from fedgen.training import train_local


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sites", type=Path)
    add_config_options(parser)
    parser.add_argument(
        "--epochs", type=int, default=8, help="0: score the starting model (image.init_checkpoint) untrained here"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epsilon", type=float, default=math.inf, help="DP target for this training (default: no DP)")
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--guidance", type=float, default=None, help="default: the config's image.guidance")
    parser.add_argument(
        "--steps", type=int, default=None, help="sampler steps; default: the config's image.sample_steps"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs/budget-probe.png"), help="the contact sheet of the samples"
    )
    args = parser.parse_args()
    config = load_config(args.config, parse_sets(args.sets))
    image = config.image
    real = RealSides(site_folders(args.sites), CLASSIFIER_SEEDS)(config, "image")
    train = TensorDataset(*real.train)
    task = ImageModality(config, work_dir=args.out.parent)  # the image model makes no base files there
    model = task.initial_model()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.epochs:  # 0 scores the starting model (image.init_checkpoint) as it is
        delta = 1 / (10 * len(train))
        sigma = None
        if math.isfinite(args.epsilon):
            q, steps = planned_steps(
                n_records=len(train), batch_size=args.batch_size, epochs_per_round=args.epochs, rounds=1
            )
            sigma = calibrate_noise_multiplier(target_epsilon=args.epsilon, delta=delta, sample_rate=q, steps=steps)
        start = time.perf_counter()
        result = train_local(
            model,
            train,
            task.per_example_loss(),
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=image.lr,
            noise_multiplier=sigma,
            max_grad_norm=image.max_grad_norm,
            delta=delta,
            noise_multiplicity=image.noise_multiplicity,
            grad_sample_mode=image.grad_sample_mode,
            max_physical_batch_size=image.max_physical_batch_size,
            seed=0,
        )
        print(
            f"{result.steps} steps on {len(train)} images ({trainable:,} trainable parameters) in "
            f"{time.perf_counter() - start:.0f} s, loss {result.mean_loss:.4f}, ε {result.epsilon:.3g}"
        )
    model.eval()
    labels = torch.arange(len(config.data.image_classes)).repeat_interleave(args.per_class)
    images = sample_images(
        model,
        labels,
        config=image,
        steps=args.steps,
        guidance=args.guidance,
        generator=torch.Generator().manual_seed(0),
    )
    sheet = contact_sheet({name: images[labels == i][:8] for i, name in enumerate(config.data.image_classes)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    scores = synthetic_image_scores(real, (images, labels), config.data.image_classes, seeds=CLASSIFIER_SEEDS)
    print(
        f"real-trained {scores['real_accuracy']:.3f}, synthetic-trained {scores['synthetic_accuracy']:.3f} "
        f"(sd {scores['synthetic_accuracy_sd']:.3f}; {scores['classifier']}), ratio {scores['ratio']:.2f}, "
        f"FID {scores['fid']:.1f} (held-out n = {scores['n_test']}); contact sheet {args.out}"
    )


if __name__ == "__main__":
    main()
