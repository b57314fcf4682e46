"""``fedgen release``: synthetic data leaves the coordinator only with a passed audit.

Nothing is re-evaluated here: the decision recorded in ``audit/report.json`` by the gate is read
as it is. What is checked is that the files being released are the files that were audited —
the audit recorded the SHA-256 of every synthetic file, and a file changed, added or removed
since then refuses the release. The release folder holds::

    synthetic/...            the audited synthetic data, PHI findings replaced as the policy says
    audit/report.json        the audit and the gate's decision
    audit/report.html
    MANIFEST.sha256          SHA-256 of every file above (`sha256sum -c MANIFEST.sha256` checks it)

When the policy's PHI action is "placeholder" or "surrogate" (``report["phi"]["release"]``,
recorded by the gate), the released texts.jsonl has the audit's findings of the policy's entity
types replaced (fedgen.audits.phi_redaction): the spans the audit recorded, in the texts it
fingerprinted, and nothing else. The manifest lists the files as released.

It is written in a temporary sibling folder and renamed into place, so a refused or failed
release leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

from fedgen.artifacts import RunDir
from fedgen.audits.phi_redaction import redact_texts
from fedgen.audits.report import REPORT_HTML, REPORT_JSON
from fedgen.errors import FedgenError
from fedgen.files import atomic_dir, read_text_records
from fedgen.manifest import synthetic_manifest, write_manifest

__all__ = ["ReleaseRefused", "release"]
SYNTHETIC_DIR = "synthetic"
AUDIT_DIR = "audit"
TEXTS_FILE = "texts.jsonl"


class ReleaseRefused(FedgenError):
    """The gate refused the run, or its synthetic files are not the audited ones.

    The message is one line; ``reasons`` holds one line per failed check or changed file.
    """

    def __init__(self, message: str, reasons: list[str]):
        super().__init__(message)
        self.reasons = reasons


def _read_report(run: RunDir) -> dict:
    json_path, html_path = run.audit / REPORT_JSON, run.audit / REPORT_HTML
    for path in (json_path, html_path):
        if not path.is_file():
            raise FedgenError(f"{run.root} has no audit report ({path} is missing): run `fedgen audit {run.root}` first")
    try:
        report = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise FedgenError(f"{json_path} is not valid JSON ({err.msg}): run `fedgen audit {run.root}` again") from None
    if not isinstance(report, dict):
        raise FedgenError(f"{json_path} is not an audit report: run `fedgen audit {run.root}` again")
    return report


def _gate_refusals(report: dict) -> list[str]:
    """One line per failed check; empty when the recorded decision is a pass."""
    gate = report.get("gate")
    if not isinstance(gate, dict) or not isinstance(gate.get("passed"), bool):
        return ["gate: the report holds no gate decision"]
    failed = [c for c in gate.get("checks") or [] if not c.get("passed")]
    reasons = [f"{c.get('name', '?')}: {c.get('detail', 'failed')}" for c in failed]
    if not gate["passed"] and not reasons:
        reasons = ["gate: refused"]
    return reasons


def _changed_files(audited: dict[str, str], released: dict[str, str]) -> list[str]:
    reasons = []
    for name in sorted(audited.keys() | released.keys()):
        if name not in released:
            reasons.append(f"{SYNTHETIC_DIR}/{name}: removed since the audit")
        elif name not in audited:
            reasons.append(f"{SYNTHETIC_DIR}/{name}: added since the audit")
        elif audited[name] != released[name]:
            reasons.append(f"{SYNTHETIC_DIR}/{name}: changed since the audit")
    return reasons


def _check_destination(run: RunDir, to: Path) -> None:
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise FedgenError(f"release folder {to} already exists and is not empty: choose another --to")
    if to.resolve().is_relative_to(run.synthetic.resolve()) or to.resolve().is_relative_to(run.audit.resolve()):
        raise FedgenError(f"release folder {to} is inside the run's synthetic or audit folder: choose another --to")


def _replace_phi(report: dict, synthetic: Path) -> dict[str, int] | None:
    """Apply the recorded PHI plan to ``synthetic/texts.jsonl`` (in the staging folder); returns
    the spans replaced per type, or None when the plan replaces nothing."""
    phi = report.get("phi") or {}
    plan = phi.get("release")
    path = synthetic / TEXTS_FILE
    if not plan or plan.get("action") == "refuse" or not path.is_file():
        return None
    records = read_text_records(path)
    texts = [record["text"] for record in records]
    findings = [SimpleNamespace(**f) for f in phi.get("findings") or []]
    if any(f.index >= len(texts) or f.end > len(texts[f.index]) for f in findings):
        raise ReleaseRefused("release refused: the audit's PHI findings do not fit the synthetic texts",
                             [f"{SYNTHETIC_DIR}/{TEXTS_FILE}: run `fedgen audit` again"])  # fmt: skip
    redacted, counts = redact_texts(texts, findings, action=plan["action"], kinds=plan["entities"])
    if counts != plan.get("replaced"):
        raise ReleaseRefused("release refused: the audit's PHI findings disagree with its release plan",
                             [f"phi.release: plan {plan.get('replaced')}, findings {counts}"])  # fmt: skip
    lines = [json.dumps(record | {"text": text}, ensure_ascii=False) for record, text in zip(records, redacted)]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return counts


def release(run: RunDir, to: str | Path | None = None) -> Path:
    """Copy the audited synthetic data, the report and a SHA-256 manifest to ``to`` (default:
    ``RUN/release``), only if the recorded gate decision passed and the synthetic files are the
    audited ones. Raises ReleaseRefused otherwise, having written nothing."""
    to = run.release if to is None else Path(to)
    report = _read_report(run)
    refusals = _gate_refusals(report)
    if refusals:
        raise ReleaseRefused(f"release refused: the gate failed {len(refusals)} check(s) of the audit", refusals)
    audited = (report.get("synthetic") or {}).get("sha256")
    if not isinstance(audited, dict):
        raise ReleaseRefused(
            "release refused: the audit recorded no fingerprint of the synthetic files",
            [f"{SYNTHETIC_DIR}: run `fedgen audit {run.root}` again to fingerprint the files it audits"],
        )
    _check_destination(run, to)
    with atomic_dir(to) as staging:
        if run.synthetic.is_dir():
            shutil.copytree(run.synthetic, staging / SYNTHETIC_DIR)
        changed = _changed_files(audited, synthetic_manifest(staging / SYNTHETIC_DIR))
        if changed:
            raise ReleaseRefused(f"release refused: {len(changed)} synthetic file(s) differ from the audited ones", changed)
        _replace_phi(report, staging / SYNTHETIC_DIR)  # after the check: the audited texts, redacted
        (staging / AUDIT_DIR).mkdir()
        for name in (REPORT_JSON, REPORT_HTML):
            shutil.copy2(run.audit / name, staging / AUDIT_DIR / name)
        write_manifest(staging)
    return to
