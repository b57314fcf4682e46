"""Fidelity of synthetic data, measured where the real data lives.

The coordinator never holds real records. Every measure is therefore split in two:

- a **site-side** function that sees the site's real data (and the synthetic data or its
  features, sent by the coordinator) and returns a small aggregate — counts, sums, means,
  a covariance-sized matrix, scalars — never a record, a per-example value or an image;
- a **coordinator-side** function that pools the sites' aggregates into the final figure.

| measure | site-side | coordinator pooling | pooled figure is |
|---|---|---|---|
| image FID, KID, PRDC per class | ``class_fidelity`` | ``pool_class_fidelity`` + ``mean_over_classes`` (by n_real) | mean of the sites' figures, then of the classes' |
| SSIM / PSNR | ``nearest_real_similarity`` | ``pool_weighted_mean`` (by n) | mean of site means (nearest real per site, not in the union) |
| near copies | ``near_copy_count`` | ``pool_near_copies`` (sums) | flags summed over sites, and the most chance gives |
| text embedding | ``text_embedding_stats`` | ``pool_sums`` + ``text_fidelity`` | exact |
| text length / vocab | ``text_class_stats`` | ``pool_text_class_stats`` + ``summarise_text_class_stats`` | exact, except distinct words |

The image figures are computed in each site's own feature space (fedgen.clients.image_audit:
a FeatureNet trained on the site's real train split, which knows the site's classes), so a
site's FID is not added up with another's statistics: each site scores, the coordinator averages.
``real_feature_stats`` / ``pool_sums`` give an exact pooled Fréchet distance where every site
embeds alike (the text embedding).

Images are float tensors ``[N, C, H, W]`` in ``[-1, 1]``; features are ``[N, D]``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import betabinom
from sklearn.feature_extraction.text import HashingVectorizer
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.kid import KernelInceptionDistance

from fedgen.audits.features import FeatureExtractor, extract_features
from fedgen.errors import FedgenError

__all__ = [
    "MIN_AGGREGATE_COUNT",
    "NOT_MEASURABLE",
    "TEXT_EMBEDDING_DESCRIPTION",
    "not_measurable",
    "require_min_count",
    "real_feature_stats",
    "synthetic_feature_stats",
    "pool_sums",
    "gaussian_from_stats",
    "frechet_distance",
    "fid_from_stats",
    "fid_from_features",
    "kid_at_site",
    "prdc",
    "PRDC_KEYS",
    "CLASS_FIGURES",
    "class_fidelity",
    "pool_class_fidelity",
    "mean_over_classes",
    "pool_weighted_mean",
    "nearest_distances",
    "nearest_real_similarity",
    "near_copy_count",
    "NEAR_COPY_ANSWER",
    "near_copy_chance_count",
    "pool_near_copies",
    "embed_texts",
    "text_embedding_stats",
    "text_fidelity",
    "text_class_stats",
    "pool_text_class_stats",
    "summarise_text_class_stats",
]

# No aggregate leaves a site unless it summarises at least this many real records. With one or
# two records, (n, Σx, Σxxᵀ) give the vectors themselves back; twenty leaves a wide margin.
# This is a floor against trivially invertible aggregates, not a differential-privacy guarantee.
MIN_AGGREGATE_COUNT = 20
NOT_MEASURABLE = "not_measurable"  # the key of a site's answer that holds why it has no figures

IMAGE_RANGE = (-1.0, 1.0)
# Eigenvalues of a covariance below this fraction of its largest are round-off of zero (the
# covariance of fewer records than feature dimensions is singular).
EIGENVALUE_FLOOR = 1e-12
PSNR_CAP_DB = 100.0  # identical images have infinite PSNR; the cap keeps means finite
DISTANCE_CHUNK = 1024  # rows of a distance matrix held at once: memory O(chunk x N)
PRDC_K = 5  # Naeem et al. 2020 use k = 5
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000  # torchmetrics' default; shrunk to the smaller set when needed
NEAR_COPY_QUANTILE = 0.01
# Chance count of near copies: what a generator whose images are as far from the training images
# as unseen real images are stays at or below with this probability.
NEAR_COPY_CONFIDENCE = 0.99
# What of a site's near-copy count leaves it: not the threshold, a distance between two of its images.
NEAR_COPY_ANSWER = ("count", "rank", "n_heldout")

# Text embedding: hashed character n-grams, l2-normalised, no IDF — a fixed function of the text
# alone, so sites and coordinator embed alike without sharing a vocabulary or IDF weights fitted
# on private text. The Fréchet distance runs on a fixed seeded Gaussian projection.
TEXT_HASH_FEATURES = 2**12
TEXT_NGRAM_RANGE = (3, 5)
TEXT_PROJECTION_DIM = 64
TEXT_PROJECTION_SEED = 0
TEXT_EMBEDDING_DESCRIPTION = (
    f"hashed character {TEXT_NGRAM_RANGE[0]}-{TEXT_NGRAM_RANGE[1]}-grams (char_wb, "
    f"{TEXT_HASH_FEATURES} buckets, l2 norm, no IDF); Fréchet distance on a seeded Gaussian "
    f"projection to {TEXT_PROJECTION_DIM} dims"
)
WORD_PATTERN = re.compile(r"\w+")


def not_measurable(n: int, records: str) -> dict:
    """What a site answers in place of figures it may not compute over ``n`` real records (fewer
    than MIN_AGGREGATE_COUNT): the count and why, as ``class_fidelity`` answers counts only for
    a class too small to measure. ``records`` names them ("held-out records")."""
    return {"n": n, NOT_MEASURABLE: f"not measurable at this site: {n} {records}, needs {MIN_AGGREGATE_COUNT}"}


def require_min_count(n: int, *, what: str) -> None:
    """Refuse to build an aggregate over fewer than MIN_AGGREGATE_COUNT real records."""
    if n < MIN_AGGREGATE_COUNT:
        raise FedgenError(
            f"{what}: {n} records, but an aggregate may only leave a site over at least {MIN_AGGREGATE_COUNT}"
        )


# --------------------------------------------------------------------------- Fréchet distance


def synthetic_feature_stats(features: Tensor | np.ndarray) -> dict:
    """``{"n", "sum", "sum_outer"}`` (numpy float64) of feature vectors; any count."""
    x = np.asarray(features, dtype=np.float64)
    return {"n": len(x), "sum": x.sum(axis=0), "sum_outer": x.T @ x}


def real_feature_stats(features: Tensor | np.ndarray) -> dict:
    """Site-side ``synthetic_feature_stats`` of real features, over at least MIN_AGGREGATE_COUNT
    records. Sites' statistics pool by summing (``pool_sums``)."""
    require_min_count(len(features), what="feature statistics")
    return synthetic_feature_stats(features)


