"""Why do samples drift? The model's mean error per timestep, on the sites' held-out images.

For each timestep t: the mean error of the model's implied noise estimate (its mean over
pixels, which the MSE loss barely sees), and the mean of the implied clean image
x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) against the true mean. An epsilon model's small
constant error is multiplied by 1 / sqrt(abar) at the noisy end of the schedule; the sampler
starts there, so its first estimates of x0 are off by the whole range and the samples drift.

    python -m benchmarks.prediction_bias CHECKPOINT SITES_DIR [--set image.prediction_type='"epsilon"']
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.privacy_utility import add_config_options, parse_sets, pooled_heldout
from fedgen.config import load_config
from fedgen.data.check import site_folders
from fedgen.models.diffusion import load_image_model, make_noise_scheduler, predicted_noise

TIMESTEPS = (10, 100, 300, 500, 700, 850, 950, 990, 999)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("sites", type=Path)
    add_config_options(parser)
    parser.add_argument("--images", type=int, default=120)
    args = parser.parse_args()
    config = load_config(args.config, parse_sets(args.sets))
    unet = load_image_model(args.checkpoint).eval()
    _, (x, y) = pooled_heldout(site_folders(args.sites), config, "image")
    x, y = x[: args.images], y[: args.images]
    scheduler = make_noise_scheduler(config.image)
    generator = torch.Generator().manual_seed(0)
    print(f"{config.image.prediction_type} model; true mean of the images {x.mean():+.3f}")
    print(f"{'t':>5} {'abar':>9} {'noise MSE':>10} {'noise bias':>11} {'x0 estimate mean':>17}")
    for t in TIMESTEPS:
        if t >= config.image.train_timesteps:
            continue
        noise = torch.randn(x.shape, generator=generator)
        timesteps = torch.full((len(x),), t)
        noisy = scheduler.add_noise(x, noise, timesteps)
        with torch.no_grad():
            estimate = predicted_noise(scheduler, unet(noisy, timesteps, class_labels=y).sample, noisy, timesteps)
        alpha_bar = scheduler.alphas_cumprod[t]
        x0 = ((noisy - (1 - alpha_bar).sqrt() * estimate) / alpha_bar.sqrt()).clamp(-1, 1)
        error = estimate - noise
        print(f"{t:>5} {alpha_bar:>9.2e} {error.pow(2).mean():>10.4f} {error.mean():>+11.4f} {x0.mean():>+17.3f}")


if __name__ == "__main__":
    main()
