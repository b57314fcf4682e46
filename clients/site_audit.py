"""Site-side audits: answer the coordinator's audit queries on the site's OWN records.

The coordinator sends, as Flower query messages (layout: fedgen.protocol), the run
configuration, the final model's trained state, the synthetic data and (images) the feature
extractor every site must share: the FeatureNet's weights, and, if the user chose Inception for
the fidelity figures, the path of the TorchScript detector, which every site loads from its own
disk (weights never travel). The site scores its train split (members) against its held-out
split (non-members) and replies with aggregates only: counts, sums, scalar summaries and score
histograms. No record, no per-example score and no real image leaves the site.

Two queries per modality, because pooled histograms need bin edges shared by every site:

1. ``audit``: every measure (fedgen.clients.image_audit, fedgen.clients.text_audit), plus per
   attack the site's exact attack summary and empirical ε lower bound (from its exact scores),
   and the central range of its scores. The scores themselves stay in the node's state
   (``context.state``) for the second query.
2. ``histograms``: the coordinator sends edges chosen from all sites' ranges; the site bins
   its scores on them (recomputing them if the node lost its state: they are deterministic).
"""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, RecordDict
from torch import Tensor

from fedgen.audits.features import FeatureExtractor, FeatureNet, load_inception
from fedgen.audits.site_answers import Scores, score_histograms
from fedgen.clients.image_audit import image_attack_scores, image_site_audit
from fedgen.clients.text_audit import text_member_scores, text_site_audit
from fedgen.config import config_from_toml
from fedgen.data.site import SiteData, load_site
from fedgen.errors import FedgenError
from fedgen.modalities import Modality, get_modality
from fedgen.protocol import (
    CONFIG,
    EDGES,
    FEATURE_NET,
    FEATURE_NET_CONFIG,
    INCEPTION,
    MODEL,
    QUERY_AUDIT,
    QUERY_HISTOGRAMS,
    SYNTHETIC_IMAGES,
    SYNTHETIC_TEXTS,
    pack_reply,
)

__all__ = ["answer_query"]

SCORES_STATE_KEY = "audit-scores-{modality}"  # node state: this audit's scores, for query 2


def answer_query(
    content: RecordDict, site_dir: Path, *, work_dir: Path, state: RecordDict | None = None
) -> RecordDict:
    """Answer one audit query on the site in ``site_dir``; the reply holds aggregates only.

    ``work_dir`` holds locally made artifacts (the demo's tiny base model); ``state`` is the
    node's state, where the first query leaves the attack scores for the second.
    """
    settings = content[CONFIG]
    config = config_from_toml(str(settings["run-config"]))
    torch.set_num_threads(config.federation.threads_per_site)
    modality_name, query = str(settings["modality"]), str(settings["query"])
    # Every modality of the run: the site's budget and δ cover all of them (fedgen.privacy.plan).
    site = load_site(site_dir, config.data, modalities=tuple(config.modalities), channels=config.image.channels)
    modality = get_modality(modality_name, config, work_dir=work_dir)
    try:
        if query == QUERY_AUDIT:
            model = _trained_model(modality, content[MODEL].to_torch_state_dict())
            result, scores = _site_audit(modality, site, model, content)
            if state is not None:
                state[SCORES_STATE_KEY.format(modality=modality_name)] = _scores_record(scores)
        elif query == QUERY_HISTOGRAMS:
            result = {"histograms": _histograms_answer(modality, site, content, state)}
        else:
            raise AssertionError(f"unknown audit query {query!r}")
    except FedgenError as err:
        raise FedgenError(f"{site.name}: {err}") from None
    return pack_reply({"site": site.name, "modality": modality_name, **result})


def _site_audit(modality: Modality, site: SiteData, model, content: RecordDict) -> tuple[dict, Scores]:
    """The modality's site audit on the query's synthetic data (and shared extractor)."""
    if modality.name == "image":
        feature_net = _feature_net(content)
        extractor = _fidelity_extractor(content, feature_net)  # first: a missing file fails at once
        return image_site_audit(
            modality, site, model, synthetic=_synthetic_images(content), feature_net=feature_net, extractor=extractor
        )
    synthetic = content[SYNTHETIC_TEXTS]
    texts, labels = [str(t) for t in synthetic["texts"]], [int(x) for x in synthetic["labels"]]
    return text_site_audit(modality, site, model, synthetic=(texts, labels))


def _attack_scores(modality: Modality, site: SiteData, model) -> Scores:
    scorer = image_attack_scores if modality.name == "image" else text_member_scores
    return scorer(modality, site, model)


def _histograms_answer(modality: Modality, site: SiteData, content: RecordDict, state: RecordDict | None) -> dict:
    """Bin the scores the audit query left in the node state (recomputed if the state was lost)."""
    scores = _cached_scores(state, modality.name)
    if scores is None:
        model = _trained_model(modality, content[MODEL].to_torch_state_dict())
        scores = _attack_scores(modality, site, model)
    edges = {name: content[EDGES][name].numpy() for name in content[EDGES].keys()}
    return score_histograms(scores, edges)


def _scores_record(scores: Scores) -> ArrayRecord:
    arrays = {}
    for name, (members, nonmembers) in scores.items():
        arrays[f"{name}/members"] = Array(members)
        arrays[f"{name}/nonmembers"] = Array(nonmembers)
    return ArrayRecord(array_dict=arrays)


def _cached_scores(state: RecordDict | None, modality: str) -> Scores | None:
    record = None if state is None else state.get(SCORES_STATE_KEY.format(modality=modality))
    if record is None:
        return None
    names = dict.fromkeys(key.split("/")[0] for key in record.keys())
    return {n: (record[f"{n}/members"].numpy(), record[f"{n}/nonmembers"].numpy()) for n in names}


def _trained_model(modality: Modality, model_state: dict[str, Tensor]):
    model = modality.build_model()
    modality.set_state(model, model_state)
    return model.eval()


def _feature_net(content: RecordDict) -> FeatureNet:
    config = dict(content[FEATURE_NET_CONFIG])
    net = FeatureNet(**{**config, "widths": tuple(config["widths"])})
    net.load_state_dict(content[FEATURE_NET].to_torch_state_dict())
    return net.eval()


def _fidelity_extractor(content: RecordDict, feature_net: FeatureNet) -> FeatureExtractor:
    """The Inception detector at the path the coordinator named (this site's own copy), else the FeatureNet."""
    if INCEPTION not in content:
        return feature_net
    return load_inception(str(content[INCEPTION]["path"]))


def _synthetic_images(content: RecordDict) -> tuple[Tensor, Tensor]:
    record = content[SYNTHETIC_IMAGES]
    return torch.from_numpy(record["images"].numpy()), torch.from_numpy(record["labels"].numpy())