def pool_sums(site_stats: Sequence[dict]) -> dict:
    """Coordinator: add up every entry of the sites' sum statistics (``real_feature_stats``,
    ``text_embedding_stats``) — the statistics of the union of their records."""
    return {key: sum(s[key] for s in site_stats) for key in site_stats[0]}


def gaussian_from_stats(stats: dict) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance from ``real_feature_stats`` / ``synthetic_feature_stats``."""
    n = stats["n"]
    if n < 2:
        raise FedgenError(f"a Fréchet distance needs at least 2 feature vectors on each side, got {n}")
    mu = np.asarray(stats["sum"], dtype=np.float64) / n
    sigma = (np.asarray(stats["sum_outer"], dtype=np.float64) - n * np.outer(mu, mu)) / (n - 1)
    return mu, sigma


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((Σ1 Σ2)^½), the sum of √λ over the eigenvalues λ of Σ1^½ Σ2 Σ1^½ (the same spectrum).

    With Σ1 = U Λ Uᵀ and B = U Λ^½ restricted to Λ's non-zero eigenvalues, Σ1^½ Σ2 Σ1^½ has the
    non-zero eigenvalues of the small symmetric matrix Bᵀ Σ2 B: one eigendecomposition of Σ1
    and one of rank(Σ1) ≤ its record count, stable for singular covariances and much faster
    than ``scipy.linalg.sqrtm`` of Σ1 Σ2 on 2048-d Inception features. Round-off below zero
    is clipped.
    """
    values, vectors = np.linalg.eigh(sigma1)
    kept = values > EIGENVALUE_FLOOR * max(values[-1], 0.0)
    b = vectors[:, kept] * np.sqrt(values[kept])
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(b.T @ sigma2 @ b), 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||μ1 − μ2||² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), the FID formula (Heusel et al. 2017)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * _trace_sqrt_product(sigma1, sigma2))


