"""The release gate: the consortium's policy applied to an audit report.

A policy is a TOML file (the default ships as ``audits/policy.toml``, which documents every
threshold). ``evaluate_gate`` turns the report's figures into named checks; the release passes
only when every check passes, and a figure the audit did not measure (null or absent) FAILS its
check with a detail saying so — nothing passes by being missing.

The accountant's ε is a guarantee, the attacks are measurements; both are checked, and one more
check ties them together: an attack's empirical ε lower bound above the accountant's ε would
mean the DP training is broken, so it refuses the release too.

Attack figures are measured on a few hundred examples, where sampling noise alone can exceed a
policy's limit. So an attack figure fails its check only above the larger of the policy's limit
and what an attack within the limit reaches at the run's counts (``audits.mia``), with the
policy's ``chance_confidence`` shared by all those checks together (Bonferroni: a run is audited
by several attacks, and each extra check would otherwise add its own chance of refusing a model
within the policy):

- AUC: what an attack that only guesses reaches (``chance_auc_bound``);
- TPR at 1% FPR: what an attack whose TPR at 1% FPR is exactly the policy's limit reaches
  (``limit_tpr_bound``). With 123 held-out records the "1% FPR" threshold is the second-highest
  held-out score, whose true FPR is often 2-5%: an attack with a weak signal that the policy
  allows then measures far above the limit. Refusing only above this bound refuses only what
  the counts show to exceed the limit, and the bound shrinks to the limit as records grow.

A check decided by such a bound says so: the sample was too small to show the attack stays
within the policy's limit.
"""

from __future__ import annotations

import math
import tomllib
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from fedgen.errors import FedgenError

__all__ = ["Policy", "load_policy", "evaluate_gate", "record_decision", "phi_release_plan", "DEFAULT_POLICY"]

DEFAULT_POLICY = "default"  # what the report records as the policy's source when none is given
_DEFAULT_POLICY_FILE = "policy.toml"
FPR_1PCT = 0.01
PHI_REPLAY_MAX = 0  # a synthetic text holding a site's own identifier refuses the release, whatever the policy
DEFAULT_CHANCE_CONFIDENCE = 0.95
MEMBERSHIP_FIGURES = ("auc", "tpr_at_1pct_fpr")  # the attack figures held to a limit


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PrivacyPolicy(_Section):
    allow_no_dp: bool
    max_epsilon: float | None = Field(None, gt=0)


class MembershipPolicy(_Section):
    auc_max: float = Field(ge=0, le=1)
    tpr_at_1pct_fpr_max: float = Field(ge=0, le=1)
    chance_confidence: float = Field(DEFAULT_CHANCE_CONFIDENCE, gt=0, lt=1)


class PhiPolicy(_Section):
    max_findings: int = Field(ge=0)
    forbidden_entities: list[str]
    # What the release does with findings of forbidden_entities: "refuse" holds them to
    # max_findings; "placeholder" / "surrogate" replace them (fedgen.audits.phi_redaction).
    action: Literal["refuse", "placeholder", "surrogate"] = "refuse"

    @field_validator("forbidden_entities")
    @classmethod
    def _known_entities(cls, value: list[str]) -> list[str]:
        from fedgen.audits.phi import PHI_ENTITIES  # heavy (Presidio): only when a policy is loaded

        unknown = [name for name in value if name not in PHI_ENTITIES]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a scanner entity type ({', '.join(PHI_ENTITIES)})")
        return value


class MemorisationPolicy(_Section):
    canary_reproductions_max: int = Field(ge=0)
    planted_phi_reproductions_max: int = Field(ge=0)
    near_copies_max: int = Field(ge=0)
    near_copy_measures: list[Literal["pixel", "feature"]] = Field(min_length=1)
    ngram_copies_max: int | None = Field(None, ge=0)


class FidelityPolicy(_Section):
    image_precision_min: float = Field(ge=0, le=1)
    image_fid_max: float | None = Field(None, ge=0)
    text_frechet_distance_max: float | None = Field(None, ge=0)


