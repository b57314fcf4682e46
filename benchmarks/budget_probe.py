"""How many optimizer steps does the image model need? Central training on pooled demo sites.

A researcher's probe, not a federation: pools the sites' train splits, trains the default
UNet (optionally under DP with a given σ), samples 6 images per class to a contact sheet.
    python -m benchmarks.budget_probe SITES_DIR --epochs 8 --batch-size 16 [--sigma 1.0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset

from fedgen.config import RunConfig
from fedgen.data.site import image_splits, load_site
from fedgen.modalities import ImageModality
from fedgen.models.diffusion import contact_sheet, sample_images
from fedgen.privacy.dp import train_local


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sites", type=Path)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sigma", type=float, default=None, help="DP noise multiplier (default: no DP)")
    parser.add_argument("--out", type=Path, default=Path("budget-probe.png"))
    args = parser.parse_args()
    config = RunConfig()
    sites = sorted(p for p in args.sites.iterdir() if p.is_dir() and not p.name.startswith("."))
    data = ConcatDataset([
        image_splits(load_site(s, config.data, modalities=("image",), channels=1), resolution=32, channels=1, seed=0)[0]
        for s in sites
    ])
    task = ImageModality(config, work_dir=Path(tempfile.mkdtemp()))
    model = task.build_model()
    start = time.perf_counter()
    result = train_local(model, data, task.per_example_loss(), epochs=args.epochs, batch_size=args.batch_size,
                         lr=config.image.lr, noise_multiplier=args.sigma, max_grad_norm=1.0, delta=1e-5)
    print(f"{result.steps} steps on {len(data)} images in {time.perf_counter() - start:.0f} s, "
          f"loss {result.mean_loss:.4f}, ε {result.epsilon:.3g}")
    labels = torch.arange(len(config.data.image_classes)).repeat_interleave(6)
    images = sample_images(model, labels, config=config.image, steps=25, generator=torch.Generator().manual_seed(0))
    sheet = contact_sheet({name: images[labels == i] for i, name in enumerate(config.data.image_classes)})
    sheet.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
