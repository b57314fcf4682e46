import math
import zlib

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from scipy.stats import norm

from fedgen.audits.mia import (
    attack_metrics,
    canary_exposure,
    image_loss_scores,
    image_pia_scores,
    loss_score,
    metrics_from_histograms,
    min_k_score,
    score_histogram,
    text_attack_scores,
    zlib_score,
)
from fedgen.errors import FedgenError

# --- statistics ----------------------------------------------------------------------------


def test_attack_metrics_on_constructed_scores():
    nonmembers = np.arange(100.0)  # 0 .. 99
    # 30 members above every non-member, one between non-members 98 and 99, 69 below all.
    members = np.r_[1000.0 + np.arange(30), 98.5, np.full(69, -1.0)]
    result = attack_metrics(members, nonmembers)
    assert result.auc == pytest.approx((30 + 0.99) / 100)
    # FPR 1% (non-member 99 above the threshold) is allowed and catches the 31st member.
    assert result.tpr_at_1pct_fpr == pytest.approx(0.31)
    # 100 non-members cannot resolve 0.1% FPR.
    assert result.tpr_at_01pct_fpr is None
    assert (result.n_members, result.n_nonmembers) == (100, 100)


def test_tpr_at_low_fpr_needs_enough_nonmembers():
    rng = np.random.default_rng(0)
    few = attack_metrics(rng.normal(1, 1, 50), rng.normal(0, 1, 99))
    assert few.tpr_at_1pct_fpr is None and few.tpr_at_01pct_fpr is None
    enough = attack_metrics(np.full(10, 5.0), np.r_[np.zeros(999), 6.0])
    # One non-member (0.1%) beats every member: TPR 0 at FPR 0, TPR 1 at FPR 0.1%.
    assert enough.tpr_at_01pct_fpr == 1.0
    assert enough.to_dict() == {
        "auc": pytest.approx(0.999),
        "tpr_at_1pct_fpr": 1.0,
        "tpr_at_01pct_fpr": 1.0,
        "n_members": 10,
        "n_nonmembers": 1000,
    }
    curve = enough.to_dict(include_curve=True)
    assert curve["fpr"][0] == 0.0 and curve["tpr"][-1] == 1.0


def test_random_membership_labels_give_chance_auc():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=4000)
    is_member = rng.permutation(4000) < 2000
    result = attack_metrics(scores[is_member], scores[~is_member])
    # Null distribution of the Mann-Whitney AUC: sd = sqrt((n1 + n2 + 1) / (12 n1 n2)).
    sd = math.sqrt((2000 + 2000 + 1) / (12 * 2000 * 2000))
    assert abs(result.auc - 0.5) < 4 * sd


def test_shifted_gaussians_give_the_theoretical_auc():
    rng = np.random.default_rng(2)
    result = attack_metrics(rng.normal(1.0, 1.0, 3000), rng.normal(0.0, 1.0, 3000))
    assert result.auc == pytest.approx(norm.cdf(1.0 / math.sqrt(2.0)), abs=0.03)  # 0.760


def test_no_nonmembers_is_a_user_error():
    with pytest.raises(FedgenError, match="0 non-members"):
        attack_metrics(np.ones(3), np.array([]))


def test_score_histogram_keeps_out_of_range_scores_in_the_end_bins():
    scores = np.array([-100.0, -1.0, 0.0, 0.5, 1.0, 100.0])
    counts = score_histogram(scores, np.array([-1.0, 0.0, 1.0]))
    assert counts.tolist() == [2, 4]


def test_pooled_site_histograms_match_the_exact_metrics():
    rng = np.random.default_rng(3)
    edges = np.linspace(-6.0, 6.0, 2001)
    sites = [(rng.normal(0.7, 1.0, n), rng.normal(0.0, 1.0, n)) for n in (800, 1500)]
    member_counts = sum(score_histogram(members, edges) for members, _ in sites)
    nonmember_counts = sum(score_histogram(nonmembers, edges) for _, nonmembers in sites)
    pooled = metrics_from_histograms(member_counts, nonmember_counts, edges)
    exact = attack_metrics(np.concatenate([m for m, _ in sites]), np.concatenate([n for _, n in sites]))
    assert (pooled.n_members, pooled.n_nonmembers) == (2300, 2300)
    assert pooled.auc == pytest.approx(exact.auc, abs=1e-3)
    assert pooled.tpr_at_1pct_fpr == pytest.approx(exact.tpr_at_1pct_fpr, abs=0.01)