def fid_from_stats(real_stats: dict, fake_stats: dict) -> float:
    return frechet_distance(*gaussian_from_stats(real_stats), *gaussian_from_stats(fake_stats))


def fid_from_features(real: Tensor, fake: Tensor) -> float:
    """FID straight from two feature matrices (one place, no sites)."""
    return fid_from_stats(synthetic_feature_stats(real), synthetic_feature_stats(fake))


class _GivenFeatures(nn.Module):
    """Lets torchmetrics' FID/KID take feature vectors: the "extractor" returns its input."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


# --------------------------------------------------------------------------- KID


def kid_at_site(
    real_features: Tensor,
    fake_features: Tensor,
    *,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> dict:
    """Site-side KID (torchmetrics, cubic polynomial kernel) between the site's real features
    and the synthetic features the coordinator sent. KID needs sample features on both sides,
    so only the scalar leaves the site. ``subset_size`` shrinks to the smaller set.
    """
    require_min_count(len(real_features), what="KID")
    size = min(subset_size, len(real_features), len(fake_features))
    with warnings.catch_warnings():  # it warns that it keeps the features: we handed them over whole
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        metric = KernelInceptionDistance(
            feature=_GivenFeatures(real_features.shape[1]), subsets=subsets, subset_size=size
        )
    metric.update(real_features.double(), real=True)
    metric.update(fake_features.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # torchmetrics draws its subsets from the global RNG
        kid_mean, kid_std = metric.compute()
    return {
        "kid_mean": float(kid_mean),
        "kid_std": float(kid_std),
        "n_real": len(real_features),
        "n_fake": len(fake_features),
    }


# --------------------------------------------------------------------------- distances


def _nearest(query: Tensor, reference: Tensor, *, chunk: int = DISTANCE_CHUNK) -> tuple[Tensor, Tensor]:
    """L2 distance from each query row to its nearest reference row, and that row's index."""
    q = query.reshape(len(query), -1).double()
    r = reference.reshape(len(reference), -1).double()
    distances, indices = [], []
    for start in range(0, len(q), chunk):
        d, i = torch.cdist(q[start : start + chunk], r).min(dim=1)
        distances.append(d)
        indices.append(i)
    return torch.cat(distances), torch.cat(indices)


def nearest_distances(query: Tensor, reference: Tensor, *, chunk: int = DISTANCE_CHUNK) -> Tensor:
    """L2 distance (on flattened rows) from each query item to its nearest reference item."""
    return _nearest(query, reference, chunk=chunk)[0]


def _kth_neighbour_radii(x: Tensor, k: int, *, chunk: int) -> Tensor:
    """Distance from each row of ``x`` to its k-th nearest other row (itself excluded)."""
    radii = []
    for start in range(0, len(x), chunk):
        d = torch.cdist(x[start : start + chunk], x)
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


# --------------------------------------------------------------------------- PRDC


