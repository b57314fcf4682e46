"""Quality at privacy: train a simulated consortium at several ε, generate, and score utility.

For each ε the whole pipeline runs (simulated federation -> generation); a classifier trained
only on synthetic data is tested on the sites' REAL held-out data, pooled, and reported as a
ratio to the same classifier trained on the real train splits. For images, FID in the audits'
default feature space (a FeatureNet trained on the real train splits) is reported too. A
researcher's benchmark on simulated data, so it reads the held-out splits directly (the audit
does the same per site).

Levers are config overrides (``--set image.trainable='["class_embedding"]'``); ``--public N``
pretrains on N public phantoms of another population and wider scanner family (``fedgen
demo-public``; unlabelled unless ``--public-labelled``) and starts every ε from that
checkpoint. Each invocation appends its rows, under ``--label``, to ``OUT/results.jsonl`` and
redraws ``OUT/curve.png`` with every label measured so far.
``--sites-dir DIR`` runs it on your own consortium (``--config`` for its classes and sizes).

    python -m benchmarks.privacy_utility --epsilons 1 3 10 inf --label scratch
    python -m benchmarks.privacy_utility --public 4000 --label pretrained \\
        --set image.trainable='["class_embedding", "time_emb_proj"]'
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from fedgen.artifacts import RunDir  # noqa: E402
from fedgen.audits.features import MAX_STEPS, extract_features, train_feature_net  # noqa: E402
from fedgen.audits.fidelity import fid_from_features  # noqa: E402
from fedgen.audits.inputs import load_synthetic_images, load_synthetic_texts  # noqa: E402
from fedgen.audits.utility import image_classifier, image_utility, text_utility  # noqa: E402
from fedgen.config import PRETRAIN_DEFAULTS, load_config  # noqa: E402
from fedgen.data.check import (
    classes_from_sites,  # noqa: E402
    site_folders,  # noqa: E402
)
from fedgen.data.demo import make_demo_consortium, make_public_phantoms  # noqa: E402
from fedgen.data.site import image_splits, load_site, text_splits  # noqa: E402
from fedgen.files import write_text  # noqa: E402
from fedgen.generate import generate_images, generate_texts  # noqa: E402
from fedgen.logs import quiet_libraries  # noqa: E402
from fedgen.models.pretrained import ARCHITECTURE_KEYS  # noqa: E402
from fedgen.pretrain import create_run, pretrain_image_model  # noqa: E402
from fedgen.simulations.engine import check_sites, simulate  # noqa: E402


def site_image_splits(sites, config):
    """(site name, train, held-out) of every site, each split an (images, labels) pair."""
    for root in sites:
        site = load_site(root, config.data, modalities=("image",), channels=config.image.channels)
        train, test = image_splits(
            site, resolution=config.image.resolution, channels=config.image.channels, seed=config.data.split_seed
        )
        yield site.name, train.tensors, test.tensors


def pooled_heldout(sites, config, modality):
    """(train, held-out) of every site concatenated, in the shape the utility functions take."""
    if modality == "image":
        splits = list(site_image_splits(sites, config))
        join = lambda parts: (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))  # noqa: E731
        return join([train for _, train, _ in splits]), join([test for _, _, test in splits])
    trains, tests = [], []
    for root in sites:
        tr, te = text_splits(load_site(root, config.data, modalities=("text",)), seed=config.data.split_seed)
        trains.append(tr), tests.append(te)
    join = lambda parts: ([t for p in parts for t, _ in p], [y for p in parts for _, y in p])  # noqa: E731
    return join(trains), join(tests)


# One set of 960 synthetic images scored 0.67-0.91 between classifier seeds, so the mean of 3
# has an sd of ~0.04 ratio points; 10 seeds halve it.
CLASSIFIER_SEEDS = 10


def classifier_scores(
    train, test, data, class_names, *, seeds: int = CLASSIFIER_SEEDS, max_steps: int = MAX_STEPS
) -> list[dict]:
    """Scores on the real held-out ``test`` (accuracy, per-class F1, ...) of the utility CNN trained
    on ``data`` alone, one per classifier seed (one seed's synthetic score moved by up to 0.26 on
    the same images). Real and synthetic sets go through this same call, ``image_utility``'s
    synthetic-only configuration; the real ``train`` split is only checked against (``data`` must
    match its shape)."""
    return [
        image_utility(
            train, test, data, class_names=class_names, seed=seed, max_steps=max_steps, configurations=("synthetic",)
        )["configurations"]["synthetic"]
        for seed in range(seeds)
    ]


def mean_per_class_f1(scores: list[dict]) -> dict[str, float]:
    return {name: statistics.mean(s["per_class_f1"][name] for s in scores) for name in scores[0]["per_class_f1"]}


def image_scores(real: list[dict], synthetic: list[dict]) -> dict:
    """Mean real-trained and synthetic-trained accuracy over classifier seeds, their ratio, and
    each held-out class's F1 (mean over seeds): which classes the synthetic images fail to teach."""
    real_accuracy, synthetic_accuracy = ([s["accuracy"] for s in side] for side in (real, synthetic))
    return {
        "real_accuracy": statistics.mean(real_accuracy),
        "synthetic_accuracy": statistics.mean(synthetic_accuracy),
        "synthetic_accuracy_sd": statistics.pstdev(synthetic_accuracy),
        "ratio": statistics.mean(synthetic_accuracy) / statistics.mean(real_accuracy),
        "per_seed": {"real": real_accuracy, "synthetic": synthetic_accuracy},
        "per_class_f1": {"real": mean_per_class_f1(real), "synthetic": mean_per_class_f1(synthetic)},
    }


