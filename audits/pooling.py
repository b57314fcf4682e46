"""The coordinator pools the sites' audit answers, with the ledger and the synthetic data, into report.json.

- membership: per attack, the sites' score histograms, each on the bins its site chose, are
  pooled into the attack summary and ROC curve (expected counts) and the empirical ε (bounds,
  so it stays a lower bound); each site's exact summary is kept beside;
- memorisation, fidelity and utility: sums and weighted means of the sites' aggregates
  (audits/fidelity.py and audits/utility.py say which pooled figures are exact);
- privacy: ε per site, all modalities, and per round from the ledger (what is GUARANTEED, never mixed with the
  measured figures above);
- PHI: the scanner (audits/phi.py) runs here on the synthetic texts, which the coordinator has.

JSON conventions of the report: ε without DP is the float ``inf`` (written by ``json.dumps``
as ``Infinity``); a figure that could not be computed is ``None`` with a sibling ``"note"``. A
site too small for a figure answers why instead (``fidelity.not_measurable``): the pooled figure
is over the other sites, its section's ``"not_measured"`` maps each site left out to why (also
said in its ``"note"``), and the site's own entry is that reason.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata

import numpy as np

from fedgen.artifacts import RunDir
from fedgen.audits.bias import bias_view
from fedgen.audits.empirical_eps import empirical_epsilon_from_counts
from fedgen.audits.fidelity import (
    NEAR_COPY_QUANTILE,
    NOT_MEASURABLE,
    TEXT_EMBEDDING_DESCRIPTION,
    mean_over_classes,
    pool_class_fidelity,
    pool_near_copies,
    pool_sums,
    pool_text_class_stats,
    pool_weighted_mean,
    summarise_text_class_stats,
    text_class_stats,
    text_embedding_stats,
    text_fidelity,
)
from fedgen.audits.inputs import AuditInputs, say
from fedgen.audits.mia import FPR_LEVEL_01PCT, FPR_LEVEL_1PCT, metrics_from_histograms
from fedgen.audits.utility import competence, image_classifier, pool_utility
from fedgen.config import RunConfig
from fedgen.errors import FedgenError
from fedgen.pretrain import PROVENANCE_NAME
from fedgen.privacy.dp_sgd import noise_source
from fedgen.privacy.ledger import PrivacyLedger

__all__ = ["pool_histograms", "assemble_report", "trained_sites"]

MAX_ROC_POINTS = 200
VERSIONED_PACKAGES = ("fedgen", "torch", "flwr", "opacus", "diffusers", "transformers", "peft", "presidio-analyzer")


def _at_or_above(counts) -> np.ndarray:
    """Records at or above each of a site's edges (its first edge: all, its last: none)."""
    counts = np.asarray(counts, dtype=np.int64)
    return np.r_[np.cumsum(counts[::-1])[::-1], 0]


def pool_histograms(histograms: list[dict], side: str) -> dict:
    """The sites' ``side`` ("members" / "nonmembers") counts, each on its own edges
    (fedgen.audits.site_answers), pooled at every site's finite edge: the thresholds.

    - ``counts``: expected counts per pooled bin, a site's records spread evenly within its
      bins (its open end bins over the range the other sites' edges span): for the ROC curve;
    - ``surely`` / ``maybe``: per threshold, the records that are certainly / possibly at or
      above it (whole numbers): bounds for the ε lower bound, which must stay a lower bound.
    """
    thresholds = np.unique(np.concatenate([np.asarray(h["edges"])[1:-1] for h in histograms]))
    if len(thresholds) == 0:
        raise FedgenError("the sites' attack histograms have a single bin each: no threshold to pool")
    low, high = thresholds[0], thresholds[-1]
    expected = np.zeros(len(thresholds))
    surely = np.zeros(len(thresholds), dtype=np.int64)
    maybe = np.zeros(len(thresholds), dtype=np.int64)
    total = 0
    for histogram in histograms:
        edges = np.asarray(histogram["edges"], dtype=np.float64)
        above = _at_or_above(histogram[side])
        total += int(above[0])
        xp, fp = list(edges[1:-1]), list(above[1:-1])
        if not xp or low < xp[0]:
            xp, fp = [low, *xp], [above[0], *fp]
        if high > xp[-1]:
            xp, fp = [*xp, high], [*fp, 0]
        expected += np.interp(thresholds, xp, fp)
        surely += above[np.searchsorted(edges, thresholds, side="left")]
        maybe += above[np.searchsorted(edges, thresholds, side="right") - 1]
    at_or_above = np.r_[total, expected, 0]
    return {
        "edges": np.r_[-np.inf, thresholds, np.inf],
        "counts": at_or_above[:-1] - at_or_above[1:],
        "thresholds": thresholds,
        "surely": surely,
        "maybe": maybe,
        "total": total,
    }


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


