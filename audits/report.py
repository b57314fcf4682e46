"""The audit report a compliance officer reads: ``audit/report.json`` and ``audit/report.html``.

The HTML page is self-contained — styles inline, plots and the synthetic contact sheet as
``data:`` PNGs, no script, no font or link to fetch — so it opens from a USB stick or an e-mail
on a machine with no network. It puts the decision first, says loudly when a run was trained
without DP, keeps what the accountant GUARANTEES apart from what the attacks MEASURED, and shows
PHI findings only in redacted form (every shown string is redacted again here, as a second line
of defence). It never shows a real image: only the contact sheet inside the run's synthetic
folder is embedded.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable
from pathlib import Path

import jinja2
import tomli_w
from matplotlib.figure import Figure

from fedgen.files import write_json, write_text

__all__ = [
    "REPORT_JSON",
    "REPORT_HTML",
    "MAX_FINDINGS_SHOWN",
    "render_html",
    "write_report",
]

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
MAX_FINDINGS_SHOWN = 200  # rows of the PHI findings table; the counts table covers them all
PLOT_DPI = 100
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# --- formatting -------------------------------------------------------------------------------


def _number(value: object, digits: int = 3) -> str:
    """A figure for a person: 3 significant digits, "not measured" for null, ∞ for inf."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not measured"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        return f"{value:.{digits}g}"
    return str(value)


FINDING_KEYS = ("index", "entity_type", "start", "end", "score", "redacted")


def _redacted_findings(report: dict) -> dict:
    """The report with each PHI finding cut to its schema keys and its string redacted again, so
    a raw value that slipped into a finding reaches neither report.json nor the page."""
    findings = (report.get("phi") or {}).get("findings")
    if not findings:
        return report
    from fedgen.audits.phi import redact  # Presidio is heavy: imported only when there are findings

    cleaned = [
        {key: f[key] for key in FINDING_KEYS if key in f} | {"redacted": redact(str(f.get("redacted", "")))}
        for f in findings
    ]
    return report | {"phi": report["phi"] | {"findings": cleaned}}


def _png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure_uri(draw: Callable[[Figure], None], *, size: tuple[float, float]) -> str:
    """Draw on a fresh Agg figure (no pyplot state) and return it as a PNG data URI."""
    figure = Figure(figsize=size, layout="constrained")
    draw(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=PLOT_DPI)
    return _png_data_uri(buffer.getvalue())


# --- sections ---------------------------------------------------------------------------------


def _decision(gate: dict | None) -> dict:
    if not gate or "passed" not in gate:
        return {"state": "none", "failed": [], "policy": None}
    failed = [c for c in gate.get("checks", []) if not c.get("passed")]
    return {"state": "pass" if gate["passed"] else "refused", "failed": failed, "policy": gate.get("policy")}


def _epsilon_plot(sites: dict) -> str | None:
    """Each site's ε, all modalities, after every update it released, in training order."""
    trained = [
        (modality, spent)
        for per_site in sites.values()
        for modality, spent in (per_site.get("modalities") or {}).items()
    ]
    order = list(dict.fromkeys(modality for modality, _ in trained))  # the run's order of modalities
    steps = sorted(
        {(modality, r["round"]) for modality, spent in trained for r in spent.get("rounds") or []},
        key=lambda step: (order.index(step[0]), step[1]),
    )
    if not steps:
        return None

    def draw(figure: Figure) -> None:
        ax = figure.subplots()
        budgets = set()
        for site, per_site in sorted(sites.items()):
            points = [
                (steps.index((modality, r["round"])), r["site_epsilon"])
                for modality, spent in (per_site.get("modalities") or {}).items()
                for r in spent.get("rounds") or []
                if r.get("site_epsilon") is not None
            ]
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=site)
            budget = per_site.get("budget")
            if budget is not None and math.isfinite(budget):
                budgets.add(budget)
        for budget in sorted(budgets):
            ax.axhline(budget, color="crimson", linestyle="--", linewidth=1)
            ax.annotate(f"budget ε = {budget:g}", (0.01, budget), xycoords=("axes fraction", "data"),
                        color="crimson", va="bottom", fontsize=8)  # fmt: skip
        ax.set_xticks(range(len(steps)), [f"{modality} {round_}" for modality, round_ in steps], fontsize=8)
        ax.set_xlim(-0.5, len(steps) - 0.5)
        ax.set_xlabel("federated round")
        ax.set_ylabel("site ε, all modalities")
        ax.set_title("ε per site over rounds — guaranteed by the accountant", fontsize=10)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)

    return _figure_uri(draw, size=(7, 3.5))