@dataclass
class RealSide:
    """The real half of every score, the same for every row on one data setting: the pooled
    splits and, for images, the real-trained classifiers' scores and the FID feature net
    with the held-out images' features."""

    train: tuple
    test: tuple
    scores: list[dict] = field(default_factory=list)
    feature_net: torch.nn.Module | None = None
    test_features: torch.Tensor | None = None


class RealSides:
    """Measures the real side once per (modality, data setting) and hands it to every row after:
    a curve's ε and a rescore's rows share it instead of retraining the same classifiers."""

    def __init__(self, sites, seeds: int):
        self.sites, self.seeds, self.measured = sites, seeds, {}

    def __call__(self, config, modality) -> RealSide:
        key = (modality, config.data.model_dump_json(), config.image.resolution, config.image.channels)
        if key not in self.measured:
            self.measured[key] = self.measure(config, modality)
        return self.measured[key]

    def measure(self, config, modality) -> RealSide:
        train, test = pooled_heldout(self.sites, config, modality)
        if modality == "text":
            return RealSide(train, test)
        classes = config.data.image_classes
        net = train_feature_net(*train, num_classes=len(classes), trained_on="pooled real train splits")
        return RealSide(
            train,
            test,
            classifier_scores(train, test, train, classes, seeds=self.seeds),
            net,
            extract_features(net, test[0]),
        )


def synthetic_image_scores(real: RealSide, synthetic, class_names, *, seeds: int) -> dict:
    """Utility ratio and FID of synthetic images against the real side."""
    scores = classifier_scores(real.train, real.test, synthetic, class_names, seeds=seeds)
    return {
        **image_scores(real.scores, scores),
        "n_test": len(real.test[1]),
        "n_synthetic": len(synthetic[1]),
        "classifier": f"{image_classifier()}, mean of {seeds} seeds",
        "fid": fid_from_features(real.test_features, extract_features(real.feature_net, synthetic[0])),
    }


def text_scores(train, test, synthetic, class_names) -> dict:
    configs = text_utility(train, test, synthetic, class_names=class_names)["configurations"]
    real, synthetic = configs["real"], configs["synthetic"]
    return {
        "real_accuracy": real["accuracy"],
        "synthetic_accuracy": synthetic["accuracy"],
        "ratio": synthetic["accuracy"] / real["accuracy"],
        "macro_f1_ratio": synthetic["macro_f1"] / real["macro_f1"],
        "n_test": real["n_test"],
    }


def score(run, real: RealSide, config, modality, args, *, regenerate: bool = True) -> dict:
    """Utility (and, for images, FID) of the run's synthetic data against ``real``;
    ``regenerate=False`` scores the synthetic data already in the run."""
    # As many synthetic records as real train records by default: the synthetic-only classifier is
    # then compared with the real-trained one at equal data (300 vs 960 images moved the ratio
    # 0.67 -> 0.77, and 200 vs 480 notes 0.83 -> 0.87, BENCHMARKS.md).
    classes = config.data.text_classes if modality == "text" else config.data.image_classes
    like_real = math.ceil(len(real.train[1]) / len(classes))
    if modality == "text":
        if regenerate:
            generate_texts(run, per_class=args.texts_per_class or like_real, seed=0)
        return text_scores(real.train, real.test, load_synthetic_texts(run, config), classes)
    if regenerate:
        generate_images(run, per_class=args.images_per_class or like_real, seed=0)
    return synthetic_image_scores(real, load_synthetic_images(run, config), classes, seeds=args.classifier_seeds)


def scoring(args) -> str:
    """How a row was scored; rows scored otherwise are not comparable (``--rescore`` fixes that)."""
    return f"utility classifier early stopping, at most {MAX_STEPS} steps, mean of {args.classifier_seeds} seeds"