def _by_measure(sites: list[dict], part: Callable[[dict], dict]) -> tuple[list[dict], dict[str, str]]:
    """The sites whose ``part`` of their answer holds figures, and why each other site's does not."""
    measured = [site for site in sites if NOT_MEASURABLE not in part(site)]
    left_out = {site["site"]: part(site)[NOT_MEASURABLE] for site in sites if NOT_MEASURABLE in part(site)}
    return measured, left_out


def _mark_left_out(section: dict, left_out: dict[str, str], *, measured: bool) -> dict:
    """The pooled section with the sites left out of it named, and why, in "not_measured" and its note."""
    if not left_out:
        return section
    reasons = "; ".join(f"{site}: {why}" for site, why in left_out.items())
    said = f"pooled over the other sites only ({reasons})" if measured else reasons
    note = "; ".join(n for n in (section.get("note"), said) if n)
    return {**section, "not_measured": left_out, "note": note}


def _membership(name: str, all_sites: list[dict]) -> dict:
    delta = max(site["delta"] for site in all_sites)  # the weakest guarantee among the sites
    sites, left_out = _by_measure(all_sites, lambda site: site["attacks"])
    attacks, bounds = {}, {}
    for attack in sites[0]["attacks"] if sites else ():
        histograms = [site["attacks"][attack]["histogram"] for site in sites]
        members, nonmembers = pool_histograms(histograms, "members"), pool_histograms(histograms, "nonmembers")
        pooled = metrics_from_histograms(members["counts"], nonmembers["counts"], members["edges"])
        attacks[attack] = {
            "pooled": _with_note({**pooled.to_dict(), "roc": _thin_curve(pooled.fpr, pooled.tpr)}),
            "sites": {site["site"]: _with_note(site["attacks"][attack]["summary"]) for site in sites},
        }
        bound = empirical_epsilon_from_counts(
            members["surely"],
            nonmembers["maybe"],
            members["thresholds"],
            n_members=members["total"],
            n_nonmembers=nonmembers["total"],
            delta=delta,
        )
        bounds[attack] = {
            "eps_lb": bound.eps_lb,
            "max_certifiable": bound.max_certifiable,
            "n_members": bound.n_members,
            "n_nonmembers": bound.n_nonmembers,
            "delta": delta,
            "sites": {site["site"]: site["attacks"][attack]["empirical_epsilon"] for site in sites},
        }
    section = _mark_left_out({"attacks": attacks, "empirical_epsilon": bounds}, left_out, measured=bool(sites))
    exposures = {s["site"]: s["canary_exposure"]["exposure"] for s in all_sites if "canary_exposure" in s}
    if any(e is not None for e in exposures.values()):  # only sites with a trained canary
        section["canary_exposure"] = {site: e for site, e in exposures.items() if e is not None}
    return section


def _privacy(run: RunDir, config: RunConfig, budgets: dict[str, float]) -> dict:
    """GUARANTEED ε from the ledger: per site its ε over every modality first (the figure its
    budget bounds), then each modality's own ε round by round.

    A site's budget is the one it reported (its site.toml may lower the consortium's); its
    composition says whether its modalities' records are the same people (one accountant over
    all of them) or different people (the site's ε is its largest modality's).
    """
    ledger = PrivacyLedger(run.ledger_path)
    sites: dict[str, dict] = {}
    for site in ledger.sites():
        rows = [r for r in ledger.entries(site=site) if not r.lost]
        if not rows:
            continue
        modalities = {}
        for modality in config.modalities:
            own = [r for r in rows if r.modality == modality]
            if own:
                modalities[modality] = {
                    "epsilon": own[-1].epsilon,
                    "noise_multiplier": own[-1].noise_multiplier,
                    "rounds": [{"round": r.round, "epsilon": r.epsilon, "site_epsilon": r.site_epsilon} for r in own],
                }
        sites[site] = {
            "epsilon": rows[-1].site_epsilon,
            "budget": budgets.get(site, config.privacy.epsilon),
            "delta": rows[-1].delta,
            "composition": rows[-1].composition,
            "modalities": modalities,
        }
    epsilons = [s["epsilon"] for s in sites.values()]
    section = {
        "accountant": config.privacy.accountant,
        "secure_noise": config.privacy.secure_mode,
        "noise": noise_source(config.privacy.secure_mode),
        "sites": sites,
        "epsilon_max": max(epsilons) if epsilons else None,
    }
    if not epsilons:
        section["note"] = "the ledger holds no training round"
    return section


