"""Who the synthetic data serves: per class and per site, beside the pooled figures.

Synthetic data can carry a bias between groups or hide one: a class the sites hold few
records of is learnt from little signal and drowned by DP noise, a site whose population
differs from the rest is served by a model fitted mostly to the others, and a synthetic set
balanced by ``fedgen generate --per-class`` no longer has the mix of the real records.
``bias_view`` reads figures the audit already pooled (report.json) and lays them side by side:

- per class: its share of the training records, of the synthetic items and of the held-out
  records; the utility classifier's F1 on that class's real held-out records when trained on
  real data and when trained on synthetic data; fidelity of that class;
- per site: its share of the training and held-out records, its macro-F1 (real-trained and
  synthetic-trained, on its own held-out records) and its fidelity figures;
- a plain warning for a class or a site that is served clearly worse: its synthetic-trained
  F1 below ``SERVED_WORSE_RATIO`` of its real-trained F1, or fewer than
  ``MIN_TRAINING_RECORDS`` training records;
- whether the synthetic mix of classes differs from the training records' mix, and why.

Inputs (report.json keys): ``records[modality][site] = {"train": {class: n}, "heldout":
{class: n}}`` (the sites' counts, ``record_counts`` at each site), ``synthetic["per_class"][modality] = {class: n}``,
``utility[modality]`` (``configs`` pooled and ``sites``), and, when the audit measured them,
``fidelity[modality]["per_class"]`` and ``fidelity[modality]["sites"]``.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "MIN_TRAINING_RECORDS",
    "SERVED_WORSE_RATIO",
    "MIX_TOLERANCE",
    "record_counts",
    "bias_view",
    "mix_difference",
]

# A class or site whose synthetic-trained F1 is below this share of its real-trained F1 is
# served clearly worse than its own records could serve it.
SERVED_WORSE_RATIO = 0.5
# Fewer training records than this (a class pooled over the sites, or a site over its
# classes): DP-SGD's noise is calibrated per batch, not per class, so so few records teach the
# model little. A level to look at, not a measured threshold.
MIN_TRAINING_RECORDS = 50
# Total variation distance between the synthetic and the training class mix above which the
# report says the mixes differ (0 = the same shares, 1 = no class in common).
MIX_TOLERANCE = 0.1

# Fidelity figures shown per class and per site (those the audit reported).
IMAGE_FIDELITY = ("precision", "recall", "coverage")
TEXT_SITE_FIDELITY = ("frechet_distance",)
TEXT_CLASS_FIDELITY = ("chars_mean", "type_token_ratio")


def record_counts(train_labels: Sequence[int], heldout_labels: Sequence[int], *, class_names: Sequence[str]) -> dict:
    """Site-side: ``{"train": {class: n}, "heldout": {class: n}}`` of the site's split (counts
    only, as the utility audit's per-class support already says of the held-out split)."""
    return {
        part: {name: sum(1 for label in labels if int(label) == index) for index, name in enumerate(class_names)}
        for part, labels in (("train", train_labels), ("heldout", heldout_labels))
    }


def _share(n: int, total: int) -> float | None:
    return n / total if total else None


def _ratio(synthetic: float | None, real: float | None) -> float | None:
    return None if synthetic is None or real is None or real == 0 else synthetic / real


def _served_worse(synthetic: float | None, real: float | None, ratio: float) -> bool:
    return synthetic is not None and real is not None and real > 0 and synthetic < ratio * real


def mix_difference(training: dict[str, int], synthetic: dict[str, int]) -> float | None:
    """Total variation distance between two class mixes given as counts (None if one is empty)."""
    n_train, n_synthetic = sum(training.values()), sum(synthetic.values())
    if not n_train or not n_synthetic:
        return None
    classes = set(training) | set(synthetic)
    return 0.5 * sum(abs(training.get(c, 0) / n_train - synthetic.get(c, 0) / n_synthetic) for c in classes)


def _mix(training: dict[str, int], synthetic: dict[str, int], tolerance: float) -> dict:
    distance = mix_difference(training, synthetic)
    if distance is None:
        return {"distance": None, "differs": None, "reason": "no synthetic items or no training records were counted"}
    differs = distance > tolerance
    generated = {c: n for c, n in synthetic.items() if n}
    missing = [c for c, n in training.items() if n and not synthetic.get(c)]
    if not differs:
        reason = "the synthetic items follow the training records' class mix"
    elif missing:
        reason = (
            f"no synthetic item of {', '.join(missing)} was generated (a subset of classes was chosen at generation)"
        )
    elif len(set(generated.values())) == 1:
        reason = (
            f"`fedgen generate --per-class` made {next(iter(generated.values()))} items of every class (a balanced set), "
            "while the sites' training records are not balanced"
        )
    else:
        reason = "the number of synthetic items per class was chosen at generation and differs from the training mix"
    return {"distance": distance, "differs": differs, "reason": reason}


def _fidelity_figures(source: dict | None, keys: Sequence[str]) -> dict:
    return {key: source[key] for key in keys if source and source.get(key) is not None}


def _class_fidelity(modality: str, per_class: dict, name: str) -> dict:
    entry = per_class.get(name) or {}
    if modality == "text":  # real and synthetic side by side
        return {
            f"{key} {side}": value
            for key in TEXT_CLASS_FIDELITY
            for side in ("real", "synthetic")
            if (value := (entry.get(side) or {}).get(key)) is not None
        }
    return _fidelity_figures(entry, IMAGE_FIDELITY)