class UtilityPolicy(_Section):
    synthetic_to_real_ratio_min: float = Field(ge=0)


class Policy(_Section):
    """Release thresholds. ``source`` is the file it came from, or "default"."""

    privacy: PrivacyPolicy
    membership: MembershipPolicy
    phi: PhiPolicy
    memorisation: MemorisationPolicy
    fidelity: FidelityPolicy
    utility: UtilityPolicy
    _source: str = PrivateAttr(DEFAULT_POLICY)

    @model_validator(mode="after")
    def _no_dp_needs_no_cap(self) -> Policy:
        if self.privacy.allow_no_dp and self.privacy.max_epsilon is not None:
            raise ValueError(
                f"privacy.allow_no_dp = true but privacy.max_epsilon = {self.privacy.max_epsilon} "
                "refuses every run without DP; remove max_epsilon"
            )
        return self

    @property
    def source(self) -> str:
        return self._source


def _first_error(err: ValidationError) -> str:
    """One line for the first problem; an unknown key first, since a misspelt key is also missing."""
    errors = err.errors()
    e = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    where = ".".join(str(p) for p in e["loc"])
    message = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    if e["type"] == "missing":
        return f"{where}: missing (every key of the default policy is required)"
    return f"{where} = {e['input']!r}: {message}" if where and "input" in e else f"{where}: {message}"


def load_policy(path: str | Path | None = None) -> Policy:
    """The policy in ``path``, or the shipped default policy when ``path`` is None."""
    if path is None:
        text = resources.files("fedgen.audits").joinpath(_DEFAULT_POLICY_FILE).read_text(encoding="utf-8")
        where, source = "default policy", DEFAULT_POLICY
    else:
        path = Path(path)
        if not path.is_file():
            raise FedgenError(f"policy file not found: {path}")
        text = path.read_text(encoding="utf-8")
        where, source = f"policy file {path}", str(path)
    try:
        policy = Policy.model_validate(tomllib.loads(text))
    except tomllib.TOMLDecodeError as err:
        raise FedgenError(f"{where} is not valid TOML: {err}") from None
    except ValidationError as err:
        raise FedgenError(f"{where}: {_first_error(err)}") from None
    policy._source = source
    return policy


# --- checks -----------------------------------------------------------------------------------


def _lookup(report: dict, *path: str) -> tuple[object, str | None]:
    """The value at ``path`` (None when any part is absent) and the "note" of its parent."""
    node: object = report
    parent: object = None
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None, None
        parent, node = node, node[key]
    note = parent.get("note") if isinstance(parent, dict) else None
    return node, note


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _fmt(value: float) -> str:
    if isinstance(value, int) or not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def _check(name: str, passed: bool, value: object, detail: str, threshold: float | None = None) -> dict:
    return {"name": name, "passed": passed, "value": value, "threshold": threshold, "detail": detail}


def _unmeasured(name: str, what: str, note: str | None = None, threshold: float | None = None) -> dict:
    """A figure the audit did not produce: the check FAILS, saying why when the report says."""
    reason = f": {note}" if note else ""
    return _check(name, False, None, f"{what} was not measured{reason}", threshold)


def _bound(name: str, what: str, value: object, threshold: float, *, at_most: bool, note: str | None = None) -> dict:
    """A figure held to a threshold: ``value <= threshold`` (at_most) or ``>=``."""
    if not _is_number(value):
        return _unmeasured(name, what, note, threshold)
    passed = value <= threshold if at_most else value >= threshold
    sign = "≤" if at_most else "≥"
    return _check(name, bool(passed), value, f"{what} = {_fmt(value)} (must be {sign} {_fmt(threshold)})", threshold)


def _without(check: dict, section: object) -> dict:
    """A check on a pooled figure that names the sites too small to be in it, and why (the
    section's "not_measured"): a figure measured at some sites only passes or fails on those,
    and says so. A figure no site measured already fails with that reason as its note."""
    left_out = section.get("not_measured") if isinstance(section, dict) else None
    if not left_out or check["value"] is None:
        return check
    reasons = "; ".join(f"{site}: {why}" for site, why in sorted(left_out.items()))
    return check | {"detail": f"{check['detail']}; pooled without {reasons}"}