def test_one_bin_histogram_is_a_coin_flip():
    result = metrics_from_histograms(np.array([7]), np.array([3]), np.array([0.0, 1.0]))
    assert result.auc == 0.5


# --- text attacks --------------------------------------------------------------------------


def test_text_scores_on_constructed_logprobs():
    logprobs = -np.arange(1.0, 11.0)  # -1 .. -10
    assert loss_score(logprobs) == pytest.approx(-5.5)
    assert min_k_score(logprobs, k=0.2) == pytest.approx(-9.5)  # lowest 2 of 10
    assert min_k_score(logprobs[:3], k=0.2) == pytest.approx(-3.0)  # at least one token
    text = "patient reports low mood and poor sleep"
    assert zlib_score(logprobs, text) == pytest.approx(-5.5 / len(zlib.compress(text.encode())))


def test_min_k_separates_what_the_mean_cannot():
    member = np.full(10, -1.0)
    nonmember = np.r_[np.full(9, -0.1), -9.1]  # same mean, one very unlikely token
    assert loss_score(member) == pytest.approx(loss_score(nonmember))
    assert min_k_score(member) > min_k_score(nonmember)


def test_zlib_discounts_repetitive_text():
    logprobs = np.full(8, -0.5)
    varied = "Seen 3/4 for CBT; sleep 5h, appetite fair."
    assert zlib_score(logprobs, "the " * 40) < zlib_score(logprobs, varied)


def test_every_text_attack_ranks_higher_logprob_texts_as_members():
    rng = np.random.default_rng(4)
    texts = [f"note {i}: follow-up in {i % 7} weeks, mood stable" for i in range(40)]
    members = [rng.normal(-1.0, 0.5, 30) for _ in range(20)]
    nonmembers = [rng.normal(-3.0, 0.5, 30) for _ in range(20)]
    scores = text_attack_scores(members + nonmembers, texts)
    assert set(scores) == {"loss", "zlib", "min_k"}
    for name, values in scores.items():
        assert attack_metrics(values[:20], values[20:]).auc == 1.0, name


# --- canaries ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("canary_loss", "expected"),
    [(0.5, 10.0), (3.5, 8.0), (3.0, 8.0), (2000.0, 0.0)],
)
def test_canary_exposure_for_constructed_ranks(canary_loss, expected):
    candidates = np.arange(1.0, 1024.0)  # 1023 candidates + the canary: |R| = 1024
    # rank 1 -> log2 1024 = 10; rank 4 (three lower, or tied, candidates) -> 10 - 2.
    assert canary_exposure(canary_loss, candidates) == pytest.approx(expected)


# --- image attacks -------------------------------------------------------------------------

IMAGE_SHAPE = (1, 8, 8)
N_IMAGES = 16
TRAIN_STEPS = 300


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Two torch threads on a shared 2-core machine ran the training ~10x slower (measured)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _tiny_unet() -> UNet2DModel:
    return UNet2DModel(
        sample_size=IMAGE_SHAPE[1],
        in_channels=IMAGE_SHAPE[0],
        out_channels=IMAGE_SHAPE[0],
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=2,
    )