def _modality_view(
    modality: str, report: dict, classes: list[str], *, min_records: int, ratio: float, tolerance: float
) -> dict:
    sites = (report.get("records") or {}).get(modality) or {}
    synthetic = ((report.get("synthetic") or {}).get("per_class") or {}).get(modality) or {}
    utility = (report.get("utility") or {}).get(modality) or {}
    configs = utility.get("configs") or {}
    fidelity = (report.get("fidelity") or {}).get(modality) or {}
    f1 = {kind: (configs.get(kind) or {}).get("per_class_f1") or {} for kind in ("real", "synthetic")}

    train = {c: sum((s.get("train") or {}).get(c, 0) for s in sites.values()) for c in classes}
    heldout = {c: sum((s.get("heldout") or {}).get(c, 0) for s in sites.values()) for c in classes}
    counts = {c: synthetic.get(c, 0) for c in classes}
    totals = {"train": sum(train.values()), "heldout": sum(heldout.values()), "synthetic": sum(counts.values())}
    warnings = []

    class_rows = []
    for name in classes:
        if not (train[name] or heldout[name] or counts[name]):
            continue  # a class of the list that nobody holds and nothing was generated of
        real_f1, synthetic_f1 = f1["real"].get(name), f1["synthetic"].get(name)
        row = {
            "class": name,
            "train": train[name], "train_share": _share(train[name], totals["train"]),
            "synthetic": counts[name], "synthetic_share": _share(counts[name], totals["synthetic"]),
            "heldout": heldout[name], "heldout_share": _share(heldout[name], totals["heldout"]),
            "f1_real": real_f1, "f1_synthetic": synthetic_f1, "f1_ratio": _ratio(synthetic_f1, real_f1),
            "fidelity": _class_fidelity(modality, fidelity.get("per_class") or {}, name),
            "warnings": [],
        }  # fmt: skip
        if _served_worse(synthetic_f1, real_f1, ratio):
            row["warnings"].append(
                f"class {name}: a classifier trained on synthetic data scores F1 {synthetic_f1:.2f} on its real records, "
                f"below {ratio:g} x the {real_f1:.2f} of one trained on real data"
            )
        if train[name] < min_records:
            row["warnings"].append(
                f"class {name}: {train[name]} training records over all sites (fewer than {min_records})"
            )
        if counts[name] == 0 and train[name]:
            row["warnings"].append(
                f"class {name}: the sites hold training records of it but no synthetic item was generated"
            )
        warnings += row["warnings"]
        class_rows.append(row)

    site_rows = []
    site_utility = utility.get("sites") or {}
    site_fidelity = fidelity.get("sites") or {}
    fidelity_keys = IMAGE_FIDELITY if modality == "image" else TEXT_SITE_FIDELITY
    for site, held in sorted(sites.items()):
        n_train, n_heldout = sum((held.get("train") or {}).values()), sum((held.get("heldout") or {}).values())
        scores = site_utility.get(site) or {}
        real_f1 = (scores.get("real") or {}).get("macro_f1")
        synthetic_f1 = (scores.get("synthetic") or {}).get("macro_f1")
        row = {
            "site": site,
            "train": n_train, "train_share": _share(n_train, totals["train"]),
            "heldout": n_heldout, "heldout_share": _share(n_heldout, totals["heldout"]),
            "f1_real": real_f1, "f1_synthetic": synthetic_f1, "f1_ratio": _ratio(synthetic_f1, real_f1),
            "fidelity": _fidelity_figures(site_fidelity.get(site), fidelity_keys),
            "warnings": [],
        }  # fmt: skip
        if _served_worse(synthetic_f1, real_f1, ratio):
            row["warnings"].append(
                f"site {site}: a classifier trained on synthetic data scores macro-F1 {synthetic_f1:.2f} on its held-out "
                f"records, below {ratio:g} x the {real_f1:.2f} of one trained on its real data"
            )
        if n_train < min_records:
            row["warnings"].append(f"site {site}: {n_train} training records (fewer than {min_records})")
        warnings += row["warnings"]
        site_rows.append(row)

    real_macro = (configs.get("real") or {}).get("macro_f1")
    synthetic_macro = (configs.get("synthetic") or {}).get("macro_f1")
    return {
        "classes": class_rows,
        "sites": site_rows,
        "pooled": {
            **totals,
            "f1_real": real_macro,
            "f1_synthetic": synthetic_macro,
            "f1_ratio": _ratio(synthetic_macro, real_macro),
            "fidelity": _fidelity_figures(fidelity, fidelity_keys),
        },
        "mix": _mix(train, counts, tolerance),
        "warnings": warnings,
    }


def bias_view(
    report: dict,
    *,
    min_training_records: int = MIN_TRAINING_RECORDS,
    served_worse_ratio: float = SERVED_WORSE_RATIO,
    mix_tolerance: float = MIX_TOLERANCE,
) -> dict:
    """report.json's "bias" section: per modality the class and site rows, the mix, the warnings."""
    data = ((report.get("run") or {}).get("config") or {}).get("data") or {}
    view = {
        "thresholds": {
            "served_worse_ratio": served_worse_ratio,
            "min_training_records": min_training_records,
            "mix_tolerance": mix_tolerance,
        },
        "modalities": {},
    }
    for modality in report.get("records") or {}:
        records = report["records"][modality]
        listed = data.get(f"{modality}_classes")
        classes = list(listed) if listed else sorted({c for s in records.values() for part in s.values() for c in part})
        view["modalities"][modality] = _modality_view(
            modality,
            report,
            classes,
            min_records=min_training_records,
            ratio=served_worse_ratio,
            tolerance=mix_tolerance,
        )
    return view