def _extractor(inputs: AuditInputs, sites: list[dict]) -> dict:
    """Which features the image fidelity figures were computed on, and, for the sites' own
    FeatureNets, how well each tells the site's classes apart on its held-out images."""
    if inputs.inception is not None:
        return {
            "extractor": f"{inputs.inception.description}; {inputs.inception.num_features}-d features (Inception "
            "FID, not comparable with FeatureNet FID); near copies use each site's own FeatureNet",
            "fid_name": "Inception FID",
        }
    records = {site["site"]: site["fidelity"]["extractor"] for site in sites}
    pooled = pool_weighted_mean(list(records.values()), keys=("heldout_accuracy",), weight_key="n_heldout")
    return {
        "extractor": f"each site's own FeatureNet trained on its real train split ({image_classifier()}), 128-d "
        f"features; its accuracy on the sites' held-out images: {pooled['heldout_accuracy']:.3f}. Figures per class, "
        "averaged by real count (FeatureNet FID: not comparable with Inception FID, nor across consortia)",
        "fid_name": "FeatureNet FID",
        "extractor_accuracy": pooled["heldout_accuracy"],
        "extractor_sites": records,
    }


def _image_fidelity(inputs: AuditInputs, sites: list[dict]) -> dict:
    fidelity = [site["fidelity"] for site in sites]
    per_class = pool_class_fidelity([f["per_class"] for f in fidelity])
    result = {
        **_extractor(inputs, sites),
        **mean_over_classes(per_class),
        "n_synthetic": len(inputs.synthetic_images[1]),
        "per_class": per_class,
        "sites": {
            site["site"]: {
                key: value for key, value in mean_over_classes(site["fidelity"]["per_class"]).items() if key != "note"
            }
            for site in sites
        },
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
    measured, left_out = _by_measure(sites, lambda site: site["fidelity"]["embedding_stats"])
    real_classes = summarise_text_class_stats(
        pool_text_class_stats([site["fidelity"]["class_stats"] for site in sites])
    )
    synthetic_classes = summarise_text_class_stats(text_class_stats(texts, labels, class_names=names, real=False))
    synthetic = text_embedding_stats(texts, real=False)
    if measured:
        pooled = text_fidelity(pool_sums([site["fidelity"]["embedding_stats"] for site in measured]), synthetic)
    else:
        pooled = {"mean_embedding_distance": None, "frechet_distance": None, "embedding": TEXT_EMBEDDING_DESCRIPTION}
    per_site = {site["site"]: text_fidelity(site["fidelity"]["embedding_stats"], synthetic) for site in measured}
    section = {
        **pooled,
        "per_class": {name: {"real": real_classes[name], "synthetic": synthetic_classes[name]} for name in names},
        "sites": per_site | {site: {"note": why} for site, why in left_out.items()},
    }
    return _mark_left_out(section, left_out, measured=bool(measured))


UTILITY_KEYS = ("accuracy", "macro_f1", "per_class_f1", "n_test")


def _scored_ratio(configs: dict) -> dict:
    """The real-trained classifier's competence and, only when it is clearly better than chance,
    the synthetic-to-real macro-F1 ratio (else None, with a note saying why)."""
    real = competence(configs["real"])
    if not real["competent"]:
        note = (
            f"synthetic_to_real_ratio not scored: the classifier trained on real data reached accuracy "
            f"{real['accuracy']:.3f} on {real['n_test']} held-out records (lower bound {real['accuracy_lower_bound']:.3f}), "
            f"not clearly better than the {real['no_information_rate']:.3f} of always guessing each site's most frequent "
            f"class (the lower bound must reach {real['required']:.3f}): a ratio to it would measure nothing"
        )
        return {"real_classifier": real, "synthetic_to_real_ratio": None, "note": note}
    ratio = configs["synthetic"]["macro_f1"] / configs["real"]["macro_f1"]
    return {"real_classifier": real, "synthetic_to_real_ratio": ratio}


def _site_configs(configurations: dict) -> dict:
    return {
        name: {key: c[key] for key in (*UTILITY_KEYS, "training") if key in c} for name, c in configurations.items()
    }


def _utility(all_sites: list[dict]) -> dict:
    sites, left_out = _by_measure(all_sites, lambda site: site["utility"])
    marks = {site: {"note": why} for site, why in left_out.items()}
    if not sites:
        return _mark_left_out(
            {"configs": {}, "synthetic_to_real_ratio": None, "sites": marks}, left_out, measured=False
        )
    pooled = pool_utility([site["utility"] for site in sites])
    configs = {name: {key: c[key] for key in UTILITY_KEYS} for name, c in pooled["configurations"].items()}
    result = {
        "classifier": pooled["classifier"],
        "configs": configs,
        **_scored_ratio(pooled["configurations"]),
        "sites": {site["site"]: _site_configs(site["utility"]["configurations"]) for site in sites} | marks,
    }
    if "reference" in pooled:
        reference = pooled["reference"]
        result["reference"] = {
            "classifier": reference["classifier"],
            "configs": {name: {key: c[key] for key in UTILITY_KEYS} for name, c in reference["configurations"].items()},
            **_scored_ratio(reference["configurations"]),
        }
    return _mark_left_out(result, left_out, measured=True)


def _image_memorisation(sites: list[dict]) -> dict:
    pooled = pool_near_copies([site["memorisation"] for site in sites])
    return {
        "near_copies_pixel": pooled["pixel_count"],
        "near_copies_feature": pooled.get("feature_count"),
        "near_copies_pixel_chance": pooled["pixel_chance_count"],
        "near_copies_feature_chance": pooled.get("feature_chance_count"),
        "n_synthetic": sites[0]["memorisation"]["n_synthetic"],
        "quantile": NEAR_COPY_QUANTILE,
        "sites": {
            site["site"]: {
                "near_copies_pixel": site["memorisation"]["pixel"]["count"],
                "near_copies_feature": site["memorisation"]["feature"]["count"],
            }
            for site in sites
        },
    }


MEMORISATION_COUNTS = ("canary_reproductions", "phi_replay", "planted_phi_reproductions", "ngram_copies")
DETECTOR_COUNTS = ("n_truth", "n_found", "n_findings", "n_correct")


def _sum_by_kind(dicts: list[dict]) -> dict[str, int]:
    total: dict[str, int] = {}
    for counts in dicts:
        for kind, n in counts.items():
            total[kind] = total.get(kind, 0) + n
    return dict(sorted(total.items()))


def _detector_at_sites(sites: list[dict]) -> dict | None:
    """The detector's recall and precision per kind pooled over the sites with a truth file
    (sums of their counts), or None when no site has one."""
    scored = [s["memorisation"]["phi_detector_at_site"] for s in sites if "phi_detector_at_site" in s["memorisation"]]
    if not scored:
        return None
    pooled: dict[str, dict] = {}
    for scores in scored:
        for kind, counts in scores.items():
            total = pooled.setdefault(kind, dict.fromkeys(DETECTOR_COUNTS, 0))
            for key in DETECTOR_COUNTS:
                total[key] += counts[key]
    for counts in pooled.values():
        counts["recall"] = counts["n_found"] / counts["n_truth"] if counts["n_truth"] else None
        counts["precision"] = counts["n_correct"] / counts["n_findings"] if counts["n_findings"] else None
    return {"n_sites": len(scored), "kinds": dict(sorted(pooled.items()))}


def _phi(texts: list[str], sites: list[dict], *, progress: bool) -> dict:
    from fedgen.audits.phi import default_analyzer, redact, scan

    say(progress, f"scanning {len(texts)} synthetic texts for PHI")
    analyzer = default_analyzer()
    findings = scan(analyzer, texts)
    counts: dict[str, int] = {}
    for finding in findings:
        counts[finding.entity_type] = counts.get(finding.entity_type, 0) + 1
    per_site = {site["site"]: {key: site["memorisation"][key] for key in MEMORISATION_COUNTS} for site in sites}
    return {
        "engine": analyzer.engine,
        "n_texts": len(texts),
        "findings": [{**f.to_dict(), "redacted": redact(texts[f.index][f.start : f.end])} for f in findings],
        "counts": counts,
        "memorisation": {
            **{key: sum(s[key] for s in per_site.values()) for key in MEMORISATION_COUNTS},
            "phi_replay_by_kind": _sum_by_kind([s["memorisation"]["phi_replay_by_kind"] for s in sites]),
            "ngram_n": sites[0]["memorisation"]["ngram_n"],  # as the sites counted
            "sites": per_site,
        },
        "detector_at_sites": _detector_at_sites(sites),
    }


def _versions() -> dict[str, str | None]:
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _class_counts(labels, names: list[str]) -> dict[str, int]:
    labels = [int(label) for label in labels]
    return {name: labels.count(index) for index, name in enumerate(names)}


def _synthetic(inputs: AuditInputs) -> dict:
    run = inputs.run
    sheet = run.synthetic / "contact-sheet.png"
    per_class = {}
    if inputs.synthetic_images is not None:
        per_class["image"] = _class_counts(inputs.synthetic_images[1].tolist(), inputs.config.data.image_classes)
    if inputs.synthetic_texts is not None:
        per_class["text"] = _class_counts(inputs.synthetic_texts[1], inputs.config.data.text_classes)
    return {
        "images_dir": str(run.synthetic / "images") if inputs.synthetic_images is not None else None,
        "contact_sheet": str(sheet) if inputs.synthetic_images is not None and sheet.is_file() else None,
        "texts": str(run.synthetic / "texts.jsonl") if inputs.synthetic_texts is not None else None,
        "n_images": 0 if inputs.synthetic_images is None else len(inputs.synthetic_images[1]),
        "n_texts": 0 if inputs.synthetic_texts is None else len(inputs.synthetic_texts[0]),
        "per_class": per_class,
    }


def _check_coverage(run: RunDir, answers: dict[str, list[dict]]) -> None:
    """The sites that answered are exactly the sites that trained: no partial evidence."""
    ledger = PrivacyLedger(run.ledger_path)
    for name, sites in answers.items():
        trained = {entry.site for entry in ledger.entries(modality=name)}
        answered = {site["site"] for site in sites}
        if trained - answered:
            raise FedgenError(
                f"{', '.join(sorted(trained - answered))} trained the {name} model but did not answer the audit"
            )
        if answered - trained:
            raise FedgenError(
                f"{', '.join(sorted(answered - trained))} answered the {name} audit but never trained (not in the ledger)"
            )


def _pretraining(run: RunDir) -> dict:
    """By modality, what its model was pretrained on (written by fedgen.pretrain.create_run)."""
    record = run.root / PROVENANCE_NAME
    return json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}