def _privacy_section(report: dict) -> dict:
    privacy = report.get("privacy") or {}
    sites = privacy.get("sites") or {}
    modalities = sorted({m for per_site in sites.values() for m in per_site.get("modalities") or {}})
    rows = []
    for site, spent in sorted(sites.items()):
        epsilon, budget = spent.get("epsilon"), spent.get("budget")
        own = spent.get("modalities") or {}
        rows.append({
            "site": site,
            "epsilon": _number(epsilon),
            "budget": _number(budget),
            "within": None if epsilon is None or budget is None else epsilon <= budget,
            "composition": spent.get("composition"),
            "delta": _number(spent.get("delta")),
            "modalities": [
                {
                    "epsilon": _number(own[m].get("epsilon")),
                    "noise_multiplier": _number(own[m].get("noise_multiplier")),
                    "rounds": len(own[m].get("rounds") or []),
                } if m in own else None
                for m in modalities
            ],
        })  # fmt: skip
    return {
        "epsilon_max": _number(privacy.get("epsilon_max")),
        "accountant": privacy.get("accountant"),
        "noise": privacy.get("noise"),
        "modalities": modalities,
        "rows": rows,
        "plot": _epsilon_plot(sites),
    }


def _roc_plot(attacks: dict, modality: str) -> str | None:
    curves = {
        name: result["pooled"]["roc"]
        for name, result in sorted(attacks.items())
        if (result.get("pooled") or {}).get("roc")
    }
    if not curves:
        return None

    def draw(figure: Figure) -> None:
        linear, log = figure.subplots(1, 2)
        for name, roc in curves.items():
            auc = attacks[name]["pooled"].get("auc")
            label = f"{name} (AUC {_number(auc)})"
            linear.plot(roc["fpr"], roc["tpr"], label=label)
            log.plot(roc["fpr"], roc["tpr"], label=label)
        linear.plot([0, 1], [0, 1], color="grey", linestyle=":", label="guessing")
        log.plot([1e-4, 1], [1e-4, 1], color="grey", linestyle=":")
        log.set_xscale("log")
        log.set_yscale("log")
        log.set_xlim(1e-3, 1)
        log.set_ylim(1e-3, 1)
        for ax, scale in ((linear, "linear"), (log, "log-log: the low false-positive region")):
            ax.set_xlabel("false positive rate (held-out records accused)")
            ax.set_ylabel("true positive rate (training records found)")
            ax.set_title(scale, fontsize=9)
            ax.grid(alpha=0.3)
        linear.legend(fontsize=8)
        figure.suptitle(f"{modality}: membership attacks — measured, a lower bound, not a guarantee", fontsize=10)

    return _figure_uri(draw, size=(9, 4))


def _limit(check: dict | None) -> str:
    """The limit the gate held an attack figure to, and where it came from."""
    if not check or check.get("bound") is None:
        return "not gated" if check is None else _number(check.get("threshold"))
    if check.get("bound_source") == "chance":
        return f"{_number(check['bound'])} (an attack within the policy's {_number(check['threshold'])} reaches this with so few examples)"
    return f"{_number(check['bound'])} (policy)"


def _attack_row(name: str, summary: dict, site: str | None = None) -> dict:
    return {
        "attack": name,
        "site": site,
        "auc": _number(summary.get("auc")),
        "tpr_1pct": _number(summary.get("tpr_at_1pct_fpr")),
        "tpr_01pct": _number(summary.get("tpr_at_01pct_fpr")),
        "n_members": _number(summary.get("n_members")),
        "n_nonmembers": _number(summary.get("n_nonmembers")),
        "note": summary.get("note"),
    }


