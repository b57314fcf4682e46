"""Has the utility classifier converged? Its accuracy against its largest step budget, over seeds.

The synthetic-only / real-trained ratio is only as good as the two classifiers behind it: this
trains both (``privacy_utility.classifier_scores``, the benchmarks' and the audit's one
classifier, early stopping on a validation split) with several step limits and seeds on a run's
synthetic images and the sites' pooled real data, and prints each accuracy on the pooled real
held-out images. A limit the early stopping never reaches changes nothing.

    python -m benchmarks.utility_convergence RUN SITES_DIR --steps 50 150 400 1200
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks.privacy_utility import CLASSIFIER_SEEDS, classifier_scores, image_scores, pooled_heldout
from fedgen.artifacts import RunDir
from fedgen.audits.inputs import load_synthetic_images
from fedgen.data.check import site_folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("sites", type=Path)
    parser.add_argument("--steps", nargs="+", type=int, default=[50, 150, 400, 1200])
    parser.add_argument("--seeds", type=int, default=CLASSIFIER_SEEDS)
    args = parser.parse_args()
    run = RunDir(args.run)
    config = run.config()
    train, test = pooled_heldout(site_folders(args.sites), config, "image")
    synthetic = load_synthetic_images(run, config)
    print(f"real train {len(train[1])}, synthetic {len(synthetic[1])}, real held-out {len(test[1])}")
    for steps in args.steps:

        def classify(data, steps=steps):
            return classifier_scores(train, test, data, config.data.image_classes, seeds=args.seeds, max_steps=steps)

        scores = image_scores(classify(train), classify(synthetic))
        cells = [
            f"{name} {' '.join(f'{a:.3f}' for a in values)} (mean {statistics.mean(values):.3f})"
            for name, values in scores["per_seed"].items()
        ]
        print(f"{steps:>5} steps  {'  '.join(cells)}  ratio {scores['ratio']:.2f}", flush=True)


if __name__ == "__main__":
    main()
