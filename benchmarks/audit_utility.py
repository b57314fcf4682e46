"""Does the audit's utility check judge like an independent classifier? Stand-in synthetic sets
of known quality, scored by the audit's site-side utility and by a plain logistic regression.

For a consortium (``SITES_DIR``, its classes from the config or the site folders), each stand-in
"synthetic" set is built from the sites' pooled real train images: a copy, the copy blurred,
the copy with half its labels redrawn at random, and uniform noise with the copy's labels. Each
is scored as the audit scores it (``image_utility`` at every site, pooled; the ratio refused when
the real-trained classifier is not clearly better than chance; the gate's utility checks) and by
an independent logistic regression on pixels trained on the whole stand-in set and tested on the
pooled real held-out images, as a ratio to the same model trained on the pooled real train
images. The benchmark's own classifier (``privacy_utility.classifier_scores`` on the pooled
splits) gives the real-trained accuracy the audit's per-site classifiers are compared with.

    python -m benchmarks.audit_utility SITES_DIR [--config C] [--seeds 3]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from benchmarks.privacy_utility import classifier_scores, pooled_heldout, site_image_splits
from fedgen.audits.features import train_feature_net
from fedgen.audits.gate import _utility_checks, load_policy
from fedgen.audits.pooling import _utility
from fedgen.audits.utility import image_utility, site_seed
from fedgen.config import load_config
from fedgen.data.check import classes_from_sites, site_folders


def stand_ins(images: torch.Tensor, labels: torch.Tensor, classes: int) -> dict:
    g = torch.Generator().manual_seed(0)
    blurred = torch.nn.functional.avg_pool2d(
        torch.nn.functional.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1
    )
    redrawn = torch.where(
        torch.rand(len(labels), generator=g) < 0.5, torch.randint(0, classes, labels.shape, generator=g), labels
    )
    return {
        "copy of real train images": (images, labels),
        "the copy blurred (3x3 box)": (blurred, labels),
        "the copy, half its labels redrawn": (images, redrawn),
        "uniform noise": (torch.rand(images.shape, generator=g) * 2 - 1, labels),
    }


def logistic_macro_f1(train, test, seed: int = 0) -> float:
    flat = lambda x: x.reshape(len(x), -1).numpy()  # noqa: E731
    model = LogisticRegression(max_iter=1000, random_state=seed).fit(flat(train[0]), train[1].numpy())
    return float(f1_score(test[1].numpy(), model.predict(flat(test[0])), average="macro"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sites", type=Path)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the benchmark's classifier")
    args = parser.parse_args()
    sites = site_folders(args.sites)
    config = classes_from_sites(load_config(args.config, {"modality": "image", "federation.sites": len(sites)}), sites)
    classes = config.data.image_classes
    splits = []
    for name, train, test in site_image_splits(sites, config):
        net = train_feature_net(
            *train, num_classes=len(classes), trained_on=f"{name} real train split", seed=site_seed(config.seed, name)
        )
        splits.append((name, train, test, net))  # the real-trained classifier, once per site
    train, test = pooled_heldout(sites, config, "image")
    bench = [s["accuracy"] for s in classifier_scores(train, test, train, classes, seeds=args.seeds)]
    print(f"{len(sites)} sites, {len(train[1])} train / {len(test[1])} held-out images, {len(classes)} classes")
    print(
        f"benchmark classifier, real-trained accuracy (pooled, mean of {args.seeds} seeds): {statistics.mean(bench):.3f}"
    )
    real_f1 = logistic_macro_f1(train, test)
    policy = load_policy().utility
    for name, synthetic in stand_ins(*train, len(classes)).items():
        answers = [
            {"site": site, "utility": image_utility(tr, te, synthetic, class_names=classes, real_net=net,
                                                    seed=site_seed(config.seed, site), configurations=("real", "synthetic"))}
            for site, tr, te, net in splits
        ]  # fmt: skip
        pooled = _utility(answers)
        checks = _utility_checks({"utility": {"image": pooled}}, "image", policy)
        independent = logistic_macro_f1(synthetic, test) / real_f1
        ratio = pooled["synthetic_to_real_ratio"]
        print(
            f"{name:>36}: audit real-trained acc {pooled['configs']['real']['accuracy']:.3f}, ratio "
            f"{'refused' if ratio is None else f'{ratio:.2f}'}, reference ratio "
            f"{pooled['reference']['synthetic_to_real_ratio'] or float('nan'):.2f}; independent LR ratio {independent:.2f}; "
            f"gate utility {'PASSED' if all(c['passed'] for c in checks) else 'refused'}",
            flush=True,
        )


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