def _accountant_epsilon(report: dict, modality: str) -> float | None:
    """The largest ε of one modality's updates alone: what an attack on that model is held to."""
    sites = (report.get("privacy") or {}).get("sites") or {}
    spent = [s["modalities"][modality].get("epsilon") for s in sites.values() if modality in s.get("modalities", {})]
    spent = [e for e in spent if e is not None]
    return max(spent) if spent else None


def _at_least(value: float | None, reference: float | None) -> bool | None:
    return None if value is None or reference is None else value >= reference


def _confidence(alpha: float | None) -> str:
    return "not recorded" if alpha is None else f"{100 * (1 - alpha):g}%"


def _membership_section(report: dict) -> list[dict]:
    blocks = []
    checks = {c.get("name"): c for c in (report.get("gate") or {}).get("checks", [])}
    for modality, measured in sorted((report.get("membership") or {}).items()):
        attacks = measured.get("attacks") or {}
        accountant = _accountant_epsilon(report, modality)
        empirical = [
            {
                "attack": name,
                "eps_lb": _number(bound.get("eps_lb")),
                "accountant": _number(accountant),
                "max_certifiable": _number(bound.get("max_certifiable")),
                "can_test": _at_least(bound.get("max_certifiable"), accountant),
                "confidence": _confidence(bound.get("alpha")),
                "n_members": _number(bound.get("n_members")),
                "n_nonmembers": _number(bound.get("n_nonmembers")),
                "delta": _number(bound.get("delta")),
            }
            for name, bound in sorted((measured.get("empirical_epsilon") or {}).items())
        ]
        blocks.append({
            "modality": modality,
            "plot": _roc_plot(attacks, modality),
            "pooled": [
                _attack_row(name, r.get("pooled") or {})
                | {
                    "auc_limit": _limit(checks.get(f"membership.{modality}.{name}.auc")),
                    "tpr_limit": _limit(checks.get(f"membership.{modality}.{name}.tpr_at_1pct_fpr")),
                }
                for name, r in sorted(attacks.items())
            ],
            "sites": [
                _attack_row(name, summary, site)
                for name, r in sorted(attacks.items())
                for site, summary in sorted((r.get("sites") or {}).items())
            ],
            "empirical": empirical,
            "canary_exposure": [(site, _number(v)) for site, v in sorted((measured.get("canary_exposure") or {}).items())],
            "note": measured.get("note"),
        })  # fmt: skip
    return blocks


def _count_table(totals: dict, labels: dict[str, str]) -> dict:
    """Counts as a table: one row per key, a column for the total and one per site."""
    sites = sorted((totals.get("sites") or {}).items())
    return {
        "headers": ["total", *(site for site, _ in sites)],
        "rows": [
            (label, [_number(totals.get(key)), *(_number(c.get(key)) for _, c in sites)])
            for key, label in labels.items()
        ],
    }


TEXT_MEMORISATION_LABELS = {
    "canary_reproductions": "canary records reproduced",
    "phi_replay": "identifiers of the site's training notes replayed (any site)",
    "planted_phi_reproductions": "planted identifiers reproduced (demo sites)",
    "ngram_copies": "n-gram copies of training notes",
}
IMAGE_MEMORISATION_LABELS = {
    "near_copies_pixel": "near copies (raw pixels)",
    "near_copies_feature": "near copies (audit network features)",
    "near_copies_pixel_chance": "near copies in raw pixels that a generator copying nothing shows by chance (99%)",
    "near_copies_feature_chance": "near copies in features that a generator copying nothing shows by chance (99%)",
}


def _phi_section(report: dict, forbidden: set[str]) -> dict | None:
    phi = report.get("phi")
    if phi is None:
        return None
    findings = phi.get("findings") or []
    memorisation = phi.get("memorisation") or {}
    return {
        "engine": phi.get("engine") or "not recorded",
        "n_texts": _number(phi.get("n_texts")),
        "counts": [
            (entity, _number(count), entity in forbidden) for entity, count in sorted((phi.get("counts") or {}).items())
        ],
        "findings": [
            {
                "index": _number(f.get("index")),
                "entity_type": f.get("entity_type"),
                "redacted": f.get("redacted", ""),
                "score": _number(f.get("score"), 2),
            }
            for f in findings[:MAX_FINDINGS_SHOWN]
        ],
        "n_more": max(len(findings) - MAX_FINDINGS_SHOWN, 0),
        "memorisation": _count_table(memorisation, TEXT_MEMORISATION_LABELS),
        "ngram_n": _number(memorisation.get("ngram_n")),
        "note": phi.get("note"),
        "release": _phi_release_sentence(phi.get("release")),
        "detector_at_sites": _detector_sentence(phi.get("detector_at_sites")),
    }