def _dp_check(report: dict, policy: PrivacyPolicy) -> dict:
    dp, _ = _lookup(report, "run", "dp")
    epsilon_max, note = _lookup(report, "privacy", "epsilon_max")
    if not isinstance(dp, bool):
        return _unmeasured("privacy.dp", "whether the run was trained with DP")
    if not dp and policy.allow_no_dp:
        return _check("privacy.dp", True, epsilon_max, "trained WITHOUT DP, which this policy allows")
    if not dp:
        return _check(
            "privacy.dp", False, epsilon_max, "trained WITHOUT DP (ε = inf): refused unless the policy sets allow_no_dp"
        )
    if not _is_number(epsilon_max):
        return _unmeasured("privacy.dp", "the largest accountant ε", note)
    if not math.isfinite(epsilon_max):
        return _check("privacy.dp", False, epsilon_max, "the run says DP but the accountant ε is inf")
    return _check("privacy.dp", True, epsilon_max, f"trained with DP, largest accountant ε = {_fmt(epsilon_max)}")


def _budget_checks(report: dict) -> list[dict]:
    """One check per site: its ε over every modality it trained against its one budget."""
    sites, _ = _lookup(report, "privacy", "sites")
    if not sites:
        return [_unmeasured("privacy.sites", "the accountant ε of any site")]
    checks = []
    for site, spent in sorted(sites.items()):
        name = f"privacy.{site}.budget"
        budget = spent.get("budget")
        if not _is_number(budget):
            checks.append(_unmeasured(name, f"the privacy budget of {site}"))
            continue
        modalities = " and ".join(sorted(spent.get("modalities") or {})) or "no modality"
        what = f"{site} accountant ε, {modalities} ({spent.get('composition')}; its budget is {_fmt(budget)})"
        checks.append(_bound(name, what, spent.get("epsilon"), budget, at_most=True, note=spent.get("note")))
    return checks


def _privacy_checks(report: dict, policy: PrivacyPolicy) -> list[dict]:
    checks = [_dp_check(report, policy), *_budget_checks(report)]
    if policy.max_epsilon is not None:
        epsilon_max, note = _lookup(report, "privacy", "epsilon_max")
        what = "largest accountant ε of any site"
        checks.append(_bound("privacy.max_epsilon", what, epsilon_max, policy.max_epsilon, at_most=True, note=note))
    return checks


def _accountant_epsilon(report: dict, modality: str) -> float | None:
    """The largest ε of one modality's updates alone: what an attack on that model is held to."""
    sites, _ = _lookup(report, "privacy", "sites")
    spent = [
        s["modalities"][modality].get("epsilon") for s in (sites or {}).values() if modality in s.get("modalities", {})
    ]
    spent = [e for e in spent if _is_number(e)]
    return max(spent) if spent else None


def _too_few_for_1pct(summary: dict) -> str | None:
    """Why a TPR at 1% FPR can be missing: under 100 held-out records, 1% is not one record."""
    n = summary.get("n_nonmembers")
    if _is_number(n) and n * FPR_1PCT < 1:
        return (
            f"{n} held-out records are too few for a 1% false-positive rate (at least {math.ceil(1 / FPR_1PCT)} needed)"
        )
    return None


def _attack_figures(report: dict, modalities: list[str]) -> int:
    """How many attack figures the gate holds to a limit: the Bonferroni family."""
    attacks = [_lookup(report, "membership", m, "attacks")[0] or {} for m in modalities]
    return max(len(MEMBERSHIP_FIGURES) * sum(len(a) for a in attacks), 1)


