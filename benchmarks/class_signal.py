"""Does an image checkpoint use its class label? Held-out denoising loss by label.

On the sites' pooled held-out images, the same noise and timesteps scored with the true
label, the null class and a wrong label, and the model used as a diffusion classifier (the
label with the lowest loss). A model that ignores its label has the three losses equal and
classifies at chance — then no sampler or guidance scale can make class-faithful samples.

    python -m benchmarks.class_signal RUN/checkpoints/round-003/image SITES_DIR [--draws 8]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.privacy_utility import pooled_heldout
from fedgen.config import load_config
from fedgen.data.check import site_folders
from fedgen.models.diffusion import denoising_loss, load_image_model, make_noise_scheduler, null_class


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("sites", type=Path)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--draws", type=int, default=8, help="noise/timestep draws per image")
    args = parser.parse_args()
    config = load_config(args.config)
    image = config.image
    unet = load_image_model(args.checkpoint).eval()
    _, (x, y) = pooled_heldout(site_folders(args.sites), config, "image")
    scheduler = make_noise_scheduler(image)
    generator = torch.Generator().manual_seed(0)
    timesteps = torch.randint(0, image.train_timesteps, (args.draws, len(x)), generator=generator)
    noise = torch.randn((args.draws, *x.shape), generator=generator)

    @torch.no_grad()
    def loss(labels: torch.Tensor) -> torch.Tensor:
        return torch.stack([
            denoising_loss(unet, scheduler, x, labels, timesteps=timesteps[d], noise=noise[d]) for d in range(args.draws)
        ]).mean(0)  # fmt: skip

    classes = len(config.data.image_classes)
    wrong = (y + torch.randint(1, classes, y.shape, generator=generator)) % classes
    by_label = torch.stack(
        [loss(torch.full_like(y, c)) for c in range(classes)], dim=1
    )  # each example's loss is its own
    accuracy = (by_label.argmin(dim=1) == y).float().mean()
    true, wrong = (by_label.gather(1, labels[:, None]).mean() for labels in (y, wrong))
    print(
        f"held-out denoising loss: true label {true:.4f}, null {loss(torch.full_like(y, null_class(unet))).mean():.4f}, "
        f"wrong label {wrong:.4f}; diffusion-classifier accuracy {accuracy:.3f} "
        f"(n = {len(y)}, chance {1 / classes:.2f})"
    )


if __name__ == "__main__":
    main()
