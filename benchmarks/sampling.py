"""Sampling speed and quality: each fast sampler (few steps) vs 1000-step DDPM.

Samples the same labels from a run's final image checkpoint (its EMA, as `fedgen generate`
does) with every sampler fedgen offers at the fast step count, then with DDPM over all the
training timesteps; prints images/s and the FID of each against the simulated sites' real
held-out images (features of a FeatureNet trained on the sites' real train images: a
researcher's benchmark on demo data). The run's configured sampler is starred.

    python -m benchmarks.sampling RUN [--per-class 20] [--steps 50]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.privacy_utility import pooled_heldout
from fedgen.artifacts import RunDir
from fedgen.audits.features import extract_features, train_feature_net
from fedgen.audits.fidelity import fid_from_features
from fedgen.logs import quiet_libraries
from fedgen.modalities import ImageModality
from fedgen.models.diffusion import SAMPLERS, sample_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50, help="the fast samplers' steps")
    args = parser.parse_args()
    quiet_libraries()
    run = RunDir.open(args.run)
    config = run.config()
    unet = ImageModality(config, work_dir=run.base_models).load(run.sampling_checkpoint("image"))
    train, test = pooled_heldout(run.simulated_sites(), config, "image")
    net = train_feature_net(
        *train, num_classes=len(config.data.image_classes), trained_on="real train splits (benchmark)"
    )
    real_features = extract_features(net, test[0])
    labels = torch.arange(len(config.data.image_classes)).repeat_interleave(args.per_class)
    print(
        f"{'sampler':<10} {'steps':>5} {'images/s':>9} {'FID':>8}   (n={len(labels)}, real held-out n={len(test[0])})"
    )
    configured = (config.image.sampler, config.image.sample_steps)
    for sampler, steps in [(kind, args.steps) for kind in SAMPLERS] + [("ddpm", config.image.train_timesteps)]:
        start = time.perf_counter()
        images = sample_images(
            unet, labels, config=config.image, steps=steps, sampler=sampler, generator=torch.Generator().manual_seed(0)
        )
        rate = len(labels) / (time.perf_counter() - start)
        fid = fid_from_features(real_features, extract_features(net, images))
        star = "*" if (sampler, steps) == configured else ""
        print(f"{sampler + star:<10} {steps:>5} {rate:>9.2f} {fid:>8.2f}")


if __name__ == "__main__":
    main()
