"""The coordinator's side of the audit: ask every site, pool the answers, assemble report.json.

The coordinator holds the final model, the synthetic data and the privacy ledger, never a real
record. ``audit_report`` sends each site a Flower query (clients/audit.py answers it where the
data lives) and pools the aggregates that come back:

- membership: per attack, the sites' score histograms on shared edges are summed into the
  pooled attack summary, ROC curve and empirical ε; each site's exact summary is kept beside;
- memorisation, fidelity and utility: sums and weighted means of the sites' aggregates
  (audits/fidelity.py and audits/utility.py say which pooled figures are exact);
- privacy: ε per site per round from the ledger (what is GUARANTEED, never mixed with the
  measured figures above);
- PHI: the scanner (audits/phi.py) runs here on the synthetic texts, which the coordinator has.

The image feature extractor is a FeatureNet the coordinator trains on the synthetic images
only (their labels are known): no real record, no download, and the same weights at every
site, so the sites' feature statistics pool into one FID. With ``inception`` (``fedgen audit RUN
--inception PATH``) the fidelity figures (FID, KID, precision/recall/density/coverage) use a
local TorchScript Inception detector instead, loaded from the same path at the coordinator and
at every site; near copies and utility keep the FeatureNet (they need its classifier, or must
not change with the fidelity extractor). FeatureNet FID and Inception FID are not comparable.

Everything the audit needs is read from the run folder, so it runs on either engine:
``run_audit`` on the simulation engine (the run's simulated sites), ``audit_and_write`` inside
the ServerApp a SuperLink starts with the run config ``task = "audit"`` (server/app.py; the
coordinator submits it with ``fedgen audit RUN --deployment``).

JSON conventions of the report: ε without DP is the float ``inf`` (written by ``json.dumps``
as ``Infinity``); a figure that could not be computed is ``None`` with a sibling ``"note"``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from rich.console import Console
from torch import Tensor

from fedgen.audits.empirical_eps import empirical_epsilon_from_histograms
from fedgen.audits.features import (
    FeatureExtractor,
    FeatureNet,
    InceptionFeatures,
    extract_features,
    load_inception,
    train_feature_net,
)
from fedgen.audits.fidelity import (
    NEAR_COPY_QUANTILE,
    fid_from_stats,
    pool_near_copies,
    pool_sums,
    pool_text_class_stats,
    pool_weighted_mean,
    summarise_text_class_stats,
    synthetic_feature_stats,
    text_class_stats,
    text_embedding_stats,
    text_fidelity,
)
from fedgen.audits.gate import Policy
from fedgen.audits.mia import FPR_LEVEL_01PCT, FPR_LEVEL_1PCT, metrics_from_histograms
from fedgen.audits.report import record_decision, synthetic_manifest, write_report
from fedgen.audits.utility import pool_utility
from fedgen.clients.audit import (
    NGRAM_N,
    QUERY_AUDIT,
    QUERY_HISTOGRAMS,
    make_query,
    unpack_reply,
)
from fedgen.artifacts import RunDir
from fedgen.config import RunConfig
from fedgen.data.site import IMAGE_SUFFIXES, load_images
from fedgen.errors import FedgenError
from fedgen.files import read_text_records
from fedgen.modalities import get_modality
from fedgen.pretrain import PROVENANCE_NAME
from fedgen.privacy.ledger import PrivacyLedger

__all__ = [
    "HISTOGRAM_BINS",
    "AuditInputs",
    "prepare_inputs",
    "load_synthetic_images",
    "load_synthetic_texts",
    "shared_edges",
    "audit_sites",
    "assemble_report",
    "trained_sites",
    "audit_report",
    "audit_and_write",
    "make_audit_app",
    "run_audit",
]

HISTOGRAM_BINS = 200
# The shared edges span the sites' central score ranges widened by this fraction on each
# side; scores beyond fall into the end bins (which keeps their order relative to the rest).
HISTOGRAM_MARGIN = 0.5
MAX_ROC_POINTS = 200
FEATURE_NET_EPOCHS = 10
NODE_WAIT_SECONDS = 120.0
NODE_POLL_SECONDS = 0.5
VERSIONED_PACKAGES = ("fedgen", "torch", "flwr", "opacus", "diffusers", "transformers", "peft", "presidio-analyzer")
FEATURE_NET_TRAINED_ON = "the run's synthetic images only, no real data"
IMAGE_FIDELITY_KEYS = ("precision", "recall", "density", "coverage")

console = Console(stderr=True)


def _say(progress: bool, text: str) -> None:
    if progress:
        console.print(f"audit: {text}", highlight=False)


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class AuditInputs:
    """What the coordinator holds for the audit: model states and synthetic data per modality."""

    run: RunDir
    config: RunConfig
    model_states: dict[str, dict[str, Tensor]]
    synthetic_images: tuple[Tensor, Tensor] | None = None  # [N, C, H, W] in [-1, 1], labels [N]
    synthetic_texts: tuple[list[str], list[int]] | None = None
    feature_net: FeatureNet | None = None
    inception: InceptionFeatures | None = None  # the fidelity extractor, if the user chose Inception

    @property
    def fidelity_extractor(self) -> FeatureExtractor | None:
        return self.feature_net if self.inception is None else self.inception


def _generate_first(run: RunDir, modality: str) -> FedgenError:
    return FedgenError(f"{run.root} has no synthetic {modality} data: run `fedgen generate {run.root} --modality {modality}` first")


def load_synthetic_images(run: RunDir, config: RunConfig) -> tuple[Tensor, Tensor]:
    """synthetic/images/<class>/*.png as [N, C, H, W] in [-1, 1] (like the sites' images) + labels."""
    root = run.synthetic / "images"
    classes = config.data.image_classes
    paths, labels = [], []
    if root.is_dir():
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if folder.name not in classes:
                raise FedgenError(f"{folder}: {folder.name!r} is not one of the run's image classes {classes}")
            files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            paths += files
            labels += [classes.index(folder.name)] * len(files)
    if not paths:
        raise _generate_first(run, "image")
    images = load_images(paths, resolution=config.image.resolution, channels=config.image.channels)
    return images, torch.tensor(labels, dtype=torch.long)


def load_synthetic_texts(run: RunDir, config: RunConfig) -> tuple[list[str], list[int]]:
    """synthetic/texts.jsonl as (texts, class indices)."""
    path = run.synthetic / "texts.jsonl"
    if not path.is_file():
        raise _generate_first(run, "text")
    classes = config.data.text_classes
    texts, labels = [], []
    for number, record in enumerate(read_text_records(path), start=1):
        if record.get("label") not in classes:
            raise FedgenError(f"{path} line {number}: label {record.get('label')!r} is not in the class list {classes}")
        texts.append(record["text"])
        labels.append(classes.index(record["label"]))
    if not texts:
        raise _generate_first(run, "text")
    return texts, labels


def _checkpoint_state(run: RunDir, config: RunConfig, modality_name: str) -> dict[str, Tensor]:
    """The trained tensors of the last complete checkpoint, keyed as the sites' models expect."""
    modality = get_modality(modality_name, config, work_dir=run.base_models)
    expected = modality.get_state(modality.build_model()).keys()
    saved = modality.load(run.checkpoint(modality_name)).state_dict()
    return {key: saved[key].detach().clone() for key in expected}


def prepare_inputs(run: RunDir, *, inception: str | Path | None = None, progress: bool = False) -> AuditInputs:
    """Load checkpoints and synthetic data, and train the shared image feature extractor.

    ``inception``: a local TorchScript Inception file for the image fidelity figures.
    """
    config = run.config()
    modalities = config.modalities
    synthetic_images = load_synthetic_images(run, config) if "image" in modalities else None
    synthetic_texts = load_synthetic_texts(run, config) if "text" in modalities else None
    detector = None
    if inception is not None and synthetic_images is not None:
        detector = load_inception(Path(inception).resolve())  # the sites get this absolute path
    states = {name: _checkpoint_state(run, config, name) for name in modalities}
    feature_net = None
    if synthetic_images is not None:
        _say(progress, f"training the feature extractor on {len(synthetic_images[1])} synthetic images")
        feature_net = train_feature_net(
            *synthetic_images,
            num_classes=len(config.data.image_classes),
            trained_on=FEATURE_NET_TRAINED_ON,
            epochs=FEATURE_NET_EPOCHS,
            seed=config.seed,
        )
    return AuditInputs(run, config, states, synthetic_images, synthetic_texts, feature_net, detector)


# --------------------------------------------------------------------------- asking the sites


def _wait_for_nodes(grid: Grid, expected: int) -> list[int]:
    deadline = time.monotonic() + NODE_WAIT_SECONDS
    while len(nodes := sorted(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise FedgenError(
                f"only {len(nodes)} of {expected} sites connected for the audit within {NODE_WAIT_SECONDS:.0f} s"
            )
        time.sleep(NODE_POLL_SECONDS)
    return nodes


def _error_line(reason: str) -> str:
    """One line from a Flower error reason (in simulation the exception text follows "Message: ")."""
    last = reason.rsplit("Message: ", 1)[-1]
    lines = [line.strip() for line in last.splitlines() if line.strip()]
    return (lines[-1] if lines else "no reason given").removesuffix("'>")


def _ask(grid: Grid, nodes: Sequence[int], content: RecordDict, *, timeout: float, what: str) -> list[dict]:
    messages = [
        Message(content=content, dst_node_id=node, message_type=MessageType.QUERY) for node in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    failed = [r for r in replies if r.has_error()]
    if failed:
        raise FedgenError(f"a site could not answer the {what}: {_error_line(failed[0].error.reason)}")
    if len(replies) < len(nodes):
        raise FedgenError(f"{len(nodes) - len(replies)} of {len(nodes)} sites did not answer the {what} within {timeout:.0f} s")
    answers = sorted((unpack_reply(r.content) for r in replies), key=lambda r: r["site"])
    names = [answer["site"] for answer in answers]
    if len(set(names)) < len(names):
        raise FedgenError(f"two sites answered the {what} under one name: {names} (is a site folder served twice?)")
    return answers


def shared_edges(ranges: Sequence[Sequence[float]], *, bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """Bin edges over the union of the sites' central score ranges, widened by HISTOGRAM_MARGIN."""
    low = min(r[0] for r in ranges)
    high = max(r[1] for r in ranges)
    width = high - low if high > low else max(abs(low), 1.0)
    return np.linspace(low - HISTOGRAM_MARGIN * width, high + HISTOGRAM_MARGIN * width, bins + 1)


def audit_sites(grid: Grid, inputs: AuditInputs, *, expected_sites: int, progress: bool = False) -> dict[str, list[dict]]:
    """Per modality, every site's answers (sorted by site name), histograms included."""
    config = inputs.config
    nodes = _wait_for_nodes(grid, expected_sites)
    timeout = config.federation.round_timeout
    answers = {}
    for name in config.modalities:
        state = inputs.model_states[name]
        _say(progress, f"{name}: asking {len(nodes)} sites")
        audit = make_query(
            config,
            name,
            QUERY_AUDIT,
            model_state=state,
            synthetic_images=inputs.synthetic_images if name == "image" else None,
            synthetic_texts=inputs.synthetic_texts if name == "text" else None,
            feature_net=inputs.feature_net if name == "image" else None,
            inception=inputs.inception.path if name == "image" and inputs.inception is not None else None,
        )
        first = _ask(grid, nodes, audit, timeout=timeout, what=f"{name} audit")
        edges = {
            attack: shared_edges([site["attacks"][attack]["score_range"] for site in first])
            for attack in first[0]["attacks"]
        }
        _say(progress, f"{name}: collecting score histograms")
        histograms = make_query(config, name, QUERY_HISTOGRAMS, model_state=state, edges=edges)
        second = {r["site"]: r["histograms"] for r in _ask(grid, nodes, histograms, timeout=timeout, what=f"{name} histograms")}
        answers[name] = [{**site, "histograms": second[site["site"]], "edges": edges} for site in first]
    return answers


# --------------------------------------------------------------------------- pooling


def _thin_curve(fpr: np.ndarray, tpr: np.ndarray, max_points: int = MAX_ROC_POINTS) -> dict:
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), max_points)).round().astype(int))
    return {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist()}


def _with_note(summary: dict) -> dict:
    """An attack summary with a "note" saying why a TPR at low FPR is null."""
    unresolved = [
        f"{key} needs at least {math.ceil(1 / level)} non-members, the audit has {summary['n_nonmembers']}"
        for key, level in (("tpr_at_1pct_fpr", FPR_LEVEL_1PCT), ("tpr_at_01pct_fpr", FPR_LEVEL_01PCT))
        if summary[key] is None
    ]
    return {**summary, "note": "; ".join(unresolved)} if unresolved else summary


def _membership(name: str, sites: list[dict]) -> dict:
    delta = max(site["delta"] for site in sites)  # the weakest guarantee among the sites
    attacks, bounds = {}, {}
    for attack, edges in sites[0]["edges"].items():
        members = sum(site["histograms"][attack]["members"] for site in sites)
        nonmembers = sum(site["histograms"][attack]["nonmembers"] for site in sites)
        pooled = metrics_from_histograms(members, nonmembers, edges)
        attacks[attack] = {
            "pooled": _with_note({**pooled.to_dict(), "roc": _thin_curve(pooled.fpr, pooled.tpr)}),
            "sites": {site["site"]: _with_note(site["attacks"][attack]["summary"]) for site in sites},
        }
        bound = empirical_epsilon_from_histograms(members, nonmembers, edges, delta=delta)
        bounds[attack] = {
            "eps_lb": bound.eps_lb,
            "max_certifiable": bound.max_certifiable,
            "n_members": bound.n_members,
            "n_nonmembers": bound.n_nonmembers,
            "delta": delta,
            "sites": {site["site"]: site["attacks"][attack]["empirical_epsilon"] for site in sites},
        }
    section = {"attacks": attacks, "empirical_epsilon": bounds}
    exposures = {s["site"]: s["canary_exposure"]["exposure"] for s in sites if "canary_exposure" in s}
    if any(e is not None for e in exposures.values()):  # only sites with a trained canary
        section["canary_exposure"] = {site: e for site, e in exposures.items() if e is not None}
    return section


def _privacy(run: RunDir, config: RunConfig, budgets: dict[tuple[str, str], float]) -> dict:
    """GUARANTEED ε from the ledger: per site and modality, cumulative after each round.

    A site's budget is the one it reported (its site.toml may lower the consortium's).
    """
    ledger = PrivacyLedger(run.ledger_path)
    sites: dict[str, dict] = {}
    for site in ledger.sites():
        for modality in config.modalities:
            rows = ledger.entries(site=site, modality=modality)
            if not rows:
                continue
            sites.setdefault(site, {})[modality] = {
                "epsilon": rows[-1].epsilon,
                "delta": rows[-1].delta,
                "budget": budgets.get((site, modality), config.privacy.epsilon),
                "rounds": [{"round": r.round, "epsilon": r.epsilon} for r in rows],
                "noise_multiplier": rows[-1].noise_multiplier,
            }
    epsilons = [m["epsilon"] for s in sites.values() for m in s.values()]
    section = {"sites": sites, "epsilon_max": max(epsilons) if epsilons else None}
    if not epsilons:
        section["note"] = "the ledger holds no training round"
    return section


def _extractor_description(inputs: AuditInputs) -> str:
    if inputs.inception is not None:
        return (
            f"{inputs.inception.description}; {inputs.inception.num_features}-d features (Inception FID, not "
            "comparable with FeatureNet FID); near copies and utility use the FeatureNet trained on "
            f"{FEATURE_NET_TRAINED_ON}"
        )
    net = inputs.feature_net
    return (
        f"{net.description}; {FEATURE_NET_EPOCHS} epochs, {net.num_features}-d features "
        "(FeatureNet FID, not comparable with Inception FID)"
    )


def _image_fidelity(inputs: AuditInputs, sites: list[dict]) -> dict:
    fidelity = [site["fidelity"] for site in sites]
    synthetic = extract_features(inputs.fidelity_extractor, inputs.synthetic_images[0]).numpy()
    real_stats = pool_sums([f["feature_stats"] for f in fidelity])
    prdc = pool_weighted_mean([f["prdc"] for f in fidelity], keys=IMAGE_FIDELITY_KEYS, weight_key="n_real")
    result = {
        "extractor": _extractor_description(inputs),
        "fid_name": "FeatureNet FID" if inputs.inception is None else "Inception FID",
        "fid": fid_from_stats(real_stats, synthetic_feature_stats(synthetic)),
        "kid": pool_weighted_mean([f["kid"] for f in fidelity], keys=("kid_mean",), weight_key="n_real")["kid_mean"],
        **{key: prdc[key] for key in IMAGE_FIDELITY_KEYS},
        "n_real": int(real_stats["n"]),
        "n_synthetic": len(synthetic),
    }
    scored = [f["similarity"] for f in fidelity if f["similarity"]["n"] > 0]
    if scored:
        similarity = pool_weighted_mean(scored, keys=("ssim_mean", "psnr_mean"), weight_key="n")
        result |= {"ssim": similarity["ssim_mean"], "psnr": similarity["psnr_mean"]}
    else:
        result |= {"ssim": None, "psnr": None, "note": "no site holds real images of the synthetic classes"}
    return result


def _text_fidelity(inputs: AuditInputs, sites: list[dict]) -> dict:
    texts, labels = inputs.synthetic_texts
    names = inputs.config.data.text_classes
    real = pool_sums([site["fidelity"]["embedding_stats"] for site in sites])
    real_classes = summarise_text_class_stats(pool_text_class_stats([site["fidelity"]["class_stats"] for site in sites]))
    synthetic_classes = summarise_text_class_stats(text_class_stats(texts, labels, class_names=names, real=False))
    return {
        **text_fidelity(real, text_embedding_stats(texts, real=False)),
        "per_class": {name: {"real": real_classes[name], "synthetic": synthetic_classes[name]} for name in names},
    }


UTILITY_KEYS = ("accuracy", "macro_f1", "per_class_f1", "n_test")


def _utility(sites: list[dict]) -> dict:
    pooled = pool_utility([site["utility"] for site in sites])
    configs = {name: {key: c[key] for key in UTILITY_KEYS} for name, c in pooled["configurations"].items()}
    real_f1, synthetic_f1 = configs["real"]["macro_f1"], configs["synthetic"]["macro_f1"]
    result = {
        "classifier": pooled["classifier"],
        "configs": configs,
        "synthetic_to_real_ratio": synthetic_f1 / real_f1 if real_f1 > 0 else None,
        "sites": {
            site["site"]: {
                name: {key: c[key] for key in UTILITY_KEYS} for name, c in site["utility"]["configurations"].items()
            }
            for site in sites
        },
    }
    if real_f1 == 0:
        result["note"] = "synthetic_to_real_ratio: the real-data classifier scored macro-F1 0"
    return result


def _image_memorisation(sites: list[dict]) -> dict:
    pooled = pool_near_copies([site["memorisation"] for site in sites])
    return {
        "near_copies_pixel": pooled["pixel_count"],
        "near_copies_feature": pooled.get("feature_count"),
        "n_synthetic": sites[0]["memorisation"]["n_synthetic"],
        "quantile": NEAR_COPY_QUANTILE,
        "sites": {
            site["site"]: {"pixel": site["memorisation"]["pixel"]["count"], "feature": site["memorisation"]["feature"]["count"]}
            for site in sites
        },
    }


MEMORISATION_COUNTS = ("canary_reproductions", "planted_phi_reproductions", "ngram_copies")


def _phi(texts: list[str], sites: list[dict], *, progress: bool) -> dict:
    from fedgen.audits.phi import build_analyzer, redact, scan

    _say(progress, f"scanning {len(texts)} synthetic texts for PHI")
    analyzer = build_analyzer()
    findings = scan(analyzer, texts)
    counts: dict[str, int] = {}
    for finding in findings:
        counts[finding.entity_type] = counts.get(finding.entity_type, 0) + 1
    per_site = {site["site"]: {key: site["memorisation"][key] for key in MEMORISATION_COUNTS} for site in sites}
    return {
        "engine": analyzer.engine,
        "n_texts": len(texts),
        "findings": [
            {**f.to_dict(), "redacted": redact(texts[f.index][f.start : f.end])} for f in findings
        ],
        "counts": counts,
        "memorisation": {
            **{key: sum(s[key] for s in per_site.values()) for key in MEMORISATION_COUNTS},
            "ngram_n": NGRAM_N,
            "sites": per_site,
        },
    }


def _versions() -> dict[str, str | None]:
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _synthetic(inputs: AuditInputs) -> dict:
    run = inputs.run
    sheet = run.synthetic / "contact-sheet.png"
    return {
        "images_dir": str(run.synthetic / "images") if inputs.synthetic_images is not None else None,
        "contact_sheet": str(sheet) if inputs.synthetic_images is not None and sheet.is_file() else None,
        "texts": str(run.synthetic / "texts.jsonl") if inputs.synthetic_texts is not None else None,
        "n_images": 0 if inputs.synthetic_images is None else len(inputs.synthetic_images[1]),
        "n_texts": 0 if inputs.synthetic_texts is None else len(inputs.synthetic_texts[0]),
    }


def _check_coverage(run: RunDir, answers: dict[str, list[dict]]) -> None:
    """The sites that answered are exactly the sites that trained: no partial evidence."""
    ledger = PrivacyLedger(run.ledger_path)
    for name, sites in answers.items():
        trained = {entry.site for entry in ledger.entries(modality=name)}
        answered = {site["site"] for site in sites}
        if trained - answered:
            raise FedgenError(f"{', '.join(sorted(trained - answered))} trained the {name} model but did not answer the audit")
        if answered - trained:
            raise FedgenError(f"{', '.join(sorted(answered - trained))} answered the {name} audit but never trained (not in the ledger)")


def _pretraining(run: RunDir) -> dict | None:
    """What the image model was pretrained on (written by fedgen.pretrain.create_run), if anything."""
    record = run.root / PROVENANCE_NAME
    return json.loads(record.read_text(encoding="utf-8")) if record.is_file() else None


def assemble_report(inputs: AuditInputs, answers: dict[str, list[dict]], *, progress: bool = False) -> dict:
    """report.json (without "gate") from the sites' answers, the ledger and the synthetic data."""
    run, config = inputs.run, inputs.config
    _check_coverage(run, answers)
    budgets = {(site["site"], name): site["budget"] for name, sites in answers.items() for site in sites}
    report = {
        "run": {
            "id": run.root.name,
            "root": str(run.root.resolve()),
            "modalities": config.modalities,
            "config": config.model_dump(),
            "versions": _versions(),
            "dp": config.privacy.enabled,
            "pretraining": _pretraining(run),
            "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "privacy": _privacy(run, config, budgets),
        "membership": {name: _membership(name, sites) for name, sites in answers.items()},
        "fidelity": {},
        "utility": {name: _utility(sites) for name, sites in answers.items()},
        "synthetic": _synthetic(inputs),
    }
    if "image" in answers:
        report["image_memorisation"] = _image_memorisation(answers["image"])
        report["fidelity"]["image"] = _image_fidelity(inputs, answers["image"])
    if "text" in answers:
        report["phi"] = _phi(inputs.synthetic_texts[0], answers["text"], progress=progress)
        report["fidelity"]["text"] = _text_fidelity(inputs, answers["text"])
    return report


# --------------------------------------------------------------------------- entry points


def trained_sites(run: RunDir) -> list[str]:
    """The sites the ledger says trained: the ones the audit must hear from."""
    return PrivacyLedger(run.ledger_path).sites()


def audit_report(
    grid: Grid, run: RunDir, *, expected_sites: int, inception: str | Path | None = None, progress: bool = False
) -> dict:
    """report.json (without "gate") from the sites reachable through ``grid``.

    Everything comes from the run folder (and the Inception path, if any), so the same function
    serves a ServerApp started by the simulation and one started by a SuperLink from its run config.
    """
    inputs = prepare_inputs(run, inception=inception, progress=progress)
    answers = audit_sites(grid, inputs, expected_sites=expected_sites, progress=progress)
    return assemble_report(inputs, answers, progress=progress)


def audit_and_write(
    grid: Grid, run: RunDir, *, policy: Policy, inception: str | Path | None = None, progress: bool = True
) -> tuple[Path, Path]:
    """The whole audit of a run whose sites connect through ``grid`` (deployment): ask every
    site that trained, apply the gate, write audit/report.json and report.html (each atomically)."""
    audited_files = synthetic_manifest(run.synthetic)  # fingerprints of what is audited
    report = audit_report(grid, run, expected_sites=len(trained_sites(run)), inception=inception, progress=progress)
    json_path, html_path = write_report(run.audit, record_decision(report, policy, audited_files=audited_files))
    _say(progress, f"report written: {html_path}")
    return json_path, html_path


def make_audit_app(
    run: RunDir, *, expected_sites: int, sink: dict, inception: str | Path | None = None, progress: bool = False
) -> ServerApp:
    """A ServerApp that audits the run on every site and leaves the report in ``sink["report"]``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        sink["report"] = audit_report(grid, run, expected_sites=expected_sites, inception=inception, progress=progress)

    return app


def run_audit(
    run: RunDir, *, sites: list[Path] | None = None, inception: str | Path | None = None, progress: bool = True
) -> dict:
    """Audit a simulated run on its sites (default: the run's simulated sites); return report.json."""
    from fedgen.simulations.runner import run_on_simulated_sites

    site_dirs = run.simulated_sites() if sites is None else list(sites)
    sink: dict = {}
    app = make_audit_app(run, expected_sites=len(site_dirs), sink=sink, inception=inception, progress=progress)
    run_on_simulated_sites(app, site_dirs)
    return sink["report"]
