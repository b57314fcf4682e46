"""Quality at privacy: train the demo consortium at several ε, generate, and score utility.

For each ε the whole pipeline runs (simulated federation -> generation); a classifier trained
only on synthetic data is tested on the sites' REAL held-out data, pooled, and reported as a
ratio to the same classifier trained on the real train splits. A researcher's benchmark on
simulated data, so it reads the held-out splits directly (the audit does the same per site).

    python -m benchmarks.privacy_utility --epsilons 1 10 inf [--modality both] [--out bench]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from audits.runner import load_synthetic_images, load_synthetic_texts
from audits.utility import image_utility, text_utility
from fedgen.artifacts import RunDir
from fedgen.config import load_config
from fedgen.data.demo import make_demo_consortium
from fedgen.data.site import image_splits, load_site, text_splits
from fedgen.generate import generate_images, generate_texts
from fedgen.logs import quiet_libraries
from simulations.runner import check_sites, simulate


def pooled_heldout(sites, config, modality):
    """(train, held-out) of every site concatenated, in the shape the utility functions take."""
    trains, tests = [], []
    for root in sites:
        site = load_site(root, config.data, modalities=(modality,), channels=config.image.channels)
        if modality == "image":
            tr, te = image_splits(site, resolution=config.image.resolution, channels=config.image.channels, seed=config.data.split_seed)
            trains.append(tr.tensors), tests.append(te.tensors)
        else:
            tr, te = text_splits(site, seed=config.data.split_seed)
            trains.append(tr), tests.append(te)
    if modality == "image":
        join = lambda parts: (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))  # noqa: E731
    else:
        join = lambda parts: ([t for p in parts for t, _ in p], [y for p in parts for _, y in p])  # noqa: E731
    return join(trains), join(tests)


def one_epsilon(epsilon: float, sites, args) -> dict:
    overrides = {"modality": args.modality, "privacy.epsilon": epsilon, "federation.rounds": args.rounds, "federation.sites": len(sites)}
    config = load_config(args.config, overrides)
    check_sites(config, sites)
    run = RunDir.create(args.out / "runs", config, f"eps-{epsilon:g}-{int(time.time())}")
    started = time.perf_counter()
    simulate(run, sites)
    row = {"epsilon": epsilon, "train_seconds": time.perf_counter() - started, "run": str(run.root)}
    for modality in config.modalities:
        train, test = pooled_heldout(sites, config, modality)
        if modality == "image":
            generate_images(run, per_class=args.images_per_class, seed=0)
            synthetic = load_synthetic_images(run, config)
            result = image_utility(train, test, synthetic, class_names=config.data.image_classes, epochs=args.classifier_epochs)
        else:
            generate_texts(run, per_class=args.texts_per_class, seed=0)
            synthetic = load_synthetic_texts(run, config)
            result = text_utility(train, test, synthetic, class_names=config.data.text_classes)
        configs = result["configurations"]
        row[modality] = {
            "real_accuracy": configs["real"]["accuracy"],
            "synthetic_accuracy": configs["synthetic"]["accuracy"],
            "ratio": configs["synthetic"]["accuracy"] / configs["real"]["accuracy"],
            "n_test": configs["real"]["n_test"],
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 10.0, math.inf])
    parser.add_argument("--modality", default="both", choices=["image", "text", "both"])
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--images-per-class", type=int, default=60)
    parser.add_argument("--texts-per-class", type=int, default=40)
    parser.add_argument("--classifier-epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-privacy-utility"))
    args = parser.parse_args()
    quiet_libraries()
    sites_root = args.out / "sites"
    sites = sorted(p for p in sites_root.iterdir() if p.is_dir()) if sites_root.is_dir() else make_demo_consortium(sites_root, sites=args.sites, seed=0)
    rows = [one_epsilon(eps, sites, args) for eps in args.epsilons]
    (args.out / "results.json").write_text(json.dumps(rows, indent=2, default=str))
    print(f"{'ε':>6} {'modality':>8} {'real acc':>9} {'synth acc':>10} {'ratio':>6} {'n test':>7} {'train s':>8}")
    for row in rows:
        for modality in ("image", "text"):
            if modality in row:
                m = row[modality]
                print(f"{row['epsilon']:>6g} {modality:>8} {m['real_accuracy']:>9.3f} {m['synthetic_accuracy']:>10.3f} {m['ratio']:>6.2f} {m['n_test']:>7} {row['train_seconds']:>8.0f}")


if __name__ == "__main__":
    main()