PHI_ACTIONS = {
    "refuse": "refused above the policy's limit",
    "placeholder": "replaced by typed placeholders ([NAME], [DATE], ...) in the released texts",
    "surrogate": "replaced by consistent fake values in the released texts",
}


def _phi_release_sentence(plan: dict | None) -> str | None:
    """What the release does with the findings, in one sentence."""
    if not plan:
        return None
    replaced = plan.get("replaced") or {}
    what = ", ".join(f"{_number(n)} {kind}" for kind, n in sorted(replaced.items())) or "none found"
    action = PHI_ACTIONS.get(plan.get("action"), str(plan.get("action")))
    if plan.get("action") == "refuse":
        return f"Findings of the forbidden types are {action}."
    return f"Findings of the forbidden types are {action}: {what}."


def _detector_sentence(pooled: dict | None) -> str | None:
    """The detector's recall on the planted PHI of the sites that have a truth file."""
    if not pooled:
        return None
    parts = [
        f"{kind} {_number(c['recall'], 2)} ({_number(c['n_found'])}/{_number(c['n_truth'])})"
        for kind, c in pooled["kinds"].items()
        if c.get("recall") is not None
    ]
    return f"Detector recall on the planted PHI of {_number(pooled['n_sites'])} site(s): " + ", ".join(parts) + "."


def _image_memorisation_section(report: dict) -> dict | None:
    section = report.get("image_memorisation")
    if section is None:
        return None
    return {
        "n_synthetic": _number(section.get("n_synthetic")),
        "counts": _count_table(section, IMAGE_MEMORISATION_LABELS),
        "note": section.get("note"),
    }


IMAGE_FIDELITY_ROWS = [
    ("extractor_accuracy", "feature extractor's accuracy on the held-out real images (how well it knows the classes)"),
    ("fid", "FID (lower is closer; comparable only with the same extractor)"),
    ("kid", "KID (lower is closer)"),
    ("precision", "precision: synthetic images inside the real images' manifold (0–1, higher is better)"),
    ("recall", "recall: real images covered by the synthetic ones (0–1, higher is better)"),
    ("density", "density (around 1 when synthetic images sit where real ones are dense)"),
    ("coverage", "coverage (0–1, higher is better)"),
    ("ssim", "SSIM to the nearest real image (1 = identical)"),
    ("psnr", "PSNR to the nearest real image, dB (higher = more similar)"),
    ("n_real", "real images measured (at the sites)"),
    ("n_synthetic", "synthetic images measured"),
]
TEXT_FIDELITY_ROWS = [
    ("mean_embedding_distance", "distance between mean embeddings (lower is closer)"),
    ("frechet_distance", "Fréchet distance of embeddings (lower is closer)"),
]


TEXT_CLASS_STATS = ["n", "chars_mean", "chars_std", "words_mean", "words_std", "type_token_ratio", "distinct_words"]


def _fidelity_section(report: dict) -> dict:
    fidelity = report.get("fidelity") or {}
    image, text = fidelity.get("image"), fidelity.get("text")
    section: dict = {"image": None, "text": None}
    if image is not None:
        section["image"] = {
            "extractor": image.get("extractor") or "not recorded",
            "rows": [
                (
                    label.replace("FID", image.get("fid_name", "FID"), 1) if key == "fid" else label,
                    _number(image.get(key)),
                )
                for key, label in IMAGE_FIDELITY_ROWS
            ],
            "note": image.get("note"),
        }
    if text is not None:
        per_class = text.get("per_class") or {}
        sides = [side for c in per_class.values() for side in c.values() if side]
        stats = [k for k in TEXT_CLASS_STATS if any(k in side for side in sides)]
        section["text"] = {
            "embedding": text.get("embedding") or "not recorded",
            "rows": [(label, _number(text.get(key))) for key, label in TEXT_FIDELITY_ROWS],
            "stats": [stat.replace("_", " ") for stat in stats],
            "per_class": [
                (name, source, [_number((c.get(source) or {}).get(k)) for k in stats])
                for name, c in sorted(per_class.items())
                for source in ("real", "synthetic")
            ],
            "note": text.get("note"),
        }
    return section


