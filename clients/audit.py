"""Site-side audits: answer the coordinator's audit queries on the site's OWN records.

The coordinator sends, as Flower query messages, the run configuration, the final model's
trained state, the synthetic data and (images) the feature extractor every site must share: the
FeatureNet's weights, and, if the user chose Inception for the fidelity figures, the path of the
TorchScript detector, which every site loads from its own disk (weights never travel).
The site scores its train split (members) against its held-out split (non-members) and
replies with aggregates only: counts, sums, scalar summaries and score histograms. No record,
no per-example score and no real image leaves the site.

Two queries per modality, because pooled histograms need bin edges shared by every site:

1. ``audit``: every measure, plus per attack the site's exact attack summary and empirical ε
   lower bound (from its exact scores), and the central range of its scores
   (``SCORE_RANGE_QUANTILES`` of ≥ MIN_AGGREGATE_COUNT records). The scores themselves stay in
   the node's state (``context.state``) for the second query.
2. ``histograms``: the coordinator sends edges chosen from all sites' ranges; the site bins
   its scores on them (recomputing them if the node lost its state: they are deterministic).

Replies are packed by ``pack_reply``: arrays (feature sums, covariance-sized matrices,
histograms) in an ArrayRecord, everything else as one JSON document in a ConfigRecord.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from torch import Tensor
from torch.utils.data import TensorDataset

from fedgen.audits.empirical_eps import empirical_epsilon
from fedgen.audits.features import FeatureExtractor, FeatureNet, extract_features, load_inception
from fedgen.audits.fidelity import (
    kid_at_site,
    near_copy_count,
    nearest_real_similarity,
    prdc,
    real_feature_stats,
    require_min_count,
    text_class_stats,
    text_embedding_stats,
)
from fedgen.audits.mia import (
    attack_metrics,
    canary_exposure,
    image_loss_scores,
    image_pia_scores,
    score_histogram,
    text_attack_scores,
)
from fedgen.audits.utility import image_utility, text_utility
from fedgen.clients.local import site_budget, site_delta
from fedgen.config import RunConfig, config_from_toml, config_to_toml
from fedgen.data.site import SiteData, load_site, split_indices, text_splits
from fedgen.errors import FedgenError
from fedgen.modalities import Modality, get_modality
from fedgen.models.text import encode_examples, token_logprobs

__all__ = [
    "QUERY_AUDIT",
    "QUERY_HISTOGRAMS",
    "IMAGE_ATTACKS",
    "TEXT_ATTACKS",
    "NGRAM_N",
    "make_query",
    "answer_query",
    "pack_reply",
    "unpack_reply",
    "image_attack_scores",
    "text_note_logprobs",
    "text_member_scores",
    "attack_summaries",
    "score_histograms",
    "canary_exposure_at_site",
    "text_memorisation",
    "image_site_audit",
    "text_site_audit",
]

QUERY_AUDIT = "audit"
QUERY_HISTOGRAMS = "histograms"
IMAGE_ATTACKS = ("loss", "pia")
TEXT_ATTACKS = ("loss", "zlib", "min_k")

# Message layout (coordinator -> site).
CONFIG = "config"  # ConfigRecord: run-config (TOML), modality, query
MODEL = "model"  # ArrayRecord: the final checkpoint's trained tensors
SYNTHETIC_IMAGES = "synthetic-images"  # ArrayRecord: "images" [N, C, H, W] in [-1, 1], "labels" [N]
SYNTHETIC_TEXTS = "synthetic-texts"  # ConfigRecord: "texts", "labels" (class indices)
FEATURE_NET = "feature-net"  # ArrayRecord: FeatureNet weights
FEATURE_NET_CONFIG = "feature-net-config"  # ConfigRecord: FeatureNet constructor arguments
INCEPTION = "inception"  # ConfigRecord: "path" of the TorchScript Inception detector for fidelity
EDGES = "edges"  # ArrayRecord: one array of histogram bin edges per attack
# Reply layout (site -> coordinator).
REPLY_SUMMARY = "summary"  # ConfigRecord {"json": ...}: the reply with arrays replaced by references
REPLY_ARRAYS = "aggregates"  # ArrayRecord: the arrays, keyed by their dotted path in the reply
ARRAY_REF = "__array__"
SCORES_STATE_KEY = "audit-scores-{modality}"  # node state: this audit's scores, for query 2

# Where the central range of a site's scores is cut: the tails fall into the end bins of the
# shared histogram. The range of every score is not sent: a minimum or maximum is one record's.
SCORE_RANGE_QUANTILES = (0.05, 0.95)
TEXT_SCORE_BATCH = 16
# Utility CNN steps per configuration at the site: few, as the audit runs on 2 cores, so its
# ratio is a floor; the benchmarks train UTILITY_STEPS (400, converged; BENCHMARKS.md).
AUDIT_UTILITY_STEPS = 25
CANARIES_FILE = "canaries.jsonl"
PHI_TRUTH_FILE = "phi_truth.jsonl"
SECRET_SLOT = "{secret}"
CANARY_CANDIDATES = 100  # random secrets of the canary's format the canary is ranked against
NGRAM_N = 8  # words: a shared 8-gram is a copied phrase, not a shared habit of style
# Planted PHI values shorter than this ("May", "Li") turn up by chance; they are not matched.
MIN_MATCH_CHARS = 6
WORD_PATTERN = re.compile(r"\w+")

Scores = dict[str, tuple[np.ndarray, np.ndarray]]  # attack -> (member scores, non-member scores)


# --------------------------------------------------------------------------- message layout


def make_query(
    config: RunConfig,
    modality: str,
    query: str,
    *,
    model_state: dict[str, Tensor],
    synthetic_images: tuple[Tensor, Tensor] | None = None,
    synthetic_texts: tuple[Sequence[str], Sequence[int]] | None = None,
    feature_net: FeatureNet | None = None,
    inception: str | Path | None = None,
    edges: dict[str, np.ndarray] | None = None,
) -> RecordDict:
    """The content of one audit query (coordinator side)."""
    content = RecordDict(
        {
            CONFIG: ConfigRecord(
                {"run-config": config_to_toml(config), "modality": modality, "query": query}
            ),
            MODEL: ArrayRecord(torch_state_dict=model_state),
        }
    )
    if synthetic_images is not None:
        images, labels = synthetic_images
        content[SYNTHETIC_IMAGES] = ArrayRecord(
            array_dict={"images": Array(images.numpy()), "labels": Array(labels.numpy())}
        )
    if synthetic_texts is not None:
        texts, labels = synthetic_texts
        content[SYNTHETIC_TEXTS] = ConfigRecord({"texts": list(texts), "labels": [int(x) for x in labels]})
    if feature_net is not None:
        content[FEATURE_NET] = ArrayRecord(torch_state_dict=feature_net.state_dict())
        content[FEATURE_NET_CONFIG] = ConfigRecord(dict(feature_net.config))
    if inception is not None:
        content[INCEPTION] = ConfigRecord({"path": str(inception)})
    if edges is not None:
        content[EDGES] = ArrayRecord(array_dict={name: Array(e) for name, e in edges.items()})
    return content


def _strip_arrays(node, path: str, arrays: dict[str, Array]):
    """The reply as JSON-able values, each numpy array replaced by {ARRAY_REF: its path}."""
    if isinstance(node, dict):
        return {k: _strip_arrays(v, f"{path}.{k}" if path else str(k), arrays) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_strip_arrays(v, f"{path}.{i}", arrays) for i, v in enumerate(node)]
    if isinstance(node, np.ndarray):
        arrays[path] = Array(np.ascontiguousarray(node))
        return {ARRAY_REF: path}
    if isinstance(node, np.generic):
        return node.item()
    return node


def pack_reply(result: dict) -> RecordDict:
    arrays: dict[str, Array] = {}
    skeleton = _strip_arrays(result, "", arrays)
    return RecordDict(
        {
            REPLY_SUMMARY: ConfigRecord({"json": json.dumps(skeleton)}),
            REPLY_ARRAYS: ArrayRecord(array_dict=arrays),
        }
    )


def unpack_reply(content: RecordDict) -> dict:
    """The inverse of pack_reply (coordinator side): arrays come back as numpy arrays."""
    arrays = content[REPLY_ARRAYS]

    def restore(node):
        if isinstance(node, dict):
            if set(node) == {ARRAY_REF}:
                return arrays[node[ARRAY_REF]].numpy()
            return {k: restore(v) for k, v in node.items()}
        if isinstance(node, list):
            return [restore(v) for v in node]
        return node

    return restore(json.loads(str(content[REPLY_SUMMARY]["json"])))


# --------------------------------------------------------------------------- dispatcher


def answer_query(
    content: RecordDict, site_dir: Path, *, work_dir: Path, state: RecordDict | None = None
) -> RecordDict:
    """Answer one audit query on the site in ``site_dir``; the reply holds aggregates only.

    ``work_dir`` holds locally made artifacts (the demo's tiny base model); ``state`` is the
    node's state, where the first query leaves the attack scores for the second.
    """
    settings = content[CONFIG]
    config = config_from_toml(str(settings["run-config"]))
    modality_name, query = str(settings["modality"]), str(settings["query"])
    site = load_site(site_dir, config.data, modalities=(modality_name,), channels=config.image.channels)
    modality = get_modality(modality_name, config, work_dir=work_dir)
    try:
        if query == QUERY_AUDIT:
            model = _trained_model(modality, content[MODEL].to_torch_state_dict())
            result, scores = SITE_AUDITS[modality_name](modality, site, model, content)
            if state is not None:
                state[SCORES_STATE_KEY.format(modality=modality_name)] = _scores_record(scores)
        elif query == QUERY_HISTOGRAMS:
            result = {"histograms": _histograms_answer(modality, site, content, state)}
        else:
            raise AssertionError(f"unknown audit query {query!r}")
    except FedgenError as err:
        raise FedgenError(f"{site.name}: {err}") from None
    return pack_reply({"site": site.name, "modality": modality_name, **result})


def _histograms_answer(modality: Modality, site: SiteData, content: RecordDict, state: RecordDict | None) -> dict:
    """Bin the scores the audit query left in the node state (recomputed if the state was lost)."""
    scores = _cached_scores(state, modality.name)
    if scores is None:
        model = _trained_model(modality, content[MODEL].to_torch_state_dict())
        scores = ATTACK_SCORES[modality.name](modality, site, model)
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


# --------------------------------------------------------------------------- shared pieces


def _score_range(members: np.ndarray, nonmembers: np.ndarray) -> list[float]:
    scores = np.r_[members, nonmembers]
    require_min_count(len(scores), what="attack score range")
    return [float(q) for q in np.quantile(scores, SCORE_RANGE_QUANTILES)]


def attack_summaries(scores: Scores, *, delta: float) -> dict:
    """Per attack: the exact summary, the ε lower bound and the central score range.

    The ε bound's threshold (one record's score) is left out.
    """
    result = {}
    for name, (members, nonmembers) in scores.items():
        bound = empirical_epsilon(members, nonmembers, delta=delta)
        result[name] = {
            "summary": attack_metrics(members, nonmembers).to_dict(),
            "empirical_epsilon": {
                "eps_lb": bound.eps_lb,
                "max_certifiable": bound.max_certifiable,
                "n_members": bound.n_members,
                "n_nonmembers": bound.n_nonmembers,
                "delta": bound.delta,
            },
            "score_range": _score_range(members, nonmembers),
        }
    return result


def score_histograms(scores: Scores, edges: dict[str, np.ndarray]) -> dict:
    """Member and non-member counts per attack on the coordinator's shared edges."""
    return {
        name: {
            "members": score_histogram(members, edges[name]),
            "nonmembers": score_histogram(nonmembers, edges[name]),
        }
        for name, (members, nonmembers) in scores.items()
    }


