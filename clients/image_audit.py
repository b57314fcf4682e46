"""The image audit at a site: attacks, near copies, fidelity and utility on the site's OWN images.

Called by fedgen.clients.site_audit with the decoded query; returns aggregates only (see
fedgen.audits.site_answers for what the attack part may say).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedgen.audits.bias import record_counts
from fedgen.audits.features import FeatureExtractor, FeatureNet, extract_features
from fedgen.audits.fidelity import (
    kid_at_site,
    near_copy_count,
    nearest_real_similarity,
    prdc,
    prdc_per_class,
    real_feature_stats,
)
from fedgen.audits.mia import image_loss_scores, image_pia_scores
from fedgen.audits.site_answers import Scores, attack_summaries
from fedgen.audits.utility import image_utility
from fedgen.data.site import SiteData
from fedgen.modalities import Modality
from fedgen.privacy.plan import privacy_facts

__all__ = ["IMAGE_ATTACKS", "image_site_audit"]

IMAGE_ATTACKS = ("loss", "pia")


def _image_scores(modality: Modality, unet, splits: Sequence[tuple[Tensor, Tensor]]) -> Scores:
    from fedgen.models.diffusion import make_noise_scheduler

    scheduler = make_noise_scheduler(modality.config.image)
    seed = modality.config.seed
    return {
        "loss": tuple(image_loss_scores(unet, scheduler, *split, seed=seed) for split in splits),
        "pia": tuple(image_pia_scores(unet, scheduler, *split) for split in splits),
    }


def image_site_audit(
    modality: Modality,
    site: SiteData,
    unet,
    *,
    synthetic: tuple[Tensor, Tensor],
    feature_net: FeatureNet,
    extractor: FeatureExtractor,
) -> dict:
    """Attacks, near copies, fidelity and utility of the synthetic images on this site's images.

    ``extractor`` gives the fidelity features (the shared FeatureNet, or Inception). Near copies
    use the FeatureNet even when fidelity uses Inception: the memorisation check must not
    change with the user's choice of fidelity extractor.
    """
    config = modality.config
    train, heldout = (split.tensors for split in modality.datasets(site))
    synthetic, synthetic_labels = synthetic
    scores = _image_scores(modality, unet, [train, heldout])
    real, real_labels = torch.cat([train[0], heldout[0]]), torch.cat([train[1], heldout[1]])
    real_features = extract_features(extractor, real)
    synthetic_features = extract_features(extractor, synthetic)
    copies = near_copy_count(synthetic, train[0], heldout[0], extractor=feature_net)
    facts = privacy_facts(config, site)
    result = {
        **facts,
        "n_train": len(train[0]),
        "n_heldout": len(heldout[0]),
        "records": record_counts(train[1].tolist(), heldout[1].tolist(), class_names=config.data.image_classes),
        "attacks": attack_summaries(scores, delta=facts["delta"]),
        "fidelity": {
            "feature_stats": real_feature_stats(real_features.numpy()),
            "kid": kid_at_site(real_features, synthetic_features, seed=config.seed),
            "prdc": prdc(real_features, synthetic_features),
            "per_class": prdc_per_class(
                real_features, real_labels, synthetic_features, synthetic_labels, class_names=config.data.image_classes
            ),
            "similarity": nearest_real_similarity(synthetic, synthetic_labels, real, real_labels),
        },
        # Counts only: the thresholds are distances between two of the site's images.
        "memorisation": {
            "pixel": {"count": copies["pixel"]["count"]},
            "feature": {"count": copies["feature"]["count"]},
            "n_synthetic": copies["n_synthetic"],
        },
        "utility": image_utility(
            train,
            heldout,
            (synthetic, synthetic_labels),
            class_names=config.data.image_classes,
            seed=config.seed,
        ),
    }
    return result