UTILITY_CONFIGS = [
    ("real", "trained on real data"),
    ("synthetic", "trained on synthetic data only"),
    ("composite", "real + synthetic"),
    ("smote", "real + SMOTE oversampling (baseline)"),
]


def _competence_line(utility: dict) -> str | None:
    real = utility.get("real_classifier")
    if not real:
        return None
    verdict = "clearly better than chance" if real["competent"] else "NOT clearly better than chance"
    return (
        f"The classifier trained on real data reached accuracy {_number(real['accuracy'])} on {real['n_test']} held-out "
        f"records (lower bound {_number(real['accuracy_lower_bound'])}), against {_number(real['no_information_rate'])} "
        f"for always guessing each site's most frequent class: {verdict} (the lower bound must reach {_number(real['required'])})."
    )


def _utility_configs(configs: dict) -> list[tuple]:
    return [
        (
            label,
            _number(configs[key].get("accuracy")),
            _number(configs[key].get("macro_f1")),
            _number(configs[key].get("n_test")),
        )
        for key, label in UTILITY_CONFIGS
        if key in configs
    ]


def _utility_section(report: dict) -> list[dict]:
    blocks = []
    for modality, utility in sorted((report.get("utility") or {}).items()):
        configs = utility.get("configs") or {}
        shown = [(key, label) for key, label in UTILITY_CONFIGS if key in configs]
        classes = sorted({c for key, _ in shown for c in (configs[key].get("per_class_f1") or {})})
        reference = utility.get("reference")
        blocks.append({
            "modality": modality,
            "classifier": utility.get("classifier") or "not recorded",
            "ratio": _number(utility.get("synthetic_to_real_ratio")),
            "competence": _competence_line(utility),
            "configs": _utility_configs(configs),
            "class_headers": [label for _, label in shown],
            "per_class": [
                (name, [_number((configs[key].get("per_class_f1") or {}).get(name)) for key, _ in shown])
                for name in classes
            ],
            "note": utility.get("note"),
            "reference": reference and {
                "classifier": reference.get("classifier") or "not recorded",
                "ratio": _number(reference.get("synthetic_to_real_ratio")),
                "competence": _competence_line(reference),
                "configs": _utility_configs(reference.get("configs") or {}),
                "note": reference.get("note"),
            },
        })  # fmt: skip
    return blocks


def _share(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def _fidelity_headers(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row["fidelity"]))


def _bias_rows(rows: list[dict], label: str, headers: list[str]) -> list[dict]:
    return [
        {
            "name": row[label],
            "counts": [
                f"{_number(row[part])} ({_share(row[f'{part}_share'])})"
                for part in ("train", "synthetic", "heldout")
                if part in row
            ],
            "f1": [_number(row["f1_real"]), _number(row["f1_synthetic"]), _number(row["f1_ratio"])],
            "fidelity": [_number(row["fidelity"].get(key)) for key in headers],
            "flagged": bool(row["warnings"]),
        }
        for row in rows
    ]


