"""Utility of synthetic data: does a classifier trained on it work on a site's real held-out data?

The seed paper's four configurations, all scored on the same real held-out split of one site
(this runs AT the site; only the scores leave it):

- ``real``: trained on the site's real train split,
- ``composite``: real train split + all synthetic data,
- ``synthetic``: synthetic data only,
- ``smote``: the real train split with minority classes oversampled by SMOTE to the size of
  the largest class (the classical alternative to generated data).

Images use fedgen's FeatureNet CNN (``audits.features``, trained to convergence on a
validation split: the same recipe as the benchmarks') on pixels (SMOTE on flattened pixels),
and, as an independent reference, logistic regression on the pixels (real and synthetic only);
text uses TF-IDF + logistic regression (SMOTE on TF-IDF vectors). The coordinator pools sites
with ``pool_utility`` (example-weighted means).

A ratio of synthetic-trained to real-trained scores is only as good as its denominator: a
real-trained classifier near chance makes noise look useful. ``competence`` says whether the
real-trained classifier is clearly better than chance; a utility ratio is scored only if it is.

Image data are ``(images [N, C, H, W] in [-1, 1], labels [N])`` tensors; text data are
``(texts, labels)`` sequences; labels are indices into ``class_names``.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import torch
from imblearn.over_sampling import SMOTE
from scipy.stats import beta
from sklearn.dummy import DummyClassifier
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from torch import Tensor

from fedgen.audits.features import MAX_STEPS, FeatureNet, classify, train_feature_net
from fedgen.audits.fidelity import pool_weighted_mean, require_min_count
from fedgen.errors import FedgenError

__all__ = [
    "CONFIGURATIONS",
    "MIN_CLASS_SUPPORT",
    "REFERENCE_CONFIGURATIONS",
    "competence",
    "image_classifier",
    "image_utility",
    "pool_utility",
    "site_seed",
    "smote_balance",
    "text_utility",
]

CONFIGURATIONS = ("real", "composite", "synthetic", "smote")
SMOTE_K_NEIGHBORS = 5  # imbalanced-learn's default, lowered for classes too small for it
# A per-class F1 over fewer held-out records than this is close to a per-record value: left out.
MIN_CLASS_SUPPORT = 5
UTILITY_BATCH_SIZE = 64
REFERENCE_CONFIGURATIONS = ("real", "synthetic")  # what the pixel logistic regression is trained on
REFERENCE_CLASSIFIER = "LogisticRegression on raw pixels"
# "Clearly better than chance": the real-trained accuracy's one-sided lower confidence bound
# (Clopper-Pearson, COMPETENCE_CONFIDENCE) must close at least COMPETENCE_GAIN of the gap from
# the no-information rate (each site's most frequent held-out class, always guessed) to 1.
# The audit's earlier 25-step CNN reached 0.52 on the demo against a no-information rate of
# ~0.38 — significant, yet so weak that noise images scored 0.57 of it.
COMPETENCE_CONFIDENCE = 0.99
COMPETENCE_GAIN = 0.25
TEXT_NGRAM_RANGE = (1, 2)
LOGISTIC_MAX_ITER = 1000

ImageData = tuple[Tensor, Tensor]
TextData = tuple[Sequence[str], Sequence[int]]


def smote_balance(x, labels: np.ndarray, *, seed: int, k_neighbors: int = SMOTE_K_NEIGHBORS):
    """Oversample every class below the largest one up to its size with SMOTE.

    A class needs two examples to interpolate between; smaller classes are left as they
    are, and ``k_neighbors`` shrinks to fit the smallest class that is oversampled.
    """
    counts = Counter(labels.tolist())
    largest = max(counts.values())
    targets = {label: largest for label, n in counts.items() if 2 <= n < largest}
    if not targets:
        return x, labels
    k = min(k_neighbors, min(counts[label] for label in targets) - 1)
    return SMOTE(sampling_strategy=targets, k_neighbors=k, random_state=seed).fit_resample(x, labels)


def _training_sets(real_train, synthetic, concat: Callable) -> dict:
    """Configuration name -> (training data, whether to balance it with SMOTE)."""
    return {
        "real": (real_train, False),
        "composite": (concat(real_train, synthetic), False),
        "synthetic": (synthetic, False),
        "smote": (real_train, True),
    }


def _scores(true: np.ndarray, predicted: np.ndarray, *, class_names: Sequence[str], n_train: int) -> dict:
    """Accuracy, macro-F1 over the classes present in the held-out split, and per-class F1 for
    classes with at least MIN_CLASS_SUPPORT held-out records."""
    present = sorted(set(true.tolist()))
    per_class = f1_score(true, predicted, labels=present, average=None, zero_division=0)
    support = Counter(true.tolist())
    return {
        "accuracy": float(accuracy_score(true, predicted)),
        "macro_f1": float(np.mean(per_class)),
        "per_class_f1": {
            class_names[c]: float(f1) for c, f1 in zip(present, per_class) if support[c] >= MIN_CLASS_SUPPORT
        },
        "per_class_support": {class_names[c]: support[c] for c in present},
        "no_information_rate": max(support.values()) / len(true),
        "n_test": len(true),
        "n_train": n_train,
    }


def _check_inputs(real_train, real_test, synthetic, *, what: str) -> None:
    require_min_count(len(real_test[1]), what=f"{what} utility (held-out split)")
    if len(synthetic[1]) == 0:
        raise FedgenError(f"{what} utility: the synthetic set is empty")
    if len(real_train[1]) == 0:
        raise FedgenError(f"{what} utility: the site's train split is empty")


# --------------------------------------------------------------------------- images


def _concat_images(a: ImageData, b: ImageData) -> ImageData:
    return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])


def _smote_images(data: ImageData, *, seed: int) -> ImageData:
    images, labels = data
    flat, balanced = smote_balance(images.reshape(len(images), -1).numpy(), labels.numpy(), seed=seed)
    return torch.as_tensor(flat, dtype=images.dtype).reshape(-1, *images.shape[1:]), torch.as_tensor(balanced)


def image_classifier(max_steps: int = MAX_STEPS) -> str:
    """What the image utility classifier is, for reports."""
    return (
        f"fedgen FeatureNet CNN, batch {UTILITY_BATCH_SIZE}, early stopping on a validation split "
        f"of its training set (at most {max_steps} steps), seeded per site"
    )


def site_seed(seed: int, site: str) -> int:
    """The seed a site trains its classifiers with: the run's ``seed`` and the site's name.

    Every site trains its synthetic-only classifier on the same synthetic set; with one seed
    for all they would train the same net, and the pooled score would be one classifier's
    luck (one synthetic set scored 0.83-0.95 of real across seeds). A seed per site makes the
    pooled score a mean over as many independently trained classifiers as there are sites."""
    return (seed + zlib.crc32(site.encode())) % 2**31


def _reference_scores(data: ImageData, real_test: ImageData, *, class_names: Sequence[str], seed: int) -> dict:
    """The independent reference: logistic regression on flattened pixels."""
    flat = lambda images: images.reshape(len(images), -1).numpy()  # noqa: E731
    classifier = _fit_logistic(flat(data[0]), data[1].numpy(), seed=seed)
    predicted = classifier.predict(flat(real_test[0]))
    return _scores(real_test[1].numpy(), predicted, class_names=class_names, n_train=len(data[1]))


def image_utility(
    real_train: ImageData,
    real_test: ImageData,
    synthetic: ImageData,
    *,
    class_names: Sequence[str],
    seed: int = 0,
    max_steps: int = MAX_STEPS,
    configurations: Sequence[str] = CONFIGURATIONS,
    real_net: FeatureNet | None = None,
) -> dict:
    """Site-side: the four configurations (or the ``configurations`` asked for) with a
    FeatureNet classifier trained to convergence, scored on ``real_test``, and the reference
    logistic regression's ``REFERENCE_CONFIGURATIONS`` among them. ``real_net``: the site's
    FeatureNet already trained on ``real_train`` with ``train_feature_net`` (not trained again)."""
    _check_inputs(real_train, real_test, synthetic, what="image")
    if synthetic[0].shape[1:] != real_train[0].shape[1:]:
        raise FedgenError(
            f"synthetic images are {tuple(synthetic[0].shape[1:])} but the site's images are "
            f"{tuple(real_train[0].shape[1:])}"
        )
    results, reference = {}, {}
    for name, (data, smote) in _training_sets(real_train, synthetic, _concat_images).items():
        if name not in configurations:
            continue
        images, labels = data
        net = real_net if name == "real" and real_net is not None else train_feature_net(
            images, labels, num_classes=len(class_names), trained_on=f"{name} utility set", seed=seed,
            max_steps=max_steps, batch_size=UTILITY_BATCH_SIZE,
            oversample=(lambda x, y: _smote_images((x, y), seed=seed)) if smote else None,
        )  # fmt: skip
        predicted = classify(net, real_test[0])
        results[name] = _scores(
            real_test[1].numpy(), predicted.numpy(), class_names=class_names, n_train=len(labels)
        ) | {"training": net.training_record}
        if name in REFERENCE_CONFIGURATIONS:
            reference[name] = _reference_scores(data, real_test, class_names=class_names, seed=seed)
    return {
        "classifier": image_classifier(max_steps),
        "configurations": results,
        "reference": {"classifier": REFERENCE_CLASSIFIER, "configurations": reference},
    }


# --------------------------------------------------------------------------- text


def _concat_texts(a: TextData, b: TextData) -> TextData:
    return [*a[0], *b[0]], [*a[1], *b[1]]


def _fit_logistic(x, labels: np.ndarray, *, seed: int):
    """Logistic regression, or a constant predictor when the training set has one class: that is
    all such a set can teach."""
    if len(set(labels.tolist())) < 2:
        return DummyClassifier(strategy="most_frequent").fit(x, labels)
    return LogisticRegression(max_iter=LOGISTIC_MAX_ITER, random_state=seed).fit(x, labels)


def _fit_text_classifier(texts: Sequence[str], labels: np.ndarray, *, smote: bool, seed: int):
    """TF-IDF fitted on the training texts, then logistic regression."""
    vectoriser = TfidfVectorizer(ngram_range=TEXT_NGRAM_RANGE, sublinear_tf=True)
    x = vectoriser.fit_transform(texts)
    if smote:
        x, labels = smote_balance(x, labels, seed=seed)
    return vectoriser, _fit_logistic(x, labels, seed=seed), len(labels)


def text_utility(
    real_train: TextData,
    real_test: TextData,
    synthetic: TextData,
    *,
    class_names: Sequence[str],
    seed: int = 0,
) -> dict:
    """Site-side: the four configurations with TF-IDF + logistic regression, scored on ``real_test``."""
    _check_inputs(real_train, real_test, synthetic, what="text")
    true = np.asarray(real_test[1])
    results = {}
    for name, ((texts, labels), smote) in _training_sets(real_train, synthetic, _concat_texts).items():
        vectoriser, classifier, n_train = _fit_text_classifier(texts, np.asarray(labels), smote=smote, seed=seed)
        predicted = classifier.predict(vectoriser.transform(real_test[0]))
        results[name] = _scores(true, predicted, class_names=class_names, n_train=n_train)
    classifier = f"TF-IDF word {TEXT_NGRAM_RANGE[0]}-{TEXT_NGRAM_RANGE[1]}-grams + LogisticRegression"
    return {"classifier": classifier, "configurations": results}


# --------------------------------------------------------------------------- pooling


def _pool_per_class(per_site: Sequence[dict]) -> dict:
    """Each class's F1 averaged over the sites that report it, weighted by their support."""
    pooled = {}
    for name in dict.fromkeys(c for r in per_site for c in r["per_class_f1"]):
        reporting = [r for r in per_site if name in r["per_class_f1"]]
        support = sum(r["per_class_support"][name] for r in reporting)
        weighted = sum(r["per_class_f1"][name] * r["per_class_support"][name] for r in reporting)
        pooled[name] = weighted / support
    return pooled