def _sample_bound(figure: str, summary: dict, threshold: float, confidence: float) -> float | None:
    """What an attack within ``threshold`` stays at or below at the summary's counts (None:
    counts unknown): one that only guesses for the AUC, one exactly at the limit for the TPR."""
    from fedgen.audits.mia import chance_auc_bound, limit_tpr_bound  # scipy: only when attacks are checked

    n_members, n_nonmembers = summary.get("n_members"), summary.get("n_nonmembers")
    if not (_is_number(n_members) and _is_number(n_nonmembers) and n_members > 0 and n_nonmembers > 0):
        return None
    if figure == "auc":
        return chance_auc_bound(int(n_members), int(n_nonmembers), confidence=confidence)
    return limit_tpr_bound(int(n_members), int(n_nonmembers), level=FPR_1PCT, limit=threshold, confidence=confidence)


def _attack_check(
    name: str, what: str, summary: dict, figure: str, threshold: float, *, confidence: float, note: str | None
) -> dict:
    """An attack figure held to max(policy limit, sample bound), saying which bound applied.

    Extra keys: ``bound`` (the limit applied), ``bound_source`` ("policy" or "chance"),
    ``chance_bound`` and ``chance_confidence`` (this check's share of the family's confidence).
    """
    value = summary.get(figure)
    chance = _sample_bound(figure, summary, threshold, confidence)
    if not _is_number(value) or chance is None:
        return _bound(name, what, value, threshold, at_most=True, note=note)
    small = chance > threshold
    bound = chance if small else threshold
    counts = f"{summary['n_members']} training and {summary['n_nonmembers']} held-out records"
    within = "an attack that only guesses" if figure == "auc" else f"an attack exactly at the limit {_fmt(threshold)}"
    if small:
        detail = (
            f"{what} = {_fmt(value)}; the policy's limit is {_fmt(threshold)}, but with {counts} {within} "
            f"reaches up to {_fmt(chance)} ({100 * confidence:.3g}% confidence), so only a value "
            f"above {_fmt(chance)} is refused: the sample is too small to show the attack stays within {_fmt(threshold)}"
        )
    else:
        detail = (
            f"{what} = {_fmt(value)} (must be ≤ {_fmt(threshold)}; {within} reaches up to {_fmt(chance)} with {counts})"
        )
    check = _check(name, bool(value <= bound), value, detail, threshold)
    return check | {
        "bound": bound,
        "bound_source": "chance" if small else "policy",
        "chance_bound": chance,
        "chance_confidence": confidence,
    }


def _membership_checks(report: dict, modality: str, policy: MembershipPolicy, *, figures: int) -> list[dict]:
    attacks, note = _lookup(report, "membership", modality, "attacks")
    section, _ = _lookup(report, "membership", modality)
    if not attacks:
        return [_unmeasured(f"membership.{modality}", f"any {modality} membership attack", note)]
    accountant = _accountant_epsilon(report, modality)
    confidence = 1 - (1 - policy.chance_confidence) / figures
    limits = {"auc": (policy.auc_max, "AUC"), "tpr_at_1pct_fpr": (policy.tpr_at_1pct_fpr_max, "TPR at 1% FPR")}
    checks = []
    for attack, result in sorted(attacks.items()):
        prefix = f"membership.{modality}.{attack}"
        pooled = result.get("pooled") or {}
        for figure in MEMBERSHIP_FIGURES:
            threshold, label = limits[figure]
            why_missing = pooled.get("note") or (_too_few_for_1pct(pooled) if figure == "tpr_at_1pct_fpr" else None)
            what = f"{attack} attack {label}"
            check = _attack_check(
                f"{prefix}.{figure}", what, pooled, figure, threshold, confidence=confidence, note=why_missing
            )
            checks.append(_without(check, section))
        bound, bound_note = _lookup(report, "membership", modality, "empirical_epsilon", attack, "eps_lb")
        name = f"{prefix}.empirical_epsilon"
        what = f"{attack} attack's empirical ε lower bound"
        if accountant is None:
            checks.append(
                _unmeasured(name, f"the accountant ε of {modality} (to compare the {attack} lower bound with)")
            )
        else:
            checks.append(
                _bound(
                    name, what + " (must not exceed the accountant ε)", bound, accountant, at_most=True, note=bound_note
                )
            )
    return checks