def prdc(real_features: Tensor, fake_features: Tensor, *, k: int = PRDC_K, chunk: int = DISTANCE_CHUNK) -> dict:
    """Site-side precision, recall, density and coverage (Naeem et al. 2020), strict ``<`` as
    in their reference code; distances in chunks of ``chunk`` rows.

    Pooling across sites (``pool_weighted_mean`` by ``n_real``): recall is exact when every
    site scores the same synthetic set (the synthetic k-NN radii do not depend on real data).
    Precision, density and coverage use each site's own real k-NN radii, which are wider than
    those of the pooled real set would be: their pooled value approximates the PRDC of the
    union of the sites' records.
    """
    require_min_count(len(real_features), what="PRDC")
    if min(len(real_features), len(fake_features)) <= k:
        raise FedgenError(f"PRDC with k={k} needs more than {k} real and synthetic feature vectors")
    real, fake = real_features.double(), fake_features.double()
    real_radii = _kth_neighbour_radii(real, k, chunk=chunk)
    fake_radii = _kth_neighbour_radii(fake, k, chunk=chunk)

    fake_in_real_balls = torch.zeros(len(fake), dtype=torch.long)  # per fake: real balls holding it
    for start in range(0, len(fake), chunk):
        d = torch.cdist(fake[start : start + chunk], real)
        fake_in_real_balls[start : start + chunk] = (d < real_radii[None, :]).sum(dim=1)

    real_in_fake_manifold = torch.zeros(len(real), dtype=torch.bool)
    real_ball_has_fake = torch.zeros(len(real), dtype=torch.bool)
    for start in range(0, len(real), chunk):
        d = torch.cdist(real[start : start + chunk], fake)
        real_in_fake_manifold[start : start + chunk] = (d < fake_radii[None, :]).any(dim=1)
        real_ball_has_fake[start : start + chunk] = d.min(dim=1).values < real_radii[start : start + chunk]

    return {
        "precision": float((fake_in_real_balls > 0).double().mean()),
        "recall": float(real_in_fake_manifold.double().mean()),
        "density": float(fake_in_real_balls.double().mean() / k),
        "coverage": float(real_ball_has_fake.double().mean()),
        "n_real": len(real),
        "n_fake": len(fake),
    }


PRDC_KEYS = ("precision", "recall", "density", "coverage")


CLASS_FIGURES = ("fid", "kid", *PRDC_KEYS)  # what class_fidelity measures per class


def class_fidelity(
    real_features: Tensor,
    real_labels: Tensor,
    fake_features: Tensor,
    fake_labels: Tensor,
    *,
    class_names: Sequence[str],
    seed: int = 0,
    k: int = PRDC_K,
) -> dict:
    """Site-side, per class: FID, KID and ``prdc`` of the synthetic features labelled with it
    against the site's real features of it. ``{class: {"fid", "kid", "precision", ...,
    "n_real", "n_fake"}}``; a class with fewer than MIN_AGGREGATE_COUNT real records, or at
    most ``k`` of either, reports only ``n_real`` and ``n_fake``.

    Class-conditional on purpose: a synthetic image of the wrong class is no sample of the
    class it claims, however real it looks, so a set with shuffled labels scores worse than
    the same images with theirs (which no figure over all classes at once can see).
    """
    result = {}
    for index, name in enumerate(class_names):
        real, fake = real_features[real_labels == index], fake_features[fake_labels == index]
        counts = {"n_real": len(real), "n_fake": len(fake)}
        if len(real) < MIN_AGGREGATE_COUNT or min(len(real), len(fake)) <= k:
            result[name] = counts
            continue
        result[name] = {
            "fid": fid_from_features(real, fake),
            "kid": kid_at_site(real, fake, seed=seed)["kid_mean"],
            **{key: value for key, value in prdc(real, fake, k=k).items() if key in PRDC_KEYS},
            **counts,
        }
    return result


def pool_class_fidelity(site_results: Sequence[dict]) -> dict:
    """Coordinator: per class, the ``class_fidelity`` figures averaged over the sites that
    measured it, weighted by ``n_real`` (synthetic counts are the same at every site); a class
    no site measured keeps only the summed ``n_real``."""
    pooled = {}
    for name in dict.fromkeys(c for r in site_results for c in r):
        measured = [r[name] for r in site_results if "fid" in r.get(name, {})]
        if measured:
            pooled[name] = pool_weighted_mean(measured, keys=CLASS_FIGURES, weight_key="n_real") | {
                "n_fake": measured[0]["n_fake"]
            }
        else:
            pooled[name] = {"n_real": sum(r[name]["n_real"] for r in site_results if name in r)}
    return pooled


