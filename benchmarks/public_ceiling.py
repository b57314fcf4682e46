"""How far does the public set itself carry? Its REAL records scored as if they were synthetic.

A model pretrained on public data and fine-tuned at the sites draws what it learned mostly from
the public set. This scores a class-balanced sample of the labelled public records exactly as
``benchmarks.privacy_utility`` scores a run's synthetic ones: a utility classifier trained on
them alone, tested on the sites' pooled real held-out records (ratio to the real-trained one),
and for images FID in the same feature space. Synthetic data well below this ratio loses to
the public domain; above it, the sites' fine-tuning taught the model something the public set
lacks.

    python -m benchmarks.public_ceiling PUBLIC_DIR SITES_DIR [--per-class 192] [--run RUN ...]
    python -m benchmarks.public_ceiling PUBLIC_NOTES_DIR SITES_DIR --modality text [--per-class 20] [--run RUN ...]

Text: public notes (a folder with texts.jsonl, as ``fedgen demo-public --notes``) against the
sites' notes, TF-IDF + logistic regression as the audit scores notes, macro-F1 ratio; the
default 20 a class is what ``fedgen generate --per-class 20`` writes, averaged over draws.
``--run`` scores a run's synthetic images or notes beside them the same way.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from benchmarks.privacy_utility import CLASSIFIER_SEEDS, RealSides, pooled_heldout, synthetic_image_scores
from fedgen.artifacts import RunDir
from fedgen.audits.inputs import load_synthetic_images, load_synthetic_texts
from fedgen.audits.utility import text_utility
from fedgen.config import load_config
from fedgen.data.check import site_folders
from fedgen.data.site import load_images, load_site
from fedgen.pretrain import read_public_images


def balanced_sample(labels: torch.Tensor, per_class: int, *, seed: int = 0) -> torch.Tensor:
    """Up to ``per_class`` indices of each class, drawn without replacement."""
    generator = torch.Generator().manual_seed(seed)
    picks = []
    for c in labels.unique():
        members = torch.nonzero(labels == c).flatten()
        picks.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(picks)


TEXT_DRAWS = 10  # public samples scored: at 20 notes a class one draw's ratio varies by ~0.05


def _macro_f1s(real: tuple, sample: tuple, names: list[str]) -> tuple[float, float]:
    """Macro-F1 on the real held-out notes of TF-IDF + LR trained on ``sample`` and on the real
    train notes (``real`` is the sites' pooled (train, held-out) notes)."""
    scores = text_utility(*real, sample, class_names=names)["configurations"]
    return scores["synthetic"]["macro_f1"], scores["real"]["macro_f1"]


def text_ceiling(public: Path, real: tuple, config, per_class: int) -> str:
    """The macro-F1 ratio of ``per_class`` public notes a class, mean and sd over draws."""
    names = config.data.text_classes
    notes = load_site(public, config.data, modalities=("text",))
    labels = torch.tensor(notes.text_labels)
    ratios = []
    for draw in range(TEXT_DRAWS):
        picked = balanced_sample(labels, per_class, seed=draw).tolist()
        sample = ([notes.texts[i] for i in picked], [notes.text_labels[i] for i in picked])
        sample_f1, real_f1 = _macro_f1s(real, sample, names)
        ratios.append(sample_f1 / real_f1)
    return (
        f"{per_class} public notes a class (of {len(notes.texts)}): macro-F1 ratio {statistics.mean(ratios):.3f} "
        f"(sd {statistics.stdev(ratios):.3f} over {TEXT_DRAWS} draws; real-trained macro-F1 "
        f"{real_f1:.3f}, held-out n = {len(real[1][0])})"
    )


def synthetic_notes_score(run_dir: Path, real: tuple, config) -> str:
    """The macro-F1 ratio of a run's synthetic notes, scored as ``text_ceiling`` scores public ones."""
    run = RunDir(run_dir)
    run_config = run.config()
    texts, labels = load_synthetic_texts(run, run_config)
    names = config.data.text_classes  # the run may order the classes otherwise (sorted site labels)
    labels = [names.index(run_config.data.text_classes[label]) for label in labels]
    synthetic_f1, real_f1 = _macro_f1s(real, (texts, labels), names)
    return f"{run.root.name}: {len(texts)} synthetic notes: macro-F1 ratio {synthetic_f1 / real_f1:.3f} (one draw)"


def synthetic_images_score(run_dir: Path, real, config, seeds: int) -> str:
    """The utility ratio and FID of a run's synthetic images, scored as the public ones."""
    synthetic = load_synthetic_images(RunDir(run_dir), config)
    scores = synthetic_image_scores(real, synthetic, config.data.image_classes, seeds=seeds)
    return f"{run_dir.name}: {len(synthetic[1])} synthetic images: {_image_line(scores)}"


def _image_line(scores: dict) -> str:
    return (
        f"real-trained {scores['real_accuracy']:.3f}, trained on these {scores['synthetic_accuracy']:.3f} "
        f"(sd {scores['synthetic_accuracy_sd']:.3f}; {scores['classifier']}), ratio {scores['ratio']:.2f}, "
        f"FID {scores['fid']:.1f} (held-out n = {scores['n_test']})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "public", type=Path, help="a labelled public ImageFolder (fedgen demo-public --labelled), or notes folder"
    )
    parser.add_argument("sites", type=Path)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--modality", choices=("image", "text"), default="image")
    parser.add_argument(
        "--per-class",
        type=int,
        default=None,
        help="public records per class (default: images 192, the benchmark's synthetic count; notes 20)",
    )
    parser.add_argument(
        "--run",
        type=Path,
        action="append",
        default=[],
        help="also score this run's synthetic images or notes (repeatable)",
    )
    parser.add_argument(
        "--classifier-seeds", type=int, default=CLASSIFIER_SEEDS, help="images: utility CNNs averaged per score"
    )
    args = parser.parse_args()
    config = load_config(args.config)
    if args.modality == "text":
        real = pooled_heldout(site_folders(args.sites), config, "text")  # read once for every score
        print(text_ceiling(args.public, real, config, args.per_class or 20))
        for run in args.run:
            print(synthetic_notes_score(run, real, config))
        return
    args.per_class = args.per_class or 192
    classes = config.data.image_classes
    public = read_public_images(args.public, classes)
    if public.labels is None:
        raise SystemExit(f"{args.public} is unlabelled: this scores a labelled public set")
    labels = torch.tensor(public.labels)
    picked = balanced_sample(labels, args.per_class)
    pixels = load_images(
        [public.paths[i] for i in picked], resolution=config.image.resolution, channels=config.image.channels
    )
    real = RealSides(site_folders(args.sites), args.classifier_seeds)(config, "image")
    scores = synthetic_image_scores(real, (pixels, labels[picked]), classes, seeds=args.classifier_seeds)
    print(f"{len(picked)} public images: {_image_line(scores)}")
    for run in args.run:
        print(synthetic_images_score(run, real, config, args.classifier_seeds))


if __name__ == "__main__":
    main()
