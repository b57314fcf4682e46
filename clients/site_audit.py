"""Site-side audits: answer the coordinator's audit queries on the site's OWN records.

The coordinator sends, as a Flower query message (layout: fedgen.protocol), the run
configuration, the final model's trained state, the synthetic data and, if the user chose
Inception for the image fidelity figures, the path of the TorchScript detector, which every site
loads from its own disk (weights never travel); otherwise each site measures image fidelity in
the space of its own FeatureNet, trained on its real train split (fedgen.clients.image_audit).
The site scores its train split (members) against its held-out split (non-members) and
replies with aggregates only: counts, sums, scalar summaries and, per attack, a histogram on
bins the site chose (fedgen.audits.site_answers). No record, no per-example score and no real
image leaves the site.

The site's policy (fedgen.site_policy) decides which queries it answers and how often: each
query about one trained model (identified by its digest) is answered at most
``audit_answers`` times, counted in SITE_DIR/.fedgen/audit-answers.json before the answer is
computed (a failed answer counts too; queries that arrive together are counted one after
the other, under a lock). Memorisation counts are given on one synthetic set per
model only (the first the site was asked about) and only when it holds at least
``MIN_SYNTHETIC_ITEMS`` items, so they cannot be used to test candidate records one at a time.
The reply names the digest of the synthetic set it counted on.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from flwr.app import RecordDict
from torch import Tensor

from fedgen.audits.features import load_inception
from fedgen.clients.image_audit import image_site_audit
from fedgen.clients.local import with_node_policy
from fedgen.clients.text_audit import text_site_audit
from fedgen.config import config_from_toml
from fedgen.data.site import SiteData, load_site
from fedgen.errors import FedgenError
from fedgen.files import write_json
from fedgen.modalities import Modality, get_modality
from fedgen.protocol import (
    CONFIG,
    INCEPTION,
    MODEL,
    QUERY_AUDIT,
    SYNTHETIC_IMAGES,
    SYNTHETIC_TEXTS,
    pack_reply,
    record_digest,
)

__all__ = ["answer_query", "ANSWERS_FILE", "MIN_SYNTHETIC_ITEMS"]

ANSWERS_FILE = "audit-answers.json"  # in the site's state folder
# Fewer synthetic items than this and a memorisation count says too much about each of them.
MIN_SYNTHETIC_ITEMS = 20


def answer_query(
    content: RecordDict, site_dir: Path, *, work_dir: Path, node_config: Mapping[str, object] | None = None
) -> RecordDict:
    """Answer one audit query on the site in ``site_dir``; the reply holds aggregates only.

    ``work_dir`` is the site's state folder (the demo's tiny base model, the answer counts);
    ``node_config`` the SuperNode's, whose policy settings override site.toml.
    """
    settings = content[CONFIG]
    config = config_from_toml(str(settings["run-config"]))
    torch.set_num_threads(config.federation.threads_per_site)
    modality_name, query = str(settings["modality"]), str(settings["query"])
    # Every modality of the run: the site's budget and δ cover all of them (fedgen.privacy.plan).
    site = load_site(site_dir, config.data, modalities=tuple(config.modalities), channels=config.image.channels)
    site = with_node_policy(site, node_config or {})
    modality = get_modality(modality_name, config, work_dir=work_dir)
    synthetic = content[SYNTHETIC_IMAGES if modality_name == "image" else SYNTHETIC_TEXTS]
    try:
        if query != QUERY_AUDIT:
            raise FedgenError(f"refuses the unknown audit query {query!r}")
        synthetic_digest = record_digest(synthetic)
        _count_answer(
            site,
            work_dir,
            modality=modality_name,
            query=query,
            model=record_digest(content[MODEL]),
            synthetic=synthetic_digest,
            n_synthetic=_count(synthetic),
        )
        model = _trained_model(modality, content[MODEL].to_torch_state_dict())
        result = _site_audit(modality, site, model, content)
    except FedgenError as err:
        raise FedgenError(f"{site.name}: {err}") from None
    return pack_reply({"site": site.name, "modality": modality_name, "synthetic_digest": synthetic_digest, **result})


def _count(synthetic) -> int:
    """Items in a synthetic-data record: labels are an Array (images) or a list (texts)."""
    labels = synthetic["labels"]
    return len(labels) if isinstance(labels, list) else labels.shape[0]


def _count_answer(
    site: SiteData, work_dir: Path, *, modality: str, query: str, model: str, synthetic: str, n_synthetic: int
) -> None:
    """Refuse what the site's policy does not answer; else count this answer before it is computed."""
    policy = site.policy
    if query not in policy.audit_queries:
        allowed = ", ".join(policy.audit_queries) or "none"
        raise FedgenError(f"refuses the {query} query: its policy answers {allowed} (audit_queries)")
    if n_synthetic < MIN_SYNTHETIC_ITEMS:
        raise FedgenError(
            f"refuses to count memorisation on {n_synthetic} synthetic {modality} items: it needs at least "
            f"{MIN_SYNTHETIC_ITEMS} (generate more)"
        )
    path = work_dir / ANSWERS_FILE
    with _locked(path.with_name(ANSWERS_FILE + ".lock")):
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"answers": {}, "synthetic": {}}
        key = f"{model}/{modality}"
        answered = record["answers"].get(f"{key}/{query}", 0)
        if answered >= policy.audit_answers:
            raise FedgenError(
                f"refuses to answer the {modality} {query} query again: it answered it {answered} time(s) "
                f"about this model (audit_answers = {policy.audit_answers})"
            )
        if record["synthetic"].setdefault(key, synthetic) != synthetic:
            raise FedgenError(
                f"refuses a second synthetic {modality} set for this model: it counts memorisation on the "
                "first set it was asked about only"
            )
        record["answers"][f"{key}/{query}"] = answered + 1
        write_json(path, record)


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created if absent): queries answered at once, in
    threads or processes, read and count the answers one after the other, so that concurrent
    queries cannot all read the same count and all be answered past the policy."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _site_audit(modality: Modality, site: SiteData, model, content: RecordDict) -> dict:
    """The modality's site audit on the query's synthetic data (and shared extractor)."""
    if modality.name == "image":
        inception = load_inception(str(content[INCEPTION]["path"])) if INCEPTION in content else None
        return image_site_audit(modality, site, model, synthetic=_synthetic_images(content), inception=inception)
    synthetic = content[SYNTHETIC_TEXTS]
    texts, labels = [str(t) for t in synthetic["texts"]], [int(x) for x in synthetic["labels"]]
    return text_site_audit(modality, site, model, synthetic=(texts, labels))


def _trained_model(modality: Modality, model_state: dict[str, Tensor]):
    model = modality.build_model()
    modality.set_state(model, model_state)
    return model.eval()


def _synthetic_images(content: RecordDict) -> tuple[Tensor, Tensor]:
    record = content[SYNTHETIC_IMAGES]
    return torch.from_numpy(record["images"].numpy()), torch.from_numpy(record["labels"].numpy())