def mean_over_classes(per_class: dict) -> dict:
    """The ``class_fidelity`` figures averaged over the measured classes, weighted by ``n_real``,
    with ``n_real`` and ``n_fake`` summed over them and the measured classes named; figures
    None (with a note) when no class could be measured."""
    measured = {name: c for name, c in per_class.items() if "fid" in c}
    if not measured:
        note = f"no class has {MIN_AGGREGATE_COUNT} real images at a site and more than {PRDC_K} synthetic ones"
        return {**dict.fromkeys(CLASS_FIGURES), "n_real": 0, "n_fake": 0, "classes_measured": [], "note": note}
    mean = pool_weighted_mean(list(measured.values()), keys=CLASS_FIGURES, weight_key="n_real")
    return mean | {"n_fake": sum(c["n_fake"] for c in measured.values()), "classes_measured": list(measured)}


def pool_weighted_mean(site_aggregates: Sequence[dict], *, keys: Sequence[str], weight_key: str) -> dict:
    """Coordinator: each key's mean over sites weighted by ``weight_key``; the weights summed."""
    total = sum(a[weight_key] for a in site_aggregates)
    if total == 0:
        raise FedgenError(f"nothing to pool: every site reported {weight_key} = 0")
    pooled = {key: sum(a[key] * a[weight_key] for a in site_aggregates) / total for key in keys}
    return {**pooled, weight_key: total}


# --------------------------------------------------------------------------- SSIM / PSNR


def nearest_real_similarity(
    synthetic: Tensor,
    synthetic_labels: Tensor,
    real: Tensor,
    real_labels: Tensor,
    *,
    chunk: int = DISTANCE_CHUNK,
) -> dict:
    """Site-side SSIM and PSNR as the seed paper reports them: each synthetic image against
    its nearest (pixel L2) real image of the same class, averaged over synthetic images.

    Synthetic images of a class the site has no real image of are not scored; ``n`` counts
    the scored ones. PSNR is capped at PSNR_CAP_DB (identical images are infinite).
    """
    require_min_count(len(real), what="SSIM/PSNR")
    ssim_values, psnr_values = [], []
    for label in synthetic_labels.unique():
        fake = synthetic[synthetic_labels == label]
        same_class = real[real_labels == label]
        if len(same_class) == 0:
            continue
        nearest = same_class[_nearest(fake, same_class, chunk=chunk)[1]]
        ssim_values.append(structural_similarity_index_measure(fake, nearest, data_range=IMAGE_RANGE, reduction="none"))
        psnr = peak_signal_noise_ratio(fake, nearest, data_range=IMAGE_RANGE, reduction="none", dim=(1, 2, 3))
        psnr_values.append(psnr.clamp(max=PSNR_CAP_DB))
    if not ssim_values:
        return {"ssim_mean": math.nan, "psnr_mean": math.nan, "n": 0}
    return {
        "ssim_mean": float(torch.cat(ssim_values).mean()),
        "psnr_mean": float(torch.cat(psnr_values).mean()),
        "n": sum(len(v) for v in ssim_values),
    }


# --------------------------------------------------------------------------- memorisation


def _count_below(synthetic: Tensor, train: Tensor, heldout: Tensor, *, quantile: float) -> dict:
    """Synthetic items nearer to a training item than the ``rank``-th nearest held-out item is."""
    heldout_distances = nearest_distances(heldout, train).sort().values
    rank = max(1, math.floor(quantile * len(heldout_distances)))
    threshold = heldout_distances[rank - 1]
    count = int((nearest_distances(synthetic, train) < threshold).sum())
    return {"count": count, "threshold": float(threshold), "rank": rank, "n_heldout": len(heldout_distances)}


def near_copy_count(
    synthetic: Tensor,
    train: Tensor,
    heldout: Tensor,
    *,
    quantile: float = NEAR_COPY_QUANTILE,
    extractor: FeatureExtractor | None = None,
) -> dict:
    """Site-side: how many synthetic images are closer to a training image than held-out
    images usually are.

    The threshold is the ``rank``-th smallest held-out-to-nearest-training distance, rank =
    ``quantile`` of the held-out count (at least the smallest): a real image the model never
    saw is that close to a training image only that rarely. A synthetic image below it is
    flagged as a near copy. Counted in pixel space and, given an extractor, in its feature
    space. Of each, ``NEAR_COPY_ANSWER`` leaves the site: the count and what
    ``near_copy_chance_count`` needs.
    """
    require_min_count(len(train), what="near-copy check (train split)")
    require_min_count(len(heldout), what="near-copy check (held-out split)")
    result = {
        "pixel": _count_below(synthetic, train, heldout, quantile=quantile),
        "n_synthetic": len(synthetic),
        "n_train": len(train),
        "quantile": quantile,
    }
    if extractor is not None:
        result["feature"] = _count_below(
            extract_features(extractor, synthetic),
            extract_features(extractor, train),
            extract_features(extractor, heldout),
            quantile=quantile,
        )
        result["feature_extractor"] = extractor.description
    return result