@pytest.fixture(scope="module")
def memorising_model():
    """A UNet trained without DP on 16 random-noise images until it memorises them."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    members = torch.randn((N_IMAGES, *IMAGE_SHAPE), generator=generator).clamp(-1, 1)
    nonmembers = torch.randn((N_IMAGES, *IMAGE_SHAPE), generator=generator).clamp(-1, 1)
    labels = torch.arange(N_IMAGES) % 2
    unet, scheduler = _tiny_unet(), DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=3e-3)
    for _ in range(TRAIN_STEPS):
        noise = torch.randn_like(members)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (N_IMAGES,))
        noisy = scheduler.add_noise(members, noise, timesteps)
        predicted = unet(noisy, timesteps, class_labels=labels).sample
        loss = torch.nn.functional.mse_loss(predicted, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return unet, scheduler, members, nonmembers, labels


@pytest.mark.slow
def test_loss_attack_detects_a_memorising_model(memorising_model):
    unet, scheduler, members, nonmembers, labels = memorising_model
    result = attack_metrics(
        image_loss_scores(unet, scheduler, members, labels),
        image_loss_scores(unet, scheduler, nonmembers, labels),
    )
    print(f"loss attack AUC {result.auc:.3f}")
    assert result.auc >= 0.8


@pytest.mark.slow
def test_pia_detects_a_memorising_model(memorising_model):
    unet, scheduler, members, nonmembers, labels = memorising_model
    result = attack_metrics(
        image_pia_scores(unet, scheduler, members, labels),
        image_pia_scores(unet, scheduler, nonmembers, labels),
    )
    print(f"PIA AUC {result.auc:.3f}")
    assert result.auc >= 0.8


@pytest.fixture
def untrained():
    torch.manual_seed(5)
    images = torch.randn((6, *IMAGE_SHAPE))
    return _tiny_unet().eval(), DDPMScheduler(num_train_timesteps=100), images, torch.arange(6) % 2


def test_loss_scores_follow_the_formula_with_shared_noise(untrained):
    unet, scheduler, images, labels = untrained
    scores = image_loss_scores(unet, scheduler, images, labels, timesteps=[30], draws=1, seed=7)
    noise = torch.randn((1, *IMAGE_SHAPE), generator=torch.Generator().manual_seed(7))
    noise = noise.expand_as(images)
    t = torch.full((6,), 30)
    with torch.no_grad():
        predicted = unet(scheduler.add_noise(images, noise, t), t, class_labels=labels).sample
    expected = -((predicted - noise) ** 2).mean(dim=(1, 2, 3))
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-5)


def test_loss_scores_do_not_depend_on_batching_or_position(untrained):
    unet, scheduler, images, labels = untrained
    images = torch.cat([images, images[:1]])  # example 0 again, at the end
    labels = torch.cat([labels, labels[:1]])
    whole = image_loss_scores(unet, scheduler, images, labels)
    batched = image_loss_scores(unet, scheduler, images, labels, batch_size=4)
    np.testing.assert_allclose(whole, batched, rtol=1e-5)
    assert whole[-1] == pytest.approx(whole[0], rel=1e-5)


def test_pia_scores_follow_the_formula(untrained):
    unet, scheduler, images, labels = untrained
    scores = image_pia_scores(unet, scheduler, images, labels)  # default t = 0.2 * 100 = 20
    with torch.no_grad():
        eps_0 = unet(images, torch.zeros(6, dtype=torch.long), class_labels=labels).sample
        abar = scheduler.alphas_cumprod[20]
        x_t = abar.sqrt() * images + (1 - abar).sqrt() * eps_0
        eps_t = unet(x_t, torch.full((6,), 20), class_labels=labels).sample
    expected = -((eps_t - eps_0).abs() ** 4).sum(dim=(1, 2, 3))
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-4)


def test_pia_scores_a_v_prediction_model_by_its_implied_noise(untrained):
    unet, _, images, labels = untrained
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction")
    scores = image_pia_scores(unet, scheduler, images, labels)

    def implied_noise(x, t):  # eps = sqrt(abar) v + sqrt(1 - abar) x_t
        abar = scheduler.alphas_cumprod[t]
        v = unet(x, torch.full((6,), t), class_labels=labels).sample
        return abar.sqrt() * v + (1 - abar).sqrt() * x

    with torch.no_grad():
        eps_0 = implied_noise(images, 0)
        abar = scheduler.alphas_cumprod[20]
        eps_t = implied_noise(abar.sqrt() * images + (1 - abar).sqrt() * eps_0, 20)
    expected = -((eps_t - eps_0).abs() ** 4).sum(dim=(1, 2, 3))
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-4)


def test_attack_timestep_outside_the_schedule_is_a_user_error(untrained):
    unet, scheduler, images, labels = untrained
    with pytest.raises(FedgenError, match="timestep 100"):
        image_pia_scores(unet, scheduler, images, labels, t=100)