def _bias_section(report: dict) -> dict | None:
    bias = report.get("bias")
    if not bias:
        return None
    blocks = []
    for modality, view in sorted((bias.get("modalities") or {}).items()):
        class_headers, site_headers = _fidelity_headers(view["classes"]), _fidelity_headers(view["sites"])
        pooled = view["pooled"]
        mix = view["mix"]
        blocks.append({
            "modality": modality,
            "warnings": view["warnings"],
            "mix": {"differs": mix["differs"], "distance": _number(mix["distance"], 2), "reason": mix["reason"]},
            "class_fidelity": [key.replace("_", " ") for key in class_headers],
            "classes": _bias_rows(view["classes"], "class", class_headers),
            "site_fidelity": [key.replace("_", " ") for key in site_headers],
            "sites": _bias_rows(view["sites"], "site", site_headers),
            "pooled": {
                "counts": [_number(pooled["train"]), _number(pooled["synthetic"]), _number(pooled["heldout"])],
                "f1": [_number(pooled["f1_real"]), _number(pooled["f1_synthetic"]), _number(pooled["f1_ratio"])],
                "class_fidelity": [_number(pooled["fidelity"].get(key)) for key in class_headers],
                "site_fidelity": [_number(pooled["fidelity"].get(key)) for key in site_headers],
            },
        })  # fmt: skip
    thresholds = bias.get("thresholds") or {}
    return {
        "blocks": blocks,
        "ratio": _number(thresholds.get("served_worse_ratio")),
        "min_records": _number(thresholds.get("min_training_records")),
        "mix_tolerance": _number(thresholds.get("mix_tolerance")),
    }


def _estimate(share: dict | None, *, test: bool = False) -> str:
    """ "0.62 (0.55–0.69), 120 answers" from a review proportion; with the chance test's p."""
    if not share or share.get("value") is None:
        return "no answers"
    low, high = share["ci"]
    text = f"{share['value']:.2f} ({low:.2f}–{high:.2f}), {share['k']} of {share['n']}"
    if test and share.get("p_value") is not None:
        text += f"; p = {_number(share['p_value'], 2)} against 0.5"
    return text


def _kappa(agreement: dict, what: str) -> str:
    if not agreement.get("method"):
        return agreement.get("note") or "not measured"
    measured = agreement[what]
    return f"{_number(measured['kappa'], 2)} ({agreement['method']}, {measured['n_items']} items)"


def _review_section(report: dict) -> dict | None:
    review = report.get("review")
    if not review:
        return None
    blocks = []
    for modality, section in sorted((review.get("modalities") or {}).items()):
        pooled = section["pooled"]
        reading = pooled["reading"]
        blocks.append({
            "modality": modality,
            "n_items": _number(section["n_items"]),
            "n_reviewers": _number(section["n_reviewers"]),
            "detection": _estimate(pooled["detection"], test=True),
            "synthetic_called_synthetic": _estimate(pooled["synthetic_called_synthetic"]),
            "real_called_real": _estimate(pooled["real_called_real"]),
            "reading": [("synthetic items read as the class they were generated for", _estimate(reading["synthetic"])),
                        ("real items read as their recorded class", _estimate(reading["real"]))],
            "per_class": [
                (name, _estimate(share, test=True),
                 _estimate((reading["per_class"].get(name) or {}).get("synthetic")),
                 _estimate((reading["per_class"].get(name) or {}).get("real")))
                for name, share in pooled["per_class"].items()
            ],
            "by_confidence": [(level, _estimate(share)) for level, share in sorted(pooled["by_confidence"].items())],
            "sites": [
                {
                    "site": site,
                    "n_items": _number(entry["n_items"]),
                    "n_reviewers": _number(entry["n_reviewers"]),
                    "detection": _estimate(entry["detection"], test=True),
                    "reviewers": [(label, _estimate(share, test=True)) for label, share in entry["reviewers"].items()],
                    "source_kappa": _kappa(entry["agreement"], "source"),
                    "reading_kappa": _kappa(entry["agreement"], "reading"),
                }
                for site, entry in sorted(section["sites"].items())
            ],
        })  # fmt: skip
    confidence = review.get("confidence")
    return {
        "blocks": blocks,
        "sites": ", ".join(review.get("sites") or []),
        "confidence": _confidence(None if confidence is None else 1 - confidence),
    }


def _contact_sheet(report: dict, run_root: Path) -> tuple[str | None, str]:
    """The synthetic contact sheet as a data URI — only a PNG inside the run's synthetic folder."""
    recorded = (report.get("synthetic") or {}).get("contact_sheet")
    if not recorded:
        return None, "No contact sheet was recorded for this run."
    path = Path(recorded)
    path = (path if path.is_absolute() else run_root / path).resolve()
    if not path.is_relative_to((run_root / "synthetic").resolve()):
        return None, f"Not shown: {recorded} is outside the run's synthetic folder (only synthetic images are shown)."
    if not path.is_file():
        return None, f"Not shown: {recorded} no longer exists."
    png = path.read_bytes()
    if not png.startswith(PNG_MAGIC):
        return None, f"Not shown: {recorded} is not a PNG file."
    return _png_data_uri(
        png
    ), "SYNTHETIC images made by the trained model (one column per class). No real image appears in this report."