def _phi_checks(report: dict, policy: PhiPolicy) -> list[dict]:
    """One check per forbidden entity type: refused above max_findings, or (placeholder,
    surrogate) passed with the number the release replaces. Nothing passes unscanned."""
    n_texts, note = _lookup(report, "phi", "n_texts")
    counts, _ = _lookup(report, "phi", "counts")
    if not _is_number(n_texts) or n_texts < 1 or not isinstance(counts, dict):
        return [_unmeasured("phi.scan", "PHI in the synthetic texts (no texts were scanned)", note)]
    if policy.action == "refuse":
        return [
            _bound(f"phi.{entity}", f"{entity} findings in {n_texts} synthetic texts", counts.get(entity, 0),
                   policy.max_findings, at_most=True)
            for entity in policy.forbidden_entities
        ]  # fmt: skip
    done = "typed placeholders" if policy.action == "placeholder" else "consistent surrogates"
    return [
        _check(f"phi.{entity}", True, counts.get(entity, 0),
               f"{entity} findings in {n_texts} synthetic texts = {counts.get(entity, 0)}: replaced by {done} at release")
        for entity in policy.forbidden_entities
    ]  # fmt: skip


def phi_release_plan(report: dict, policy: Policy) -> dict:
    """What the release does with the synthetic texts' PHI findings: the policy's action, the
    entity types it applies to and how many findings of each it replaces (none under refuse)."""
    counts = (report.get("phi") or {}).get("counts") or {}
    kinds = list(policy.phi.forbidden_entities)
    replaced = {} if policy.phi.action == "refuse" else {k: counts[k] for k in kinds if counts.get(k)}
    return {"action": policy.phi.action, "entities": kinds, "replaced": replaced}


MEMORISATION_WHAT = {
    "canary_reproductions": "canary records reproduced in synthetic texts",
    "phi_replay": "synthetic texts holding an identifier the detector found in a site's own training notes",
    "planted_phi_reproductions": "identifiers of training notes reproduced in synthetic texts",
    "ngram_copies": "n-grams of training notes copied into synthetic texts",
    "near_copies_pixel": "synthetic images that are near copies of training images (raw pixels)",
    "near_copies_feature": "synthetic images that are near copies of training images (audit features)",
}


def _counts_checks(report: dict, section: tuple[str, ...], limits: dict[str, int | None], prefix: str) -> list[dict]:
    checks = []
    for key, limit in limits.items():
        if limit is None:
            continue
        value, note = _lookup(report, *section, key)
        checks.append(_bound(f"{prefix}.{key}", MEMORISATION_WHAT[key], value, limit, at_most=True, note=note))
    return checks


def _memorisation_checks(report: dict, modality: str, policy: MemorisationPolicy) -> list[dict]:
    if modality == "text":
        limits = {
            "canary_reproductions": policy.canary_reproductions_max,
            "phi_replay": PHI_REPLAY_MAX,  # not the policy's: replay of a site's own PHI is always refused
            "planted_phi_reproductions": policy.planted_phi_reproductions_max,
            "ngram_copies": policy.ngram_copies_max,
        }
        return _counts_checks(report, ("phi", "memorisation"), limits, "memorisation.text")
    checks = []
    for measure in policy.near_copy_measures:
        key = f"near_copies_{measure}"
        name, what = f"memorisation.image.{key}", MEMORISATION_WHAT[key]
        value, note = _lookup(report, "image_memorisation", key)
        chance, _ = _lookup(report, "image_memorisation", f"{key}_chance")
        if not _is_number(chance):
            checks.append(_unmeasured(name, what, "the count that chance gives is missing"))
            continue
        check = _bound(name, what, value, policy.near_copies_max + chance, at_most=True, note=note)
        if check["value"] is not None:
            chance_part = f"; {chance} of them are what images the model never saw would show by chance"
            check = check | {"detail": check["detail"] + chance_part}
        checks.append(check)
    return checks


