"""Membership-inference attacks and their success statistics.

Every attack returns one score per example, and a higher score always means "more likely a
member" (a training example). ``attack_metrics`` turns member / non-member scores into AUC and
TPR at low FPR; ``score_histogram`` + ``metrics_from_histograms`` do the same from binned
counts, so sites can return aggregates only (on bins each site chooses) and the coordinator
pools them (fedgen.audits.pooling).

Attacks:

- images (a class-conditioned diffusers ``UNet2DModel`` + ``DDPMScheduler``):
  ``image_loss_scores`` (denoising loss, fixed timesteps and noise draws) and
  ``image_pia_scores`` — PIA, Kong et al. 2024, "An Efficient Membership Inference Attack for the
  Diffusion Model by Proximal Initialization" (ICLR 2024, arXiv:2305.18355).
- text (per-token log-probabilities of the real text): loss (mean log-prob), zlib ratio
  (Carlini et al. 2021, "Extracting Training Data from Large Language Models") and Min-K% Prob
  (Shi et al. 2024, "Detecting Pretraining Data from Large Language Models").
- canaries: exposure (Carlini et al. 2019, "The Secret Sharer").
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import beta, binom, norm
from sklearn.metrics import roc_auc_score, roc_curve

from fedgen.errors import FedgenError
from fedgen.models.diffusion import predicted_noise, training_target

__all__ = [
    "AttackResult",
    "attack_metrics",
    "score_histogram",
    "metrics_from_histograms",
    "allowed_false_positives",
    "limit_tpr_bound",
    "chance_auc_bound",
    "image_loss_scores",
    "image_pia_scores",
    "loss_score",
    "zlib_score",
    "min_k_score",
    "text_attack_scores",
    "canary_exposure",
]

FPR_LEVEL_1PCT = 0.01
FPR_LEVEL_01PCT = 0.001

# Loss attack: noise levels as fractions of the scheduler's training timesteps. Membership
# signal is strongest at small-to-intermediate noise (Matsumoto et al. 2023; Carlini et al.
# 2023): at t near T every input looks like noise, at t near 0 the task is trivial.
DEFAULT_LOSS_TIMESTEP_FRACTIONS = (0.1, 0.2, 0.3)
DEFAULT_LOSS_DRAWS = 2
# PIA: the paper attacks DDPM (T=1000) at t=200 with an l4 distance.
DEFAULT_PIA_TIMESTEP_FRACTION = 0.2
DEFAULT_PIA_NORM = 4
DEFAULT_BATCH_SIZE = 64
DEFAULT_MIN_K_FRACTION = 0.2


@dataclass(frozen=True)
class AttackResult:
    """How well an attack's scores separate members from non-members.

    ``tpr_at_*_fpr`` is the best TPR among thresholds whose FPR is at most the level, or None
    when there are fewer than 1/level non-members (the level cannot be resolved: one false
    positive already exceeds it).
    """

    auc: float
    tpr_at_1pct_fpr: float | None
    tpr_at_01pct_fpr: float | None
    n_members: int
    n_nonmembers: int
    fpr: np.ndarray = field(repr=False)
    tpr: np.ndarray = field(repr=False)

    def to_dict(self, *, include_curve: bool = False) -> dict:
        out = {
            "auc": self.auc,
            "tpr_at_1pct_fpr": self.tpr_at_1pct_fpr,
            "tpr_at_01pct_fpr": self.tpr_at_01pct_fpr,
            "n_members": self.n_members,
            "n_nonmembers": self.n_nonmembers,
        }
        if include_curve:
            out["fpr"] = self.fpr.tolist()
            out["tpr"] = self.tpr.tolist()
        return out


def _check_scores(scores: np.ndarray, what: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    assert scores.ndim == 1, f"{what} scores must be 1-D, got shape {scores.shape}"
    assert np.isfinite(scores).all(), f"{what} scores contain NaN or inf"
    return scores


def _check_counts(n_members: int, n_nonmembers: int) -> None:
    if n_members == 0 or n_nonmembers == 0:
        raise FedgenError(
            f"membership attack needs members and non-members, got {n_members} members and {n_nonmembers} non-members"
        )


def allowed_false_positives(n_nonmembers: int, level: float) -> int:
    """How many non-members a threshold may accuse while its FPR stays at most ``level``."""
    return int(np.count_nonzero(np.arange(1, n_nonmembers + 1) / n_nonmembers <= level))


def _tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, level: float, n_nonmembers: int) -> float | None:
    if n_nonmembers * level < 1.0:
        return None
    return float(tpr[fpr <= level].max())


def _result_from_curve(fpr: np.ndarray, tpr: np.ndarray, auc: float, n_members: int, n_nonmembers: int) -> AttackResult:
    return AttackResult(
        auc=float(auc),
        tpr_at_1pct_fpr=_tpr_at_fpr(fpr, tpr, FPR_LEVEL_1PCT, n_nonmembers),
        tpr_at_01pct_fpr=_tpr_at_fpr(fpr, tpr, FPR_LEVEL_01PCT, n_nonmembers),
        n_members=n_members,
        n_nonmembers=n_nonmembers,
        fpr=fpr,
        tpr=tpr,
    )


def attack_metrics(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> AttackResult:
    """AUC, TPR at 1% and 0.1% FPR and the ROC curve of one attack on labelled scores."""
    member_scores = _check_scores(member_scores, "member")
    nonmember_scores = _check_scores(nonmember_scores, "non-member")
    _check_counts(len(member_scores), len(nonmember_scores))
    labels = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    scores = np.r_[member_scores, nonmember_scores]
    fpr, tpr, _ = roc_curve(labels, scores)
    auc = roc_auc_score(labels, scores)
    return _result_from_curve(fpr, tpr, auc, len(member_scores), len(nonmember_scores))


# --- what sampling noise alone reaches --------------------------------------------------------
#
# An attack figure measured on a few hundred examples is noisy. These bounds are what an attack
# within a limit stays at or below with probability ``confidence`` at given counts: for the AUC,
# an attack without any membership signal (the ranking is then a uniformly random order); for
# the TPR at a low FPR, an attack whose TPR at that FPR is exactly the limit.

# Gauss-Legendre nodes on [-1, 1] for the integral over the threshold's true FPR.
_QUADRATURE = np.polynomial.legendre.leggauss(256)


@functools.cache  # the gate asks for the same counts once per attack figure
def limit_tpr_bound(n_members: int, n_nonmembers: int, *, level: float, limit: float, confidence: float) -> float:
    """The TPR at FPR ≤ ``level`` that an attack whose true TPR at FPR ``level`` is ``limit``
    stays at or below with probability at least ``confidence``, at these counts.

    The measured figure counts the members above the (k+1)-th highest non-member score, k =
    ``allowed_false_positives``. That threshold's true FPR U is the (k+1)-th largest of
    n_nonmembers uniform draws, Beta(k+1, n_nonmembers-k): with 123 non-members (k = 1) it lies
    above 3% one time in 9, so "1% FPR" measures the attack at several times that FPR. Given U,
    the count is Binomial(n_members, ROC(U)). Any concave ROC through (level, limit) (a
    likelihood-ratio attack's is concave) has ROC(u) ≤ limit for u ≤ level and ≤ limit·u/level
    above; the count under that pointwise largest ROC bounds every such attack's. At limit =
    level it is at or just above what an attack that only guesses reaches.
    A non-concave ROC can only exceed the bound as a compliant attack: the error is then a
    refusal, never a pass.
    """
    _check_counts(n_members, n_nonmembers)
    assert 0.0 < confidence < 1.0, f"confidence {confidence} is not in (0, 1)"
    assert 0.0 < level < 1.0 and 0.0 <= limit <= 1.0, (level, limit)
    k = allowed_false_positives(n_nonmembers, level)
    if k >= n_nonmembers:  # every non-member may be accused: every member is found
        return 1.0
    if limit == 0.0:
        return 0.0
    threshold_fpr = beta(k + 1, n_nonmembers - k)
    # In quantiles of U: ROC is `limit` below q_level, limit·u/level up to q_one, then 1.
    q_level, q_one = threshold_fpr.cdf(level), threshold_fpr.cdf(min(1.0, level / limit))
    nodes, weights = _QUADRATURE
    q = q_level + (q_one - q_level) * (nodes + 1) / 2
    roc = np.minimum(1.0, limit * threshold_fpr.ppf(q) / level)
    weights = weights * (q_one - q_level) / 2

    def above(found: int) -> float:  # P(count > found)
        certain = (1.0 - q_one) * (found < n_members)
        return q_level * binom.sf(found, n_members, limit) + float(weights @ binom.sf(found, n_members, roc)) + certain

    low, high = -1, n_members  # above(n_members) = 0: find the fewest members with above() <= 1 - confidence
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if above(middle) <= 1.0 - confidence else (middle, high)
    return high / n_members


def chance_auc_bound(n_members: int, n_nonmembers: int, *, confidence: float) -> float:
    """The AUC a guessing attack stays at or below with probability ``confidence``.

    The AUC is the Mann–Whitney U statistic over n_members · n_nonmembers; for a random order
    it has mean 1/2 and variance (n_members + n_nonmembers + 1) / (12 n_members n_nonmembers)
    (no ties; ties only shrink it). Normal approximation, as in ``scipy.stats.mannwhitneyu``
    for more than a few examples per side.
    """
    _check_counts(n_members, n_nonmembers)
    assert 0.0 < confidence < 1.0, f"confidence {confidence} is not in (0, 1)"
    variance = (n_members + n_nonmembers + 1) / (12 * n_members * n_nonmembers)
    return float(0.5 + norm.ppf(confidence) * math.sqrt(variance))


def score_histogram(scores: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of ``scores`` in the bins ``[edges[i], edges[i+1])``; the last bin is closed.

    Scores below ``edges[0]`` count in the first bin and scores above ``edges[-1]`` in the last,
    so no example is dropped (clipping keeps the order, which is all a threshold attack uses).
    """
    scores = _check_scores(scores, "histogram")
    edges = np.asarray(edges, dtype=np.float64)
    assert edges.ndim == 1 and len(edges) >= 2, "edges need at least two values"
    assert np.all(np.diff(edges) > 0), "edges must be strictly increasing"
    bins = np.searchsorted(edges, scores, side="right") - 1
    bins = np.clip(bins, 0, len(edges) - 2)
    return np.bincount(bins, minlength=len(edges) - 1)


def metrics_from_histograms(member_counts: np.ndarray, nonmember_counts: np.ndarray, edges: np.ndarray) -> AttackResult:
    """``attack_metrics`` from (pooled) score histograms sharing ``edges``.

    Thresholds sit at bin edges: "member" means "score in this bin or a higher one". Examples
    in one bin are tied, so the AUC (trapezoids between thresholds) counts them as half-right,
    like the exact AUC does for tied scores; with fine bins it approaches the exact AUC.
    Counts may be expected counts (fractions: sites' bins pooled on finer edges,
    fedgen.audits.pooling); their totals are whole numbers of records.
    """
    member_counts = np.asarray(member_counts, dtype=np.float64)
    nonmember_counts = np.asarray(nonmember_counts, dtype=np.float64)
    assert member_counts.shape == nonmember_counts.shape == (len(edges) - 1,), "counts must have one entry per bin"
    n_members, n_nonmembers = round(member_counts.sum()), round(nonmember_counts.sum())
    _check_counts(n_members, n_nonmembers)
    # Highest bin first: cumulative counts above each lower edge, starting from "nobody".
    tp = np.r_[0, np.cumsum(member_counts[::-1])]
    fp = np.r_[0, np.cumsum(nonmember_counts[::-1])]
    tpr, fpr = tp / n_members, fp / n_nonmembers
    auc = np.trapezoid(tpr, fpr)
    return _result_from_curve(fpr, tpr, auc, n_members, n_nonmembers)


# --- image attacks -------------------------------------------------------------------------


def _timestep_from_fraction(scheduler, fraction: float) -> int:
    num_steps = scheduler.config.num_train_timesteps
    return min(round(fraction * num_steps), num_steps - 1)


def _check_timestep(scheduler, t: int) -> None:
    num_steps = scheduler.config.num_train_timesteps
    if not 0 <= t < num_steps:
        raise FedgenError(f"attack timestep {t} is outside the scheduler's range [0, {num_steps - 1}]")


def _predict(unet, x: torch.Tensor, t: int, labels: torch.Tensor | None) -> torch.Tensor:
    timesteps = torch.full((len(x),), t, dtype=torch.long, device=x.device)
    return unet(x, timesteps, class_labels=labels).sample


def _batched_scores(score_batch, images: torch.Tensor, labels: torch.Tensor | None, batch_size: int) -> np.ndarray:
    """Run ``score_batch(x, labels) -> (B,) tensor`` over ``images`` in batches."""
    parts = []
    for start in range(0, len(images), batch_size):
        batch_labels = None if labels is None else labels[start : start + batch_size]
        parts.append(score_batch(images[start : start + batch_size], batch_labels))
    return torch.cat(parts).double().cpu().numpy()


def _on_model_device(unet, images: torch.Tensor, labels: torch.Tensor | None):
    images = images.to(device=unet.device, dtype=unet.dtype)
    labels = None if labels is None else labels.to(device=unet.device)
    return images, labels


@torch.no_grad()
def image_loss_scores(
    unet,
    scheduler,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    timesteps: Sequence[int] | None = None,
    draws: int = DEFAULT_LOSS_DRAWS,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> np.ndarray:
    """Minus the mean denoising error of each image (loss-threshold attack).

    The error is averaged over ``timesteps`` (default: ``DEFAULT_LOSS_TIMESTEP_FRACTIONS`` of the
    scheduler's range) and ``draws`` noise tensors drawn once from ``seed``: every example sees
    the same noise, so score differences come from the example, not from the noise lottery.
    ``images`` are in the model's input range (as in training); ``labels`` are class ids.
    """
    if timesteps is None:
        timesteps = [_timestep_from_fraction(scheduler, f) for f in DEFAULT_LOSS_TIMESTEP_FRACTIONS]
    for t in timesteps:
        _check_timestep(scheduler, t)
    assert draws >= 1, "draws must be at least 1"
    unet.eval()
    images, labels = _on_model_device(unet, images, labels)
    generator = torch.Generator().manual_seed(seed)
    noises = torch.randn((draws, *images.shape[1:]), generator=generator)
    noises = noises.to(device=images.device, dtype=images.dtype)

    def score_batch(x0: torch.Tensor, batch_labels: torch.Tensor | None) -> torch.Tensor:
        errors = []
        for t in timesteps:
            t_batch = torch.full((len(x0),), t, dtype=torch.long, device=x0.device)
            for noise in noises:
                noise = noise.expand_as(x0)
                x_t = scheduler.add_noise(x0, noise, t_batch)
                target = training_target(scheduler, x0, noise, t_batch)
                error = _predict(unet, x_t, t, batch_labels) - target
                errors.append(error.pow(2).flatten(1).mean(dim=1))
        return -torch.stack(errors).mean(dim=0)

    return _batched_scores(score_batch, images, labels, batch_size)


@torch.no_grad()
def image_pia_scores(
    unet,
    scheduler,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    t: int | None = None,
    p: int = DEFAULT_PIA_NORM,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> np.ndarray:
    """PIA (Kong et al. 2024): minus ``||eps_theta(x_t, t) - eps_0||_p^p``.

    The "proximal initialisation" ``eps_0 = eps_theta(x_0, 0)`` is the model's own noise
    estimate at t = 0, used as deterministic noise to form
    ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps_0``. A member's trajectory is consistent,
    so the model recovers ``eps_0`` from ``x_t`` better. Default t is
    ``DEFAULT_PIA_TIMESTEP_FRACTION`` of the range (200 of 1000, as in the paper) and p = 4
    (the paper's l4 distance, summed |.|^p like the authors' code). A v-prediction model's
    output is turned into its implied noise estimate first.
    """
    if t is None:
        t = _timestep_from_fraction(scheduler, DEFAULT_PIA_TIMESTEP_FRACTION)
    _check_timestep(scheduler, t)
    unet.eval()
    images, labels = _on_model_device(unet, images, labels)

    def score_batch(x0: torch.Tensor, batch_labels: torch.Tensor | None) -> torch.Tensor:
        zero = torch.zeros((len(x0),), dtype=torch.long, device=x0.device)
        eps_0 = predicted_noise(scheduler, _predict(unet, x0, 0, batch_labels), x0, zero)
        t_batch = torch.full((len(x0),), t, dtype=torch.long, device=x0.device)
        x_t = scheduler.add_noise(x0, eps_0, t_batch)
        eps_t = predicted_noise(scheduler, _predict(unet, x_t, t, batch_labels), x_t, t_batch)
        distance = (eps_t - eps_0).abs().pow(p).flatten(1).sum(dim=1)
        return -distance

    return _batched_scores(score_batch, images, labels, batch_size)


# --- text attacks --------------------------------------------------------------------------


def _check_logprobs(logprobs: np.ndarray) -> np.ndarray:
    logprobs = np.asarray(logprobs, dtype=np.float64)
    assert logprobs.ndim == 1 and len(logprobs) > 0, "need a non-empty 1-D array of token log-probs"
    assert np.isfinite(logprobs).all(), "token log-probs contain NaN or inf"
    return logprobs


def loss_score(logprobs: np.ndarray) -> float:
    """Mean token log-prob (minus the loss): members have lower loss."""
    return float(_check_logprobs(logprobs).mean())


def zlib_score(logprobs: np.ndarray, text: str) -> float:
    """Carlini et al. 2021's zlib ratio, signed so higher = member: -NLL / zlib bytes.

    NLL is the mean token negative log-likelihood (log-perplexity). Dividing by the
    zlib-compressed length discounts texts that are likely only because they are repetitive.
    """
    compressed_bytes = len(zlib.compress(text.encode("utf-8")))
    return loss_score(logprobs) / compressed_bytes


def min_k_score(logprobs: np.ndarray, *, k: float = DEFAULT_MIN_K_FRACTION) -> float:
    """Min-K% Prob (Shi et al. 2024): mean of the lowest ``k`` fraction of token log-probs.

    A non-member has a few very unlikely tokens; a member has few outliers. Uses
    ``int(k * n)`` tokens like the authors' code, but at least one.
    """
    assert 0.0 < k <= 1.0, f"k must be in (0, 1], got {k}"
    logprobs = _check_logprobs(logprobs)
    n_lowest = max(1, int(k * len(logprobs)))
    return float(np.sort(logprobs)[:n_lowest].mean())


def text_attack_scores(
    token_logprobs: list[np.ndarray], texts: list[str], *, k: float = DEFAULT_MIN_K_FRACTION
) -> dict[str, np.ndarray]:
    """Scores of every text attack: ``{"loss", "zlib", "min_k"}`` -> one score per text."""
    assert len(token_logprobs) == len(texts), "one log-prob array per text"
    return {
        "loss": np.array([loss_score(lp) for lp in token_logprobs]),
        "zlib": np.array([zlib_score(lp, text) for lp, text in zip(token_logprobs, texts)]),
        "min_k": np.array([min_k_score(lp, k=k) for lp in token_logprobs]),
    }


# --- canaries ------------------------------------------------------------------------------


def canary_exposure(canary_loss: float, candidate_losses: np.ndarray) -> float:
    """Exposure (Carlini et al. 2019) = log2|R| - log2(rank of the canary).

    R is the candidates plus the canary; rank 1 means the canary has the lowest loss. A
    candidate tied with the canary ranks ahead of it (the model does not single it out), so
    ties never inflate exposure. Maximum log2|R|, about 0 for an unmemorised canary.
    """
    candidate_losses = _check_scores(candidate_losses, "candidate loss")
    assert math.isfinite(canary_loss), "canary loss must be finite"
    rank = 1 + int(np.sum(candidate_losses <= canary_loss))
    return math.log2(len(candidate_losses) + 1) - math.log2(rank)