def near_copy_chance_count(sites: Sequence[tuple[int, int, int]], *, confidence: float = NEAR_COPY_CONFIDENCE) -> int:
    """The most near copies, summed over sites of (n_synthetic, rank, n_heldout), that a generator
    which copies nothing shows with probability ``confidence``.

    Flagging is calibrated on real images: if the synthetic images are as far from the training
    images as unseen real ones are, a held-out threshold at the ``rank``-th smallest of
    ``n_heldout`` distances is passed by each synthetic image with probability U ~ Beta(rank,
    n_heldout - rank + 1), so a site's count is BetaBinomial(n_synthetic, rank, n_heldout - rank
    + 1). With ~60 held-out images the threshold is their nearest, and a perfect generator has
    one image in 60 flagged: "no flag at all" would refuse it most of the time. Sites are
    independent: their distributions are convolved.
    """
    pmf = np.ones(1)
    for n_synthetic, rank, n_heldout in sites:
        site = betabinom.pmf(np.arange(n_synthetic + 1), n_synthetic, rank, n_heldout - rank + 1)
        pmf = np.convolve(pmf, site)
    return int(np.searchsorted(np.cumsum(pmf), confidence - 1e-12))


def pool_near_copies(site_results: Sequence[dict]) -> dict:
    """Coordinator: near-copy flags summed over sites (an image flagged at two sites counts twice),
    and per measure the most that chance gives at those counts (``near_copy_chance_count``)."""
    pooled = {}
    measures = ["pixel", "feature"] if all("feature" in r for r in site_results) else ["pixel"]
    for measure in measures:
        pooled[f"{measure}_count"] = sum(r[measure]["count"] for r in site_results)
        pooled[f"{measure}_chance_count"] = near_copy_chance_count(
            [(r["n_synthetic"], r[measure]["rank"], r[measure]["n_heldout"]) for r in site_results]
        )
    return pooled


# --------------------------------------------------------------------------- text


def embed_texts(texts: Sequence[str]) -> np.ndarray:
    """Data-independent embedding ``[N, TEXT_HASH_FEATURES]`` (see TEXT_EMBEDDING_DESCRIPTION)."""
    vectoriser = HashingVectorizer(
        analyzer="char_wb",
        ngram_range=TEXT_NGRAM_RANGE,
        n_features=TEXT_HASH_FEATURES,
        norm="l2",
        alternate_sign=False,
    )
    return vectoriser.transform(list(texts)).toarray()


def _text_projection() -> np.ndarray:
    rng = np.random.default_rng(TEXT_PROJECTION_SEED)
    return rng.standard_normal((TEXT_HASH_FEATURES, TEXT_PROJECTION_DIM)) / math.sqrt(TEXT_PROJECTION_DIM)


def text_embedding_stats(texts: Sequence[str], *, real: bool = True) -> dict:
    """Site-side: ``{"n", "sum", "sum_outer", "embedding_sum"}`` — feature statistics of the
    projected embeddings (for the Fréchet distance) and the sum of the full embeddings (for
    the mean-embedding distance). Pooled with ``pool_sums``.
    """
    embeddings = embed_texts(texts)
    projected = embeddings @ _text_projection()
    stats = real_feature_stats(projected) if real else synthetic_feature_stats(projected)
    return {**stats, "embedding_sum": embeddings.sum(axis=0)}