def _common(modality: Modality, site: SiteData, n_train: int, n_heldout: int) -> dict:
    return {
        "budget": site_budget(modality.config, site),
        "delta": site_delta(modality.config, n_train),
        "n_train": n_train,
        "n_heldout": n_heldout,
    }


def _trained_model(modality: Modality, model_state: dict[str, Tensor]):
    model = modality.build_model()
    modality.set_state(model, model_state)
    return model.eval()


# --------------------------------------------------------------------------- images


def image_attack_scores(modality: Modality, site: SiteData, unet) -> Scores:
    """Loss and PIA scores of the site's train (members) and held-out (non-members) images."""
    return _image_scores(modality, unet, [split.tensors for split in modality.datasets(site)])


def _image_scores(modality: Modality, unet, splits: Sequence[tuple[Tensor, Tensor]]) -> Scores:
    from fedgen.models.diffusion import make_noise_scheduler

    scheduler = make_noise_scheduler(modality.config.image)
    seed = modality.config.seed
    return {
        "loss": tuple(image_loss_scores(unet, scheduler, *split, seed=seed) for split in splits),
        "pia": tuple(image_pia_scores(unet, scheduler, *split) for split in splits),
    }


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


def image_site_audit(modality: Modality, site: SiteData, unet, content: RecordDict) -> tuple[dict, Scores]:
    """Attacks, near copies, fidelity and utility of the synthetic images on this site's images.

    Near copies use the FeatureNet even when fidelity uses Inception: the memorisation check
    must not change with the user's choice of fidelity extractor.
    """
    config = modality.config
    train, heldout = (split.tensors for split in modality.datasets(site))
    synthetic, synthetic_labels = _synthetic_images(content)
    feature_net = _feature_net(content)
    extractor = _fidelity_extractor(content, feature_net)  # first: a missing file fails at once
    scores = _image_scores(modality, unet, [train, heldout])
    real, real_labels = torch.cat([train[0], heldout[0]]), torch.cat([train[1], heldout[1]])
    real_features = extract_features(extractor, real)
    synthetic_features = extract_features(extractor, synthetic)
    copies = near_copy_count(synthetic, train[0], heldout[0], extractor=feature_net)
    common = _common(modality, site, len(train[0]), len(heldout[0]))
    result = {
        **common,
        "attacks": attack_summaries(scores, delta=common["delta"]),
        "fidelity": {
            "feature_stats": real_feature_stats(real_features.numpy()),
            "kid": kid_at_site(real_features, synthetic_features, seed=config.seed),
            "prdc": prdc(real_features, synthetic_features),
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
            steps=AUDIT_UTILITY_STEPS,
        ),
    }
    return result, scores