def _pool_configurations(site_configurations: Sequence[dict]) -> dict:
    pooled = {}
    for name in site_configurations[0]:
        per_site = [c[name] for c in site_configurations]
        pooled[name] = {
            **pool_weighted_mean(per_site, keys=("accuracy", "macro_f1", "no_information_rate"), weight_key="n_test"),
            "per_class_f1": _pool_per_class(per_site),
        }
    return pooled


def pool_utility(site_results: Sequence[dict]) -> dict:
    """Coordinator: per configuration, accuracy, macro-F1 and no-information rate averaged over
    sites weighted by ``n_test`` (accuracy is then exactly the pooled accuracy; macro-F1 an
    approximation), and per-class F1 weighted by each site's support of that class; the same
    for the reference classifier when the sites ran it."""
    pooled = {
        "classifier": site_results[0]["classifier"],
        "sites": len(site_results),
        "configurations": _pool_configurations([r["configurations"] for r in site_results]),
    }
    if all("reference" in r for r in site_results):
        pooled["reference"] = {
            "classifier": site_results[0]["reference"]["classifier"],
            "configurations": _pool_configurations([r["reference"]["configurations"] for r in site_results]),
        }
    return pooled


def competence(real: dict) -> dict:
    """Is a real-trained classifier (``real``: accuracy, n_test, no_information_rate, pooled or
    one site's) clearly better than chance? See COMPETENCE_CONFIDENCE and COMPETENCE_GAIN."""
    n, rate = real["n_test"], real["no_information_rate"]
    correct = round(real["accuracy"] * n)
    lower = float(beta.ppf(1 - COMPETENCE_CONFIDENCE, correct, n - correct + 1)) if correct > 0 else 0.0
    required = rate + COMPETENCE_GAIN * (1 - rate)
    return {
        "accuracy": real["accuracy"],
        "n_test": n,
        "no_information_rate": rate,
        "accuracy_lower_bound": lower,
        "required": required,
        "competent": lower >= required,
    }