def text_fidelity(real_stats: dict, synthetic_stats: dict) -> dict:
    """Coordinator: MMD with a linear kernel (= ||μ_real − μ_syn|| in the hashed space) and the
    Fréchet distance of the projected embeddings."""
    real_mean = np.asarray(real_stats["embedding_sum"]) / real_stats["n"]
    synthetic_mean = np.asarray(synthetic_stats["embedding_sum"]) / synthetic_stats["n"]
    return {
        "mean_embedding_distance": float(np.linalg.norm(real_mean - synthetic_mean)),
        "frechet_distance": fid_from_stats(real_stats, synthetic_stats),
        "embedding": TEXT_EMBEDDING_DESCRIPTION,
    }


def text_class_stats(
    texts: Sequence[str], labels: Sequence[int], *, class_names: Sequence[str], real: bool = True
) -> dict:
    """Per-class length and vocabulary sums: ``{class: {"n", "chars_sum", "chars_sumsq",
    "words_sum", "words_sumsq", "ttr_sum", "distinct_words"}}``.

    ``ttr_sum`` sums each text's type-token ratio (an empty text counts 0; pools exactly);
    ``distinct_words`` is the class vocabulary size (cannot be pooled exactly without the
    words). With ``real=True`` a class with fewer than MIN_AGGREGATE_COUNT texts reports only
    its ``n``.
    """
    stats = {}
    for index, name in enumerate(class_names):
        members = [t for t, label in zip(texts, labels) if label == index]
        if real and len(members) < MIN_AGGREGATE_COUNT:
            stats[name] = {"n": len(members)}
            continue
        words = [WORD_PATTERN.findall(t.lower()) for t in members]
        chars = np.array([len(t) for t in members], dtype=np.float64)
        counts = np.array([len(w) for w in words], dtype=np.float64)
        stats[name] = {
            "n": len(members),
            "chars_sum": float(chars.sum()),
            "chars_sumsq": float((chars**2).sum()),
            "words_sum": float(counts.sum()),
            "words_sumsq": float((counts**2).sum()),
            "ttr_sum": float(sum(len(set(w)) / len(w) for w in words if w)),
            "distinct_words": len({word for w in words for word in w}),
        }
    return stats


_ADDITIVE_TEXT_STATS = ("n", "chars_sum", "chars_sumsq", "words_sum", "words_sumsq", "ttr_sum")


def pool_text_class_stats(site_stats: Sequence[dict]) -> dict:
    """Coordinator: sums pool exactly; ``distinct_words`` pools as the largest site vocabulary,
    a lower bound of the consortium's. Classes suppressed at a site add only their ``n``."""
    pooled = {}
    for name in site_stats[0]:
        reported = [s[name] for s in site_stats if "chars_sum" in s[name]]
        entry = {"n": sum(s[name]["n"] for s in site_stats), "n_summarised": sum(r["n"] for r in reported)}
        if reported:
            entry |= {key: sum(r[key] for r in reported) for key in _ADDITIVE_TEXT_STATS[1:]}
            entry["distinct_words"] = max(r["distinct_words"] for r in reported)
        pooled[name] = entry
    return pooled


def _mean_std(total: float, total_sq: float, n: int) -> tuple[float, float]:
    mean = total / n
    return mean, math.sqrt(max(total_sq / n - mean**2, 0.0))


def summarise_text_class_stats(stats: dict) -> dict:
    """Sums to figures: per class n, chars/words mean and std, mean type-token ratio, distinct words.

    Accepts ``text_class_stats`` output (synthetic, at the coordinator) or ``pool_text_class_stats``.
    """
    summary = {}
    for name, s in stats.items():
        n = s.get("n_summarised", s["n"])
        if "chars_sum" not in s or n == 0:
            summary[name] = {"n": s["n"]}
            continue
        chars_mean, chars_std = _mean_std(s["chars_sum"], s["chars_sumsq"], n)
        words_mean, words_std = _mean_std(s["words_sum"], s["words_sumsq"], n)
        summary[name] = {
            "n": s["n"],
            "chars_mean": chars_mean,
            "chars_std": chars_std,
            "words_mean": words_mean,
            "words_std": words_std,
            "type_token_ratio": s["ttr_sum"] / n,
            "distinct_words": s["distinct_words"],
        }
    return summary