def _forbidden_entities(gate: dict | None) -> set[str]:
    """Entity types the gate checked (check names "phi.<ENTITY>")."""
    names = [c.get("name", "") for c in (gate or {}).get("checks", [])]
    return {n.split(".", 1)[1] for n in names if n.startswith("phi.") and n != "phi.scan"}


def _run_section(report: dict) -> dict:
    run = report.get("run") or {}
    config = run.get("config")
    return {
        "id": run.get("id") or "unknown",
        "root": run.get("root") or "",
        "modalities": ", ".join(run.get("modalities") or []) or "not recorded",
        "dp": run.get("dp"),
        "pretraining": {
            modality: _pretraining_rows(record) for modality, record in (run.get("pretraining") or {}).items()
        },
        "generated_at": run.get("generated_at") or "not recorded",
        "versions": [
            (name, version or "not installed") for name, version in sorted((run.get("versions") or {}).items())
        ],
        "config": tomli_w.dumps(_toml_safe(config)) if isinstance(config, dict) else "not recorded",
    }


def _pretraining_rows(record: dict) -> list[tuple[str, str]]:
    """The public data and checkpoint a model started from, as (label, value) rows."""
    labels = [
        ("public_dir", "public data folder"),
        ("images", "public images"),
        ("notes", "public notes"),
        ("labelled", "labels used"),
        ("content_sha256", "public data SHA-256"),
        ("epochs", "epochs"),
        ("checkpoint", "checkpoint"),
        ("weights_sha256", "checkpoint weights SHA-256"),
        ("created", "pretrained at"),
        ("note", "note"),
    ]
    return [(label, str(record[key])) for key, label in labels if key in record]


def _toml_safe(value):
    if isinstance(value, dict):
        return {str(k): _toml_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_toml_safe(v) for v in value if v is not None]
    return value


def _template() -> jinja2.Template:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("fedgen.audits", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["number"] = _number
    return environment.get_template(REPORT_HTML)


def render_html(report: dict, *, run_root: Path) -> str:
    """The report page as one self-contained HTML string."""
    report = _redacted_findings(report)
    gate = report.get("gate")
    synthetic = report.get("synthetic") or {}
    contact_sheet, contact_sheet_caption = _contact_sheet(report, Path(run_root))
    return _template().render(
        run=_run_section(report),
        decision=_decision(gate),
        checks=(gate or {}).get("checks", []),
        privacy=_privacy_section(report),
        membership=_membership_section(report),
        phi=_phi_section(report, _forbidden_entities(gate)),
        image_memorisation=_image_memorisation_section(report),
        fidelity=_fidelity_section(report),
        utility=_utility_section(report),
        bias=_bias_section(report),
        review=_review_section(report),
        contact_sheet=contact_sheet,
        contact_sheet_caption=contact_sheet_caption,
        n_images=_number(synthetic.get("n_images")),
        n_texts=_number(synthetic.get("n_texts")),
        n_hashed=len(synthetic.get("sha256") or {}),
    )


def write_report(audit_dir: str | Path, report: dict) -> tuple[Path, Path]:
    """Write ``audit_dir/report.json`` and ``audit_dir/report.html`` (each atomically).

    ``audit_dir`` is a run's ``audit/`` folder; its parent is the run root, against which the
    recorded contact sheet path is resolved. The page is rendered before anything is written, so
    a failure leaves the previous report in place.
    """
    audit_dir = Path(audit_dir)
    report = _redacted_findings(report)
    html = render_html(report, run_root=audit_dir.parent)
    audit_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = audit_dir / REPORT_JSON, audit_dir / REPORT_HTML
    write_json(json_path, report)
    write_text(html_path, html)
    return json_path, html_path
