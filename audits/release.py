"""``fedgen release``: synthetic data leaves the coordinator only with a passed audit.

The release does not take the recorded decision on trust. ``fedgen audit`` seals it
(:func:`seal`): it keeps the policy it applied as ``audit/policy.json`` and, given the
coordinator's credentials, signs a statement of the SHA-256 of report.json, of that policy and
of every synthetic file (``audit/decision.json``). The release

- verifies the signature with the coordinator's certificate (``certs``) and that report.json,
  the policy and the synthetic files are the signed ones;
- re-applies the recorded policy to the recorded figures: a decision edited to "passed" does
  not pass;
- checks the synthetic files against the fingerprints the audit recorded: a file changed,
  added or removed since then refuses the release.

Every problem found is one line of the refusal. The release folder holds::

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

import base64
import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

from fedgen.artifacts import RunDir
from fedgen.audits.gate import Policy, evaluate_gate
from fedgen.audits.phi_redaction import redact_texts
from fedgen.audits.report import REPORT_HTML, REPORT_JSON
from fedgen.certs import ConsortiumCerts, sign, verify
from fedgen.errors import FedgenError
from fedgen.files import atomic_dir, read_text_records, write_json
from fedgen.manifest import synthetic_manifest, write_manifest

__all__ = ["ReleaseRefused", "release", "seal", "POLICY_COPY", "DECISION_FILE"]
SYNTHETIC_DIR = "synthetic"
AUDIT_DIR = "audit"
TEXTS_FILE = "texts.jsonl"
POLICY_COPY = "policy.json"  # in audit/: the policy the gate applied, every setting
DECISION_FILE = "decision.json"  # in audit/: the signed statement of what was decided on


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _statement(run: RunDir, synthetic: dict[str, str]) -> dict:
    return {
        "report_sha256": _sha256(run.audit / REPORT_JSON),
        "policy_sha256": _sha256(run.audit / POLICY_COPY),
        "synthetic_sha256": synthetic,
    }


def _payload(statement: dict) -> bytes:
    return json.dumps(statement, sort_keys=True).encode()


def seal(run: RunDir, policy: Policy, certs: ConsortiumCerts | None) -> None:
    """Keep the policy the audit applied beside its report and, with the coordinator's
    credentials, sign what was decided on (after report.json is written)."""
    write_json(run.audit / POLICY_COPY, {"source": policy.source, "settings": policy.model_dump()})
    (run.audit / DECISION_FILE).unlink(missing_ok=True)
    if certs is None:
        return
    report = json.loads((run.audit / REPORT_JSON).read_text(encoding="utf-8"))
    statement = _statement(run, report["synthetic"]["sha256"])
    signature = base64.b64encode(sign(certs, _payload(statement))).decode()
    write_json(run.audit / DECISION_FILE, {"statement": statement, "signature": signature})


def _signature_problems(run: RunDir, certs: ConsortiumCerts, synthetic: dict[str, str]) -> list[str]:
    """One line per way the run's audit folder differs from what the coordinator signed."""
    path = run.audit / DECISION_FILE
    if not path.is_file():
        return [f"{AUDIT_DIR}/{DECISION_FILE}: missing: the decision is not signed"]
    try:
        signed = json.loads(path.read_text(encoding="utf-8"))
        statement, signature = signed["statement"], base64.b64decode(signed["signature"], validate=True)
    except (ValueError, KeyError, TypeError):
        return [f"{AUDIT_DIR}/{DECISION_FILE}: not a signed decision"]
    if not verify(certs, _payload(statement), signature):
        return [f"{AUDIT_DIR}/{DECISION_FILE}: the signature is not the coordinator's ({certs.server_cert})"]
    now = _statement(run, synthetic)
    names = {"report_sha256": REPORT_JSON, "policy_sha256": POLICY_COPY}
    problems = [
        f"{AUDIT_DIR}/{name}: changed since the audit signed it"
        for key, name in names.items()
        if now[key] != statement.get(key)
    ]
    if now["synthetic_sha256"] != statement.get("synthetic_sha256"):
        problems.append(f"{AUDIT_DIR}/{REPORT_JSON}: its synthetic fingerprints are not the signed ones")
    return problems


def _recorded_policy_refusals(run: RunDir, report: dict) -> list[str]:
    """The recorded policy applied again to the recorded figures: one line per failed check."""
    path = run.audit / POLICY_COPY
    if not path.is_file():
        return [f"{AUDIT_DIR}/{POLICY_COPY}: missing: run `fedgen audit {run.root}` again"]
    try:
        policy = Policy.model_validate(json.loads(path.read_text(encoding="utf-8"))["settings"])
    except (ValueError, KeyError, TypeError):  # pydantic's ValidationError is a ValueError
        return [f"{AUDIT_DIR}/{POLICY_COPY}: not a policy the audit wrote"]
    return _gate_refusals({"gate": evaluate_gate(report, policy)})


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
            raise FedgenError(
                f"{run.root} has no audit report ({path} is missing): run `fedgen audit {run.root}` first"
            )
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


def release(run: RunDir, to: str | Path | None = None, *, certs: ConsortiumCerts | None = None) -> Path:
    """Copy the audited synthetic data, the report and a SHA-256 manifest to ``to`` (default:
    ``RUN/release``), only if the decision is the coordinator's (``certs``: required then),
    the recorded policy passes the recorded figures, and the synthetic files are the audited
    ones. Raises ReleaseRefused otherwise, having written nothing."""
    to = run.release if to is None else Path(to)
    report = _read_report(run)
    audited = (report.get("synthetic") or {}).get("sha256")
    tampered = [] if certs is None else _signature_problems(run, certs, audited)
    if tampered:
        raise ReleaseRefused(f"release refused: {len(tampered)} problem(s) with the signed decision", tampered)
    refusals = list(dict.fromkeys(_gate_refusals(report) + _recorded_policy_refusals(run, report)))
    if refusals:
        raise ReleaseRefused(f"release refused: the gate failed {len(refusals)} check(s) of the audit", refusals)
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
            raise ReleaseRefused(
                f"release refused: {len(changed)} synthetic file(s) differ from the audited ones", changed
            )
        _replace_phi(report, staging / SYNTHETIC_DIR)  # after the check: the audited texts, redacted
        (staging / AUDIT_DIR).mkdir()
        for name in (REPORT_JSON, REPORT_HTML, POLICY_COPY, DECISION_FILE):
            if (run.audit / name).is_file():
                shutil.copy2(run.audit / name, staging / AUDIT_DIR / name)
        write_manifest(staging)
    return to