def one_epsilon(epsilon: float, sites, reals: RealSides, overrides: dict, args) -> dict:
    overrides = {**overrides, "modality": args.modality, "privacy.epsilon": epsilon, "federation.sites": len(sites)}
    config = load_config(args.config, overrides)
    if args.sites_dir is not None:  # your own consortium: its classes unless the config lists them
        config = classes_from_sites(config, sites)
    check_sites(config, sites)
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", args.label).strip("-")
    run = create_run(args.out / "runs", config, f"{slug}-eps-{epsilon:g}-{int(time.time())}")
    started = time.perf_counter()
    simulate(run, sites)
    row = {
        "label": args.label,
        "epsilon": epsilon,
        "train_seconds": time.perf_counter() - started,
        "run": str(run.root),
        "scoring": scoring(args),
    }
    for modality in config.modalities:
        row[modality] = score(run, reals(config, modality), config, modality, args)
    return row


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` and repeatable ``--set KEY=VALUE`` (read with ``parse_sets``)."""
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override (TOML value); repeatable",
    )


def parse_sets(pairs: list[str]) -> dict:
    """``key=value`` pairs, each value read as TOML (numbers, booleans, strings, lists)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set wants key=value, got {pair!r}")
        overrides[key.strip()] = tomllib.loads(f"v = {value}")["v"]
    return overrides


def pretrained_checkpoint(args, overrides: dict) -> Path:
    """Pretrain once per (public set, epochs, EMA decay, model shape) on public phantoms; reuse after."""
    kind = "labelled" if args.public_labelled else "unlabelled"
    public = args.out / f"public-{args.public}-{kind}"
    if not public.is_dir():
        make_public_phantoms(public, images=args.public, labelled=args.public_labelled, progress=True)
    shape = {
        k: v for k, v in overrides.items() if k.removeprefix("image.") in ARCHITECTURE_KEYS
    }  # overriding one needs its own pretraining
    spell = lambda v: "x".join(map(str, v)) if isinstance(v, list) else str(v)  # noqa: E731
    suffix = "".join(f"-{k.removeprefix('image.')}-{spell(v)}" for k, v in sorted(shape.items()))
    ema = f"-ema{args.pretrain_ema_decay:g}" if args.pretrain_ema_decay else ""
    balanced = "-balanced" if args.pretrain_balanced else ""
    checkpoint = args.out / re.sub(
        r"[^A-Za-z0-9._-]+", "", f"pretrained-{args.public}-{kind}-e{args.pretrain_epochs}{ema}{balanced}{suffix}"
    )
    if not checkpoint.is_dir():
        settings = {
            **PRETRAIN_DEFAULTS["image"],
            "epochs": args.pretrain_epochs,
            "ema_decay": args.pretrain_ema_decay,
            "balance_classes": args.pretrain_balanced,
        }
        pretrain_image_model(public, checkpoint, load_config(args.config, shape), **settings, progress=True)
    return checkpoint


def plot(rows: list[dict], path: Path) -> None:
    """Image ratio against ε, one line per label; ε = inf drawn at the right edge."""
    finite = sorted({r["epsilon"] for r in rows if math.isfinite(r["epsilon"])}) or [1.0]
    inf_x = max(finite) * 3
    figure, axis = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(r["label"] for r in rows):
        points = sorted(
            (r["epsilon"] if math.isfinite(r["epsilon"]) else inf_x, r["image"]["ratio"])
            for r in rows
            if r["label"] == label and "image" in r
        )
        if points:
            axis.plot(*zip(*points), marker="o", label=label)
    axis.set_xscale("log")
    ticks = finite + [inf_x]
    axis.set_xticks(ticks, [f"{t:g}" for t in finite] + ["∞"])
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set_xlabel("ε per site")
    axis.set_ylabel("synthetic-trained / real-trained accuracy")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def read_rows(results: Path) -> list[dict]:
    return [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()]


def rescore(results: Path, reals: RealSides, args) -> list[dict]:
    """Score every row scored otherwise again (its run's synthetic data as they are) and rewrite
    ``results``: one scoring for every row. Rows whose run is gone are left out."""
    if not results.is_file():
        raise SystemExit(f"--rescore: no {results} to rescore")
    rows, earlier = [], read_rows(results)
    for row in earlier:
        if row.get("scoring") == scoring(args):
            rows.append(row)
            continue
        run = RunDir(row["run"])
        if not run.root.is_dir():
            print(f"left out (run gone): {row['label']} ε {row['epsilon']:g} {row['run']}")
            continue
        config = run.config()
        scores = {m: score(run, reals(config, m), config, m, args, regenerate=False) for m in config.modalities}
        rows.append({**row, **scores, "scoring": scoring(args)})
    rows += read_rows(results)[len(earlier) :]  # appended meanwhile by a running benchmark
    write_text(results, "".join(json.dumps(row, default=str) + "\n" for row in rows))
    plot(rows, args.out / "curve.png")
    return rows


def weakest_class(scores: dict) -> str:
    """The held-out class the synthetic-trained classifier scores worst on (F1), if measured."""
    f1 = scores.get("per_class_f1", {}).get("synthetic")
    if not f1:
        return ""
    name = min(f1, key=f1.get)
    return f"{name} {f1[name]:.2f}"


def print_table(rows: list[dict]) -> None:
    print(
        f"{'label':>20} {'ε':>6} {'modality':>8} {'real acc':>9} {'synth acc':>10} {'ratio':>6} {'F1 ratio':>8} {'FID':>7} {'n test':>7} {'train s':>8}  weakest class (synthetic F1)"
    )
    for row in rows:
        for modality in ("image", "text"):
            if modality in row:
                m = row[modality]
                fid = f"{m['fid']:>7.1f}" if "fid" in m else f"{'':>7}"
                f1_ratio = f"{m['macro_f1_ratio']:>8.2f}" if "macro_f1_ratio" in m else f"{'':>8}"
                print(
                    f"{row['label']:>20} {row['epsilon']:>6g} {modality:>8} {m['real_accuracy']:>9.3f} {m['synthetic_accuracy']:>10.3f} {m['ratio']:>6.2f} {f1_ratio} {fid} {m['n_test']:>7} {row['train_seconds']:>8.0f}  {weakest_class(m)}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 3.0, 10.0, math.inf])
    parser.add_argument("--modality", default="image", choices=["image", "text", "both"])
    add_config_options(parser)
    parser.add_argument("--label", default="default", help="the name of this configuration in results and plot")
    parser.add_argument(
        "--public", type=int, default=0, help="pretrain on this many public phantoms first (0 = no pretraining)"
    )
    parser.add_argument(
        "--public-labelled", action="store_true", help="the public phantoms carry their grades (a public graded set)"
    )
    parser.add_argument(
        "--pretrain-epochs", type=int, default=PRETRAIN_DEFAULTS["image"]["epochs"], help="default: fedgen pretrain's"
    )
    parser.add_argument(
        "--pretrain-ema-decay",
        type=float,
        default=PRETRAIN_DEFAULTS["image"]["ema_decay"],
        help="pretrain's ema_decay (0: the last step's weights); default: fedgen pretrain's",
    )
    parser.add_argument(
        "--pretrain-balanced",
        action="store_true",
        help="pretrain drawing every grade equally often (fedgen pretrain --balance-classes)",
    )
    parser.add_argument(
        "--sites-dir",
        type=Path,
        default=None,
        help="your consortium's site folders (default: demo sites made in OUT/sites)",
    )
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--images-per-site", type=int, default=400)
    parser.add_argument(
        "--images-per-class", type=int, default=0, help="0 (default): as many synthetic images as real train images"
    )
    parser.add_argument(
        "--texts-per-class", type=int, default=0, help="0 (default): as many synthetic notes as real train notes"
    )
    parser.add_argument(
        "--classifier-seeds", type=int, default=CLASSIFIER_SEEDS, help="utility classifiers per score, averaged"
    )
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="score the runs already in OUT/results.jsonl again with the current scoring (their synthetic images as they are), rewrite it and the plot",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench-privacy-utility"))
    args = parser.parse_args()
    quiet_libraries()
    overrides = parse_sets(args.sets)
    if args.sites_dir is not None and not args.sites_dir.is_dir():
        raise SystemExit(f"--sites-dir {args.sites_dir} is not a folder of site folders")
    sites_root = args.sites_dir or args.out / "sites"
    if not sites_root.is_dir():
        make_demo_consortium(sites_root, sites=args.sites, seed=0, images_per_site=args.images_per_site)
        for site in site_folders(sites_root):  # the benchmark's own sites allow its no-DP baseline
            with (site / "site.toml").open("a", encoding="utf-8") as toml:
                toml.write("require_dp = false\n")
    sites = site_folders(sites_root)
    if args.public:
        overrides["image.init_checkpoint"] = str(pretrained_checkpoint(args, overrides).resolve())
    results = args.out / "results.jsonl"
    reals = RealSides(sites, args.classifier_seeds)
    if args.rescore:
        rows = rescore(results, reals, args)
    else:
        rows = []
        for eps in args.epsilons:  # each row is kept as soon as it is measured: an ε takes minutes
            rows.append(one_epsilon(eps, sites, reals, overrides, args))
            with results.open("a", encoding="utf-8") as f:
                f.write(json.dumps({**rows[-1], "overrides": overrides}, default=str) + "\n")
            plot(read_rows(results), args.out / "curve.png")
    print_table(rows)
    print(f"results: {results}  plot: {args.out / 'curve.png'}")


if __name__ == "__main__":
    main()