def assemble_report(inputs: AuditInputs, answers: dict[str, list[dict]], *, progress: bool = False) -> dict:
    """report.json (without "gate") from the sites' answers, the ledger and the synthetic data."""
    run, config = inputs.run, inputs.config
    _check_coverage(run, answers)
    budgets = {site["site"]: site["budget"] for sites in answers.values() for site in sites}
    report = {
        "run": {
            "id": run.root.name,
            "root": str(run.root.resolve()),
            "modalities": config.modalities,
            "config": config.model_dump(),
            "versions": _versions(),
            "dp": config.privacy.enabled,
            "pretraining": _pretraining(run),
            "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        "privacy": _privacy(run, config, budgets),
        "membership": {name: _membership(name, sites) for name, sites in answers.items()},
        "fidelity": {},
        "utility": {name: _utility(sites) for name, sites in answers.items()},
        "synthetic": _synthetic(inputs),
        "records": {name: {site["site"]: site["records"] for site in sites} for name, sites in answers.items()},
    }
    if "image" in answers:
        report["image_memorisation"] = _image_memorisation(answers["image"])
        report["fidelity"]["image"] = _image_fidelity(inputs, answers["image"])
    if "text" in answers:
        report["phi"] = _phi(inputs.synthetic_texts[0], answers["text"], progress=progress)
        report["fidelity"]["text"] = _text_fidelity(inputs, answers["text"])
    report["bias"] = bias_view(report)
    return report


def trained_sites(run: RunDir) -> list[str]:
    """The sites the ledger says trained: the ones the audit must hear from."""
    return PrivacyLedger(run.ledger_path).sites()