# --------------------------------------------------------------------------- text


@torch.no_grad()
def text_note_logprobs(model, dataset: TensorDataset) -> list[np.ndarray]:
    """Per example, the log-probs of the note's tokens (those under its loss mask)."""
    model.eval()
    out = []
    for start in range(0, len(dataset), TEXT_SCORE_BATCH):
        input_ids, attention_mask, loss_mask = dataset[start : start + TEXT_SCORE_BATCH]
        logprobs = token_logprobs(model, input_ids, attention_mask)
        out += [row[mask.bool()].double().numpy() for row, mask in zip(logprobs, loss_mask)]
    return out


def text_member_scores(modality: Modality, site: SiteData, model) -> Scores:
    """Loss, zlib and min-k scores of the site's train (members) and held-out (non-members) notes."""
    records = text_splits(site, seed=modality.config.data.split_seed)
    per_split = [
        text_attack_scores(text_note_logprobs(model, dataset), [text for text, _ in split])
        for dataset, split in zip(modality.datasets(site), records)
    ]
    return {name: (per_split[0][name], per_split[1][name]) for name in TEXT_ATTACKS}


def _read_jsonl(path: Path) -> list[dict]:
    """A demo side file (canaries.jsonl, phi_truth.jsonl); absent = empty."""
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise FedgenError(f"{path} line {number}: not valid JSON ({err.msg})") from None
    return rows


