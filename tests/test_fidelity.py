import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from fedgen.audits.features import FeatureNet, classify, extract_features, load_inception, train_feature_net
from fedgen.audits.fidelity import (
    MIN_AGGREGATE_COUNT,
    PSNR_CAP_DB,
    class_fidelity,
    embed_texts,
    fid_from_features,
    fid_from_stats,
    kid_at_site,
    mean_over_classes,
    near_copy_chance_count,
    near_copy_count,
    nearest_distances,
    nearest_real_similarity,
    pool_class_fidelity,
    pool_near_copies,
    pool_sums,
    pool_text_class_stats,
    pool_weighted_mean,
    prdc,
    real_feature_stats,
    summarise_text_class_stats,
    synthetic_feature_stats,
    text_class_stats,
    text_embedding_stats,
    text_fidelity,
)
from fedgen.errors import FedgenError


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors: a second thread only adds synchronisation (measured 25x more CPU on a
    loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def bright_dark(n: int, *, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0 dark, class 1 bright, with pixel noise: separable by a tiny CNN in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    level = torch.where(labels == 1, 0.6, -0.6).view(-1, 1, 1, 1)
    return (level + 0.3 * torch.randn(n, 1, size, size, generator=g)).clamp(-1, 1), labels


QUADRANTS = ["top-left", "top-right", "bottom-left", "bottom-right"]


def quadrants(n: int, *, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes, each with one bright quadrant, with pixel noise. (With two classes that
    differ only in brightness, an untrained net's arbitrary split of brightness is as likely
    to be right as wrong: a set that teaches nothing could score perfectly.)"""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = torch.full((n, 1, size, size), -0.6)
    half = size // 2
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label, 2)
        images[i, :, row * half : (row + 1) * half, col * half : (col + 1) * half] = 0.6
    return (images + 0.3 * torch.randn(n, 1, size, size, generator=g)).clamp(-1, 1), labels


def gaussian(n: int, d: int, *, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


# --------------------------------------------------------------------------- features


def test_feature_net_learns_and_round_trips(tmp_path):
    images, labels = bright_dark(64, seed=0)
    net = train_feature_net(images, labels, num_classes=2, trained_on="toy bright/dark", max_steps=30, seed=0)
    test_images, test_labels = bright_dark(40, seed=1)
    assert (classify(net, test_images) == test_labels).float().mean() == 1.0
    features = extract_features(net, test_images, batch_size=16)
    assert features.shape == (40, net.num_features) == (40, 128)

    net.save_pretrained(tmp_path / "fnet")
    loaded = FeatureNet.from_pretrained(tmp_path / "fnet")
    assert torch.allclose(extract_features(loaded, test_images), features)
    assert loaded.description == "fedgen FeatureNet (trained on toy bright/dark)"
    assert sorted(p.name for p in (tmp_path / "fnet").iterdir()) == ["config.json", "model.safetensors"]


def test_training_is_seeded_and_leaves_global_rng_alone():
    images, labels = bright_dark(32, seed=0)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = train_feature_net(images, labels, num_classes=2, trained_on="x", max_steps=3, seed=5)
    after = torch.rand(1)
    b = train_feature_net(images, labels, num_classes=2, trained_on="x", max_steps=3, seed=5)
    assert torch.equal(before, after)
    assert torch.equal(a.head.weight, b.head.weight)


def test_training_stops_when_the_validation_loss_stops_falling_and_keeps_the_best_weights():
    """Noise with random labels has nothing to teach: the validation loss never falls for long,
    training stops PATIENCE measurements after its lowest point, and those weights are kept."""
    from fedgen.audits.features import EVAL_EVERY, PATIENCE

    g = torch.Generator().manual_seed(0)
    noise, labels = torch.rand(80, 1, 16, 16, generator=g) * 2 - 1, torch.randint(0, 2, (80,), generator=g)
    net = train_feature_net(noise, labels, num_classes=2, trained_on="noise", max_steps=1000, seed=0)
    record = net.training_record
    assert record["n_validation"] == 16  # a fifth of each class
    assert record["steps"] == record["kept_step"] + PATIENCE * EVAL_EVERY < 1000
    assert record["kept_step"] % EVAL_EVERY == 0

    images, labels = bright_dark(64, seed=0)
    fixed = train_feature_net(images, labels, num_classes=2, trained_on="x", max_steps=7, validation_fraction=0)
    assert fixed.training_record == {"steps": 7, "kept_step": 7, "validation_accuracy": None, "n_validation": 0}


def test_oversampling_rebalances_the_records_that_train_never_the_validation_ones():
    """SMOTE applied before the split would put interpolations of training records among the
    validation ones: a validation loss that falls as long as the net fits its training set."""
    images = torch.arange(40.0)[:, None, None, None].expand(40, 1, 8, 8).contiguous()
    labels = torch.arange(40) % 2
    received = []

    def oversample(x, y):
        received.append(x[:, 0, 0, 0].tolist())
        return torch.cat([x, x]), torch.cat([y, y])

    net = train_feature_net(images, labels, num_classes=2, trained_on="x", max_steps=3, seed=0, oversample=oversample)
    assert net.training_record["n_validation"] == 8
    assert len(received) == 1 and len(set(received[0])) == 32  # the 32 records that train, each once


class LinearDetector(nn.Module):
    """The call signature of inception-2015-12-05.pt (uint8 [N, 3, H, W] -> [N, 2048]) with a
    linear body: each channel's mean pixel value times a fixed [3, 2048] matrix."""

    def __init__(self, num_features: int = 2048) -> None:
        super().__init__()
        self.register_buffer("weight", torch.randn(3, num_features, generator=torch.Generator().manual_seed(0)) / 64)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert img.dtype == torch.uint8 and img.shape[1] == 3 and return_features
        return img.to(torch.float32).mean(dim=(2, 3)) @ self.weight


class NoFeaturesFlag(nn.Module):
    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return img.to(torch.float32).flatten(1)


def scripted(tmp_path, module: nn.Module) -> Path:
    path = tmp_path / "detector.pt"
    torch.jit.script(module).save(str(path))
    return path


def gray(levels: torch.Tensor) -> torch.Tensor:
    """Gray images in [-1, 1] whose pixels are exactly the given 0..255 levels after quantising."""
    return levels.to(torch.float32) / 127.5 - 1


SHIFT = 20  # gray levels added to every pixel of the "synthetic" set


@pytest.mark.slow
def test_a_torchscript_inception_file_feeds_fid(tmp_path):
    inception = load_inception(scripted(tmp_path, LinearDetector()))
    weight = LinearDetector().weight.double()
    assert "local path" in inception.description and inception.num_features == 2048
    black_white = inception.features(gray(torch.tensor([0, 255]).view(2, 1, 1, 1).expand(2, 1, 4, 4)))
    torch.testing.assert_close(black_white[1].double(), 255 * weight.sum(0), rtol=1e-5, atol=1e-4)
    assert black_white[0].abs().max() == 0  # -1 is uint8 0 in every one of the three channels

    levels = torch.randint(40, 200, (24, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    real = extract_features(inception, gray(levels))
    synthetic = extract_features(inception, gray(levels + SHIFT))
    assert real.shape == synthetic.shape == (24, 2048)
    assert fid_from_features(real, real) == pytest.approx(0.0, abs=1e-3)
    # Every channel mean moves by SHIFT, so every feature vector by SHIFT x the column sums and
    # the covariances stay equal: FID = |shift of the means|².
    expected = float(SHIFT**2 * weight.sum(0).square().sum())
    assert fid_from_features(real, synthetic) == pytest.approx(expected, rel=1e-4)


def test_load_inception_refuses_a_missing_file(tmp_path):
    with pytest.raises(FedgenError, match="not found"):
        load_inception(tmp_path / "pt_inception.pth")


def test_load_inception_names_a_file_that_is_not_torchscript(tmp_path):
    torch.save(LinearDetector().state_dict(), tmp_path / "weights.pth")
    with pytest.raises(FedgenError, match="weights.pth is not a TorchScript file"):
        load_inception(tmp_path / "weights.pth")


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (NoFeaturesFlag(), "cannot be called as detector\\(images, return_features=True\\)"),
        (LinearDetector(num_features=10), "returned \\(1, 10\\) for 1 images, not features of shape \\(1, 2048\\)"),
    ],
)
def test_load_inception_refuses_a_detector_of_another_kind(tmp_path, module, message):
    with pytest.raises(FedgenError, match=message):
        load_inception(scripted(tmp_path, module))


def test_from_pretrained_names_the_missing_file(tmp_path):
    with pytest.raises(FedgenError, match="config.json"):
        FeatureNet.from_pretrained(tmp_path)


# --------------------------------------------------------------------------- FID / KID


class GivenFeatures(nn.Module):
    """Hands torchmetrics the features it is given."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x):
        return x


def torchmetrics_fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    reference = FrechetInceptionDistance(feature=GivenFeatures(real.shape[1])).set_dtype(torch.float64)
    reference.update(real, real=True)
    reference.update(fake, real=False)
    return float(reference.compute())


def test_fid_matches_torchmetrics_and_pools_exactly_over_sites():
    real, fake = gaussian(300, 8, seed=0), 1.5 * gaussian(200, 8, seed=1, shift=0.5)
    expected = torchmetrics_fid(real, fake)
    assert fid_from_features(real, fake) == pytest.approx(expected, rel=1e-6)
    sites = [real_feature_stats(part) for part in (real[:100], real[100:250], real[250:])]
    pooled = fid_from_stats(pool_sums(sites), synthetic_feature_stats(fake))
    assert pooled == pytest.approx(expected, rel=1e-6)


def test_fid_of_a_shift_is_the_squared_shift():
    x = gaussian(500, 4, seed=2)
    assert fid_from_features(x, x) == pytest.approx(0.0, abs=1e-6)
    assert fid_from_features(x, x + 2.0) == pytest.approx(4 * 2.0**2, rel=1e-6)


def test_fid_survives_fewer_samples_than_dimensions():
    real, fake = gaussian(30, 64, seed=3), gaussian(30, 64, seed=4)  # singular covariances
    assert fid_from_features(real, fake) == pytest.approx(torchmetrics_fid(real, fake), rel=1e-6)


def test_site_aggregates_refuse_too_few_records():
    with pytest.raises(FedgenError, match=f"at least {MIN_AGGREGATE_COUNT}"):
        real_feature_stats(gaussian(MIN_AGGREGATE_COUNT - 1, 4, seed=0))


def test_kid_is_near_zero_for_one_distribution_and_large_for_a_shift():
    real = gaussian(200, 8, seed=5)
    same = kid_at_site(real, gaussian(200, 8, seed=6), subsets=10, subset_size=100)
    shifted = kid_at_site(real, gaussian(200, 8, seed=6, shift=1.0), subsets=10, subset_size=100)
    assert abs(same["kid_mean"]) < 0.05
    assert shifted["kid_mean"] > 1.0
    assert kid_at_site(real, real + 1, subsets=5, subset_size=50, seed=1) == kid_at_site(
        real, real + 1, subsets=5, subset_size=50, seed=1
    )
    assert (same["n_real"], same["n_fake"]) == (200, 200)


# --------------------------------------------------------------------------- PRDC


def test_prdc_of_identical_sets_is_one():
    x = gaussian(120, 6, seed=7)
    result = prdc(x, x.clone(), k=5, chunk=32)
    assert (result["precision"], result["recall"], result["coverage"]) == (1.0, 1.0, 1.0)
    assert result["density"] == pytest.approx(1.0)  # no ties: each real ball holds itself + k−1 others


def test_prdc_of_far_apart_sets_is_zero():
    result = prdc(gaussian(100, 6, seed=8), gaussian(80, 6, seed=9, shift=100.0), k=5)
    assert {k: result[k] for k in ("precision", "recall", "density", "coverage")} == dict.fromkeys(
        ("precision", "recall", "density", "coverage"), 0.0
    )
    assert (result["n_real"], result["n_fake"]) == (100, 80)


def test_prdc_tells_off_manifold_samples_from_missed_modes():
    near, far = gaussian(100, 6, seed=12), gaussian(100, 6, seed=13, shift=100.0)
    off_manifold = prdc(near, torch.cat([near, far]))  # half the synthetic set is nowhere near real
    assert (off_manifold["precision"], off_manifold["recall"], off_manifold["coverage"]) == (0.5, 1.0, 1.0)
    assert off_manifold["density"] == pytest.approx(0.5)
    missed_mode = prdc(torch.cat([near, far]), near)  # the synthetic set misses half the real one
    assert (missed_mode["precision"], missed_mode["recall"], missed_mode["coverage"]) == (1.0, 0.5, 0.5)
    assert missed_mode["density"] == pytest.approx(1.0)


def test_prdc_does_not_depend_on_the_chunk_size():
    real, fake = gaussian(90, 5, seed=10), gaussian(70, 5, seed=11, shift=0.3)
    assert prdc(real, fake, chunk=7) == prdc(real, fake, chunk=4096)


def test_class_fidelity_scores_each_class_against_its_own_real_records_and_pools_by_count():
    # class 0: the synthetic set copies the real one; class 1: far from it; class 2: too few real records
    real0, real1, real2 = gaussian(30, 4, seed=20), gaussian(40, 4, seed=21), gaussian(5, 4, seed=22)
    fake1 = gaussian(30, 4, seed=23, shift=100.0)
    real = torch.cat([real0, real1, real2])
    real_labels = torch.tensor([0] * 30 + [1] * 40 + [2] * 5)
    fake = torch.cat([real0.clone(), fake1, gaussian(10, 4, seed=24)])
    fake_labels = torch.tensor([0] * 30 + [1] * 30 + [2] * 10)
    site = class_fidelity(real, real_labels, fake, fake_labels, class_names=["a", "b", "c"])
    assert (site["a"]["precision"], site["a"]["recall"], site["a"]["coverage"]) == (1.0, 1.0, 1.0)
    assert (site["b"]["precision"], site["b"]["recall"], site["b"]["coverage"]) == (0.0, 0.0, 0.0)
    assert site["a"]["fid"] == pytest.approx(0.0, abs=1e-6) and site["b"]["fid"] == pytest.approx(
        4 * 100.0**2, rel=0.05
    )
    assert site["b"]["kid"] > 1000 * abs(site["a"]["kid"])
    assert site["c"] == {"n_real": 5, "n_fake": 10}  # below MIN_AGGREGATE_COUNT: counts only
    mean = mean_over_classes(site)
    assert (
        mean["precision"] == pytest.approx(30 / 70) and mean["n_real"] == 70 and mean["classes_measured"] == ["a", "b"]
    )
    figures = {"fid": 1.0, "kid": 0.5, "precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    other = {"a": {**figures, "n_real": 90, "n_fake": 30}, "c": {"n_real": 7, "n_fake": 10}}
    pooled = pool_class_fidelity([site, other])
    assert pooled["a"]["precision"] == pytest.approx(30 / 120) and pooled["a"]["n_real"] == 120
    assert pooled["b"]["n_real"] == 40 and pooled["c"] == {"n_real": 12}
    assert mean_over_classes({"c": pooled["c"]})["fid"] is None  # no class measured: no figure, a note


def test_pool_weighted_mean_weights_by_count():
    pooled = pool_weighted_mean(
        [{"recall": 1.0, "n_real": 30}, {"recall": 0.0, "n_real": 10}], keys=["recall"], weight_key="n_real"
    )
    assert pooled == {"recall": 0.75, "n_real": 40}


# --------------------------------------------------------------------------- SSIM / PSNR


def test_ssim_psnr_are_perfect_for_copies_and_fall_with_noise():
    real, labels = bright_dark(40, seed=12)
    exact = nearest_real_similarity(real[:10], labels[:10], real, labels)
    assert exact["ssim_mean"] == pytest.approx(1.0)
    assert exact["psnr_mean"] == PSNR_CAP_DB
    assert exact["n"] == 10

    g = torch.Generator().manual_seed(0)
    noisy = [(real[:10] + s * torch.randn(10, 1, 16, 16, generator=g)).clamp(-1, 1) for s in (0.05, 0.2, 0.5)]
    scores = [nearest_real_similarity(images, labels[:10], real, labels) for images in noisy]
    ssims, psnrs = [s["ssim_mean"] for s in scores], [s["psnr_mean"] for s in scores]
    assert 1.0 > ssims[0] > ssims[1] > ssims[2]
    assert PSNR_CAP_DB > psnrs[0] > psnrs[1] > psnrs[2]


def test_ssim_compares_only_with_real_images_of_the_same_class():
    real, labels = bright_dark(40, seed=13)
    copy_of_dark = real[:1]  # a class-0 image
    as_dark = nearest_real_similarity(copy_of_dark, torch.tensor([0]), real, labels)
    as_bright = nearest_real_similarity(copy_of_dark, torch.tensor([1]), real, labels)
    assert as_dark["ssim_mean"] == pytest.approx(1.0)
    assert as_bright["psnr_mean"] < 15  # ~1.2 apart on a range of 2
    unknown = nearest_real_similarity(copy_of_dark, torch.tensor([4]), real, labels)
    assert unknown["n"] == 0 and math.isnan(unknown["ssim_mean"])


# --------------------------------------------------------------------------- memorisation


def test_nearest_distances_match_brute_force_in_any_chunking():
    query, reference = torch.randn(13, 2, 3, 3), torch.randn(29, 2, 3, 3)
    brute = torch.stack([(reference - q).flatten(1).norm(dim=1).min() for q in query]).double()
    assert torch.allclose(nearest_distances(query, reference, chunk=4), brute, atol=1e-5)


def test_near_copies_of_training_images_are_counted():
    train, train_labels = bright_dark(60, seed=14)
    heldout, _ = bright_dark(40, seed=15)
    g = torch.Generator().manual_seed(1)
    synthetic = torch.cat([train[[3, 17, 42]], torch.rand(20, 1, 16, 16, generator=g) * 2 - 1])
    extractor = FeatureNet(in_channels=1, num_classes=2)  # untrained: copies are still at distance 0
    result = near_copy_count(synthetic, train, heldout, extractor=extractor)
    assert result["pixel"]["count"] == 3  # the uniform-noise images are far from every training image
    assert result["feature"]["count"] >= 3
    assert result["pixel"]["threshold"] > 0
    assert result["feature_extractor"] == "fedgen FeatureNet (trained on nothing (untrained))"
    assert (result["pixel"]["rank"], result["pixel"]["n_heldout"]) == (1, 40)  # 1% of 40: the nearest
    pooled = pool_near_copies([result, result])
    assert pooled["pixel_count"] == 6
    # the chance count is at the sites' set sizes, summed over the sites' distributions
    assert pooled["pixel_chance_count"] == near_copy_chance_count([(23, 1, 40)] * 2)


def test_the_chance_count_of_near_copies_matches_a_simulation_of_a_generator_that_copies_nothing():
    """Simulated directly: synthetic and held-out distances from one distribution (any: only their
    order matters), the count below the rank-th smallest held-out distance, at two sites."""
    rng = np.random.default_rng(0)
    sites = [(100, 1, 61), (120, 2, 150)]
    totals = 0
    for n_synthetic, rank, n_heldout in sites:
        heldout = np.sort(rng.random((20_000, n_heldout)), axis=1)[:, rank - 1 : rank]
        totals = totals + (rng.random((20_000, n_synthetic)) < heldout).sum(axis=1)
    simulated = int(np.quantile(totals, 0.99, method="inverted_cdf"))
    bound = near_copy_chance_count(sites)
    assert abs(bound - simulated) <= 1 and bound >= 5  # ~2.5 expected: "none at all" would refuse it
    assert (totals <= bound).mean() >= 0.985


def test_held_out_images_as_synthetic_stay_within_chance_and_copies_exceed_it():
    train, _ = bright_dark(200, seed=20)
    heldout, _ = bright_dark(100, seed=21)
    fresh, _ = bright_dark(150, seed=22)  # real images the "model" never saw
    unseen = near_copy_count(fresh, train, heldout)
    copies = near_copy_count(torch.cat([fresh[:140], train[:10]]), train, heldout)
    for result, within in ((unseen, True), (copies, False)):
        pooled = pool_near_copies([result])
        assert (pooled["pixel_count"] <= pooled["pixel_chance_count"]) is within, pooled


# --------------------------------------------------------------------------- text

CALM = [
    "the patient feels calm and rested today",
    "sleep is good and mood is stable",
    "no worries reported at all",
]
ANXIOUS = [
    "the patient reports racing thoughts",
    "constant worry and a tight chest",
    "panic attacks at night again",
]


def corpus(sentences: list[str], n: int, *, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(sentences, size=2)) for _ in range(n)]


def test_text_embedding_does_not_depend_on_the_other_texts():
    alone = embed_texts(["a short note"])
    with_others = embed_texts(["something else entirely", "a short note"])
    assert np.array_equal(alone[0], with_others[1])
    assert np.linalg.norm(alone[0]) == pytest.approx(1.0)


def test_text_fidelity_separates_similar_from_different_and_pools_exactly():
    real = corpus(CALM, 60, seed=0)
    similar, different = corpus(CALM, 40, seed=1), corpus(ANXIOUS, 40, seed=2)
    sites = pool_sums([text_embedding_stats(real[:25]), text_embedding_stats(real[25:])])
    whole = text_embedding_stats(real)
    assert sites["n"] == 60 and np.allclose(sites["embedding_sum"], whole["embedding_sum"])

    close = text_fidelity(sites, text_embedding_stats(similar, real=False))
    far = text_fidelity(sites, text_embedding_stats(different, real=False))
    same = text_fidelity(whole, text_embedding_stats(real, real=False))
    assert same["mean_embedding_distance"] == pytest.approx(0.0, abs=1e-9)
    assert same["frechet_distance"] == pytest.approx(0.0, abs=1e-6)
    assert close["mean_embedding_distance"] < far["mean_embedding_distance"] / 3
    assert close["frechet_distance"] < far["frechet_distance"] / 3


def test_text_class_stats_give_lengths_and_vocabulary_and_suppress_small_classes():
    texts = ["a b a b"] * 10 + ["c d e"] * 10 + ["x"] * 3
    labels = [0] * 20 + [1] * 3
    site_a = text_class_stats(texts, labels, class_names=["Normal", "Stress"])
    site_b = text_class_stats(["f g h i"] * 20, [0] * 20, class_names=["Normal", "Stress"])
    assert site_a["Stress"] == {"n": 3}

    summary = summarise_text_class_stats(pool_text_class_stats([site_a, site_b]))
    normal = summary["Normal"]
    assert normal["n"] == 40
    assert normal["words_mean"] == pytest.approx((10 * 4 + 10 * 3 + 20 * 4) / 40)
    assert normal["chars_mean"] == pytest.approx((10 * 7 + 10 * 5 + 20 * 7) / 40)
    assert normal["type_token_ratio"] == pytest.approx((10 * 0.5 + 10 * 1.0 + 20 * 1.0) / 40)
    assert normal["distinct_words"] == 5  # max over sites (site a: a b c d e), a lower bound of the union
    assert summary["Stress"] == {"n": 3}

    one_text = text_class_stats(["x y"], [1], class_names=["Normal", "Stress"], real=False)
    synthetic = summarise_text_class_stats(one_text)
    assert synthetic["Stress"]["words_std"] == 0.0 and synthetic["Normal"] == {"n": 0}


def test_class_aware_fidelity_ranks_a_ladder_of_worse_synthetic_sets():
    """In the space of a FeatureNet trained on a site's real train split, real images the net
    never saw score best, mildly blurred ones worse and noise worst in every figure; the same
    real images with their labels shuffled are worse than real in every figure but recall.

    Shuffled labels are not placed between real and blurred: three in four of those images show
    another class, and a space that knows the classes puts them as far from their claimed class
    as noise (FID, KID), with fewer in its manifold than real but more than blur (precision,
    density, coverage). Their recall is inflated, the known weakness of k-NN recall: a class's
    synthetic set spread over every class has wide k-NN balls, which cover its real images."""
    (train_x, train_y), (held_x, held_y) = quadrants(160, seed=1), quadrants(80, seed=2)
    net = train_feature_net(train_x, train_y, num_classes=4, trained_on="site real train split", max_steps=60)
    real_x, real_y = torch.cat([train_x, held_x]), torch.cat([train_y, held_y])
    images, labels = quadrants(80, seed=3)  # real images the net never saw, as "synthetic"
    g = torch.Generator().manual_seed(4)
    padded = nn.functional.pad(images, (1, 1, 1, 1), mode="replicate")
    ladder = {
        "real": (images, labels),
        "shuffled": (images, labels[torch.randperm(80, generator=g)]),
        "blurred": (nn.functional.avg_pool2d(padded, 3, stride=1), labels),
        "noise": (torch.rand(80, 1, 16, 16, generator=g) * 2 - 1, labels),
    }
    real_features = extract_features(net, real_x)
    scores = {
        name: mean_over_classes(
            class_fidelity(real_features, real_y, extract_features(net, x), y, class_names=QUADRANTS)
        )
        for name, (x, y) in ladder.items()
    }
    column = lambda key, names: [scores[name][key] for name in names]  # noqa: E731
    for key in ("fid", "kid"):
        assert column(key, ["real", "blurred", "noise"]) == sorted(column(key, ["real", "blurred", "noise"]))
        assert len(set(column(key, ["real", "blurred", "noise"]))) == 3
        assert scores["shuffled"][key] > 0.5 * scores["noise"][key] > scores["blurred"][key]
    for key in ("precision", "density", "coverage"):
        values = column(key, ["real", "shuffled", "blurred", "noise"])
        assert values == sorted(values, reverse=True) and values[0] > values[1] > values[2]
    assert scores["real"]["recall"] > scores["blurred"]["recall"] >= scores["noise"]["recall"]
    assert scores["real"]["precision"] > 0.7 and scores["noise"]["precision"] == 0.0