def _fidelity_checks(report: dict, modality: str, policy: FidelityPolicy) -> list[dict]:
    if modality == "image":
        bounds = [
            ("precision", "image precision", policy.image_precision_min, False),
            ("fid", "FID", policy.image_fid_max, True),
        ]
    else:
        bounds = [("frechet_distance", "text embedding Fréchet distance", policy.text_frechet_distance_max, True)]
    checks = []
    for key, what, threshold, at_most in bounds:
        if threshold is None:
            continue
        value, note = _lookup(report, "fidelity", modality, key)
        check = _bound(f"fidelity.{modality}.{key}", what, value, threshold, at_most=at_most, note=note)
        checks.append(_without(check, _lookup(report, "fidelity", modality)[0]))
    return checks


def _utility_checks(report: dict, modality: str, policy: UtilityPolicy) -> list[dict]:
    """The utility classifier's ratio, and the reference classifier's when the sites ran one.

    A ratio the audit refused to score (its real-trained classifier not clearly better than
    chance) fails. The reference is a second opinion: where it cannot learn the task from real
    data either, its ratio says nothing and the check passes saying so.
    """
    value, note = _lookup(report, "utility", modality, "synthetic_to_real_ratio")
    what = f"{modality} synthetic-to-real macro-F1 ratio"
    minimum = policy.synthetic_to_real_ratio_min
    section, _ = _lookup(report, "utility", modality)
    ratio = _bound(f"utility.{modality}.synthetic_to_real_ratio", what, value, minimum, at_most=False, note=note)
    checks = [_without(ratio, section)]
    reference, _ = _lookup(report, "utility", modality, "reference")
    if isinstance(reference, dict):
        name = f"utility.{modality}.reference.synthetic_to_real_ratio"
        what = f"{what} of the reference classifier ({reference.get('classifier')})"
        if (reference.get("real_classifier") or {}).get("competent") is False:
            checks.append(_check(name, True, None, f"{what} not applied: {reference.get('note')}", minimum))
        else:
            value = reference.get("synthetic_to_real_ratio")
            checks.append(_bound(name, what, value, minimum, at_most=False, note=reference.get("note")))
    return checks


def _modality_checks(report: dict, modality: str, policy: Policy, *, figures: int) -> list[dict]:
    checks = _membership_checks(report, modality, policy.membership, figures=figures)
    if modality == "text":
        checks += _phi_checks(report, policy.phi)
    checks += _memorisation_checks(report, modality, policy.memorisation)
    checks += _fidelity_checks(report, modality, policy.fidelity)
    checks += _utility_checks(report, modality, policy.utility)
    return checks


def evaluate_gate(report: dict, policy: Policy) -> dict:
    """The gate's decision on an audit report: {"passed", "policy", "checks": [...]}.

    Each check is {"name", "passed", "value", "threshold", "detail"}. The modalities checked are
    the run's (``report["run"]["modalities"]``); a modality whose figures are absent fails.
    """
    checks = _privacy_checks(report, policy.privacy)
    modalities, _ = _lookup(report, "run", "modalities")
    if not modalities:
        checks.append(_unmeasured("run.modalities", "which modalities the run trained"))
    figures = _attack_figures(report, modalities or [])
    for modality in modalities or []:
        checks += _modality_checks(report, modality, policy, figures=figures)
    return {
        "passed": all(check["passed"] for check in checks),
        "policy": policy.source,
        "checks": checks,
    }


def record_decision(report: dict, policy: Policy, *, audited_files: dict[str, str]) -> dict:
    """The report with the fingerprints of the audited synthetic files (``synthetic_manifest``,
    taken before the audit read them, fedgen.manifest) and the gate's decision on it."""
    report = report | {"synthetic": (report.get("synthetic") or {}) | {"sha256": audited_files}}
    if report.get("phi") is not None:
        report = report | {"phi": report["phi"] | {"release": phi_release_plan(report, policy)}}
    return report | {"gate": evaluate_gate(report, policy)}
