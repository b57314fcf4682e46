"""The image audit at a site: attacks, near copies, fidelity and utility on the site's OWN images.

Called by fedgen.clients.site_audit with the decoded query; returns aggregates only (see
fedgen.audits.site_answers for what the attack part may say).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedgen.audits.bias import record_counts
from fedgen.audits.features import FeatureExtractor, FeatureNet, classify, extract_features, train_feature_net
from fedgen.audits.fidelity import NEAR_COPY_ANSWER, class_fidelity, near_copy_count, nearest_real_similarity
from fedgen.audits.mia import image_loss_scores, image_pia_scores
from fedgen.audits.site_answers import Scores, attack_summaries
from fedgen.audits.utility import image_utility, site_seed
from fedgen.data.site import SiteData
from fedgen.modalities import Modality
from fedgen.privacy.plan import privacy_facts

__all__ = ["IMAGE_ATTACKS", "image_site_audit", "site_feature_net"]

IMAGE_ATTACKS = ("loss", "pia")


def _image_scores(modality: Modality, unet, splits: Sequence[tuple[Tensor, Tensor]]) -> Scores:
    from fedgen.models.diffusion import make_noise_scheduler

    scheduler = make_noise_scheduler(modality.config.image)
    seed = modality.config.seed
    return {
        "loss": tuple(image_loss_scores(unet, scheduler, *split, seed=seed) for split in splits),
        "pia": tuple(image_pia_scores(unet, scheduler, *split) for split in splits),
    }


def site_feature_net(
    train: tuple[Tensor, Tensor], heldout: tuple[Tensor, Tensor], *, site: str, class_names, seed: int
) -> tuple[FeatureNet, dict]:
    """The site's own class-aware extractor: a FeatureNet trained on its real train split (the
    utility audit's real-trained classifier), and what the report says of it: its accuracy on
    the site's held-out images and its training (never its weights: they stay here)."""
    net = train_feature_net(*train, num_classes=len(class_names), trained_on=f"{site} real train split", seed=seed)
    accuracy = float((classify(net, heldout[0]) == heldout[1]).float().mean())
    return net, {"heldout_accuracy": accuracy, "n_heldout": len(heldout[1]), "training": net.training_record}


def image_site_audit(
    modality: Modality,
    site: SiteData,
    unet,
    *,
    synthetic: tuple[Tensor, Tensor],
    inception: FeatureExtractor | None = None,
) -> dict:
    """Attacks, near copies, fidelity and utility of the synthetic images on this site's images.

    The fidelity features come from the site's own FeatureNet (``site_feature_net``), or from
    ``inception`` when the user chose it. Near copies always use the site's FeatureNet: the
    memorisation check must not change with the user's choice of fidelity extractor.
    """
    config = modality.config
    classes = config.data.image_classes
    seed = site_seed(config.seed, site.name)
    train, heldout = (split.tensors for split in modality.datasets(site))
    synthetic, synthetic_labels = synthetic
    scores = _image_scores(modality, unet, [train, heldout])
    net, net_record = site_feature_net(train, heldout, site=site.name, class_names=classes, seed=seed)
    extractor = net if inception is None else inception
    real, real_labels = torch.cat([train[0], heldout[0]]), torch.cat([train[1], heldout[1]])
    real_features = extract_features(extractor, real)
    synthetic_features = extract_features(extractor, synthetic)
    copies = near_copy_count(synthetic, train[0], heldout[0], extractor=net)
    facts = privacy_facts(config, site)
    result = {
        **facts,
        "n_train": len(train[0]),
        "n_heldout": len(heldout[0]),
        "records": record_counts(train[1].tolist(), heldout[1].tolist(), class_names=classes),
        "attacks": attack_summaries(scores, delta=facts["delta"]),
        "fidelity": {
            "extractor": net_record if inception is None else {},
            "per_class": class_fidelity(
                real_features, real_labels, synthetic_features, synthetic_labels, class_names=classes, seed=seed
            ),
            "similarity": nearest_real_similarity(synthetic, synthetic_labels, real, real_labels),
        },
        # Counts and set sizes only: the thresholds are distances between two of the site's images.
        "memorisation": {
            **{measure: {key: copies[measure][key] for key in NEAR_COPY_ANSWER} for measure in ("pixel", "feature")},
            "n_synthetic": copies["n_synthetic"],
        },
        "utility": image_utility(
            train, heldout, (synthetic, synthetic_labels), class_names=classes, seed=seed, real_net=net
        ),
    }
    return result