def _train_indices(site: SiteData, config: RunConfig) -> set[int]:
    train, _ = split_indices(
        site.text_labels, heldout_fraction=site.heldout_fraction, seed=config.data.split_seed
    )
    return set(train.tolist())


def _trained_canaries(site: SiteData, config: RunConfig) -> list[dict]:
    """The site's canaries that sit in its train split (a held-out canary was never seen)."""
    train = _train_indices(site, config)
    return [c for c in _read_jsonl(site.root / CANARIES_FILE) if c["index"] in train]


def _random_like(secret: str, rng: random.Random) -> str:
    """A random string of the secret's format: digits, lower- and upper-case letters redrawn."""

    def redraw(char: str) -> str:
        if char in string.digits:
            return rng.choice(string.digits)
        if char in string.ascii_lowercase:
            return rng.choice(string.ascii_lowercase)
        if char in string.ascii_uppercase:
            return rng.choice(string.ascii_uppercase)
        return char

    return "".join(redraw(char) for char in secret)


def _candidate_secrets(secret: str, *, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    candidates: set[str] = set()
    while len(candidates) < n:
        candidate = _random_like(secret, rng)
        if candidate != secret:
            candidates.add(candidate)
    return sorted(candidates)


def _note_losses(model, modality: Modality, records: list[tuple[str, str]]) -> np.ndarray:
    """Mean note NLL of (label name, note) records."""
    dataset = encode_examples(
        modality.tokenizer(),
        records,
        template=modality.config.text.prompt_template,
        max_length=modality.config.text.max_length,
    )
    return np.array([-lp.mean() for lp in text_note_logprobs(model, dataset)])


def canary_exposure_at_site(
    modality: Modality, site: SiteData, model, *, candidates: int = CANARY_CANDIDATES
) -> dict:
    """The largest exposure among the site's trained canaries (None when it has none).

    Each canary is ranked by loss among ``candidates`` notes of its template with random
    secrets of the same format.
    """
    canaries = _trained_canaries(site, modality.config)
    if not canaries:
        return {"exposure": None, "n_canaries": 0, "candidates": candidates}
    exposures = []
    for k, canary in enumerate(canaries):
        secrets = [canary["secret"], *_candidate_secrets(canary["secret"], n=candidates, seed=modality.config.seed + k)]
        notes = [canary["template"].replace(SECRET_SLOT, s) for s in secrets]
        losses = _note_losses(model, modality, [(canary["label"], note) for note in notes])
        exposures.append(canary_exposure(float(losses[0]), losses[1:]))
    return {"exposure": max(exposures), "n_canaries": len(canaries), "candidates": candidates}


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = WORD_PATTERN.findall(text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def text_memorisation(
    synthetic_texts: Sequence[str], site: SiteData, config: RunConfig, *, ngram_n: int = NGRAM_N
) -> dict:
    """How many synthetic texts reproduce something of this site's TRAIN split.

    - ``canary_reproductions``: texts containing the secret of a trained canary;
    - ``planted_phi_reproductions``: texts containing a planted PHI value (phi_truth.jsonl) of a
      train record, of at least MIN_MATCH_CHARS characters;
    - ``ngram_copies``: texts sharing a ``ngram_n``-word sequence with a training note that no
      held-out note contains (phrases every note shares are style, not memorisation).
    """
    train_index = _train_indices(site, config)
    secrets = [c["secret"] for c in _trained_canaries(site, config)]
    phi_values = {
        row["value"]
        for row in _read_jsonl(site.root / PHI_TRUTH_FILE)
        if row["index"] in train_index and len(row["value"]) >= MIN_MATCH_CHARS
    }
    train_grams: set[tuple[str, ...]] = set()
    heldout_grams: set[tuple[str, ...]] = set()
    for i, text in enumerate(site.texts):
        (train_grams if i in train_index else heldout_grams).update(_ngrams(text, ngram_n))
    copied = train_grams - heldout_grams
    return {
        "canary_reproductions": sum(any(s in t for s in secrets) for t in synthetic_texts),
        "planted_phi_reproductions": sum(any(v in t for v in phi_values) for t in synthetic_texts),
        "ngram_copies": sum(bool(_ngrams(t, ngram_n) & copied) for t in synthetic_texts),
        "ngram_n": ngram_n,
        "n_synthetic": len(synthetic_texts),
    }


def text_site_audit(modality: Modality, site: SiteData, model, content: RecordDict) -> tuple[dict, Scores]:
    """Attacks, canaries, memorisation, fidelity and utility of the synthetic texts on this site's notes."""
    config = modality.config
    names = config.data.text_classes
    train, heldout = text_splits(site, seed=config.data.split_seed)
    synthetic = content[SYNTHETIC_TEXTS]
    synthetic_texts = [str(t) for t in synthetic["texts"]]
    synthetic_labels = [int(x) for x in synthetic["labels"]]
    scores = text_member_scores(modality, site, model)

    def unzip(records):
        return [text for text, _ in records], [label for _, label in records]

    common = _common(modality, site, len(train), len(heldout))
    result = {
        **common,
        "attacks": attack_summaries(scores, delta=common["delta"]),
        "canary_exposure": canary_exposure_at_site(modality, site, model),
        "memorisation": text_memorisation(synthetic_texts, site, config),
        "fidelity": {
            "embedding_stats": text_embedding_stats(site.texts),
            "class_stats": text_class_stats(site.texts, site.text_labels, class_names=names),
        },
        "utility": text_utility(
            unzip(train), unzip(heldout), (synthetic_texts, synthetic_labels), class_names=names, seed=config.seed
        ),
    }
    return result, scores


SITE_AUDITS = {"image": image_site_audit, "text": text_site_audit}
ATTACK_SCORES = {"image": image_attack_scores, "text": text_member_scores}
