"""`fedgen release`: only a passed, unchanged audit leaves, with a manifest that checks out."""

import hashlib
import json
import subprocess

import pytest
from typer.testing import CliRunner

from fedgen.artifacts import RunDir
from fedgen.audits.gate import evaluate_gate, load_policy
from fedgen.audits.release import ReleaseRefused, release, seal
from fedgen.audits.report import write_report
from fedgen.certs import make_certs
from fedgen.cli import EXIT_REFUSED, app
from fedgen.config import RunConfig
from fedgen.errors import FedgenError
from fedgen.manifest import MANIFEST_NAME, synthetic_manifest
from tests.test_gate import example_report

runner = CliRunner()


@pytest.fixture(scope="module")
def policy():
    return load_policy()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs") / "creds", sites=1)


def _audited_run(tmp_path, policy, *, edit_report=lambda report: None, certs=None) -> RunDir:
    """A run with synthetic files, audited (report + gate + fingerprints) as `fedgen audit` does."""
    run = RunDir.create(tmp_path / "runs", RunConfig(modality="text"), "r1")
    images = run.synthetic / "images" / "Mild Case"
    images.mkdir(parents=True)
    (images / "00000.png").write_bytes(b"\x89PNG fake image 0")
    (images / "00001.png").write_bytes(b"\x89PNG fake image 1")
    (run.synthetic / "texts.jsonl").write_text('{"text": "Feels calmer.", "label": "Normal"}\n')
    report = example_report(modalities=("text",))  # one modality: fewer plots to draw
    edit_report(report)
    report["synthetic"]["sha256"] = synthetic_manifest(run.synthetic)
    report["gate"] = evaluate_gate(report, policy)
    write_report(run.audit, report)
    seal(run, policy, certs)
    return run


def _canary_copied(report: dict) -> None:
    report["phi"]["memorisation"]["canary_reproductions"] = 1
    report["utility"]["text"]["synthetic_to_real_ratio"] = 0.2


def _siblings(path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir()) if path.parent.exists() else []


def test_a_passed_release_copies_files_whose_hashes_match_the_manifest(tmp_path, policy):
    run = _audited_run(tmp_path, policy)
    out = release(run, tmp_path / "out")

    lines = (out / MANIFEST_NAME).read_text().splitlines()
    listed = {}
    for line in lines:
        digest, name = line.split("  ", 1)
        listed[name] = digest
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert sorted(listed) == sorted(set(on_disk) - {MANIFEST_NAME})
    assert set(listed) == {
        "audit/report.json", "audit/report.html", "audit/policy.json", "synthetic/texts.jsonl",
        "synthetic/images/Mild Case/00000.png", "synthetic/images/Mild Case/00001.png",
    }  # fmt: skip
    for name, digest in listed.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    assert (out / "synthetic/texts.jsonl").read_bytes() == (run.synthetic / "texts.jsonl").read_bytes()
    assert (out / "audit/report.json").read_bytes() == (run.audit / "report.json").read_bytes()
    # the manifest is in sha256sum's own format
    check = subprocess.run(["sha256sum", "--check", "--strict", MANIFEST_NAME], cwd=out, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert _siblings(out) == ["out", "runs"]  # no staging folder left


def test_the_default_destination_is_the_run_release_folder(tmp_path, policy):
    run = _audited_run(tmp_path, policy)
    assert release(run) == run.release
    assert (run.release / MANIFEST_NAME).is_file()


def test_a_refused_release_lists_the_failed_checks_and_writes_nothing(tmp_path, policy):
    run = _audited_run(tmp_path, policy, edit_report=_canary_copied)
    out = tmp_path / "out"
    with pytest.raises(ReleaseRefused) as refused:
        release(run, out)
    assert "the gate failed 2 check(s)" in str(refused.value)
    assert [r.split(":")[0] for r in refused.value.reasons] == [
        "memorisation.text.canary_reproductions", "utility.text.synthetic_to_real_ratio"
    ]  # fmt: skip
    assert not out.exists()
    assert _siblings(out) == ["runs"]


def test_a_synthetic_file_changed_after_the_audit_refuses(tmp_path, policy):
    run = _audited_run(tmp_path, policy)
    (run.synthetic / "texts.jsonl").write_text('{"text": "Call 617-555-0143.", "label": "Normal"}\n')
    (run.synthetic / "images" / "Mild Case" / "00001.png").unlink()
    (run.synthetic / "late.png").write_bytes(b"added later")
    out = tmp_path / "out"
    with pytest.raises(ReleaseRefused) as refused:
        release(run, out)
    assert refused.value.reasons == [
        "synthetic/images/Mild Case/00001.png: removed since the audit",
        "synthetic/late.png: added since the audit",
        "synthetic/texts.jsonl: changed since the audit",
    ]
    assert _siblings(out) == ["runs"]  # the staging copy is gone too


def test_a_report_without_fingerprints_refuses(tmp_path, policy):
    run = _audited_run(tmp_path, policy)
    report = json.loads((run.audit / "report.json").read_text())
    del report["synthetic"]["sha256"]
    (run.audit / "report.json").write_text(json.dumps(report))
    with pytest.raises(ReleaseRefused, match="no fingerprint"):
        release(run, tmp_path / "out")


def test_an_unaudited_run_or_a_used_destination_is_a_one_line_error(tmp_path, policy):
    bare = RunDir.create(tmp_path / "runs", RunConfig(), "bare")
    with pytest.raises(FedgenError, match="no audit report .* run `fedgen audit"):
        release(bare, tmp_path / "out")

    run = _audited_run(tmp_path, policy)
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    with pytest.raises(FedgenError, match="already exists and is not empty"):
        release(run, used)
    assert [p.name for p in used.iterdir()] == ["keep.txt"]
    with pytest.raises(FedgenError, match="inside the run's synthetic or audit folder"):
        release(run, run.synthetic / "out")


def test_cli_release_refused_exits_3_with_one_line_per_failed_check(tmp_path, policy):
    run = _audited_run(tmp_path, policy, edit_report=_canary_copied)
    result = runner.invoke(app, ["release", str(run.root), "--to", str(tmp_path / "out")])
    assert result.exit_code == EXIT_REFUSED == 3
    lines = result.output.splitlines()
    assert "release refused: the gate failed 2 check(s)" in lines[0]
    assert lines[1].startswith(
        "  memorisation.text.canary_reproductions: canary records reproduced in synthetic texts = 1"
    )
    assert lines[2].startswith("  utility.text.synthetic_to_real_ratio: text synthetic-to-real macro-F1 ratio = 0.2")
    assert not (tmp_path / "out").exists()


def test_cli_release_of_a_passed_audit_exits_0(tmp_path, policy):
    run = _audited_run(tmp_path, policy)
    result = runner.invoke(app, ["release", str(run.root), "--to", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert f"released to {tmp_path / 'out'}" in result.output
    assert (tmp_path / "out" / MANIFEST_NAME).is_file()


def test_cli_release_of_a_folder_that_is_not_a_run_exits_1(tmp_path):
    result = runner.invoke(app, ["release", str(tmp_path)])
    assert result.exit_code == 1
    assert "is not a fedgen run folder" in result.output


PHI_NOTES = [
    ("Seen with Chidubem Okonkwo on 14 March 2024, call +44 20 7946 0958.", "Anxiety"),
    ("No identifiers here at all.", "Normal"),
    ("Ms. Aroha Ngata moved to Wellington.", "Depression"),
]


def _phi_findings() -> list[dict]:
    found = []
    for index, (text, _) in enumerate(PHI_NOTES):
        for kind, value in [("PERSON", "Chidubem Okonkwo"), ("DATE_TIME", "14 March 2024"),
                            ("PHONE_NUMBER", "+44 20 7946 0958"), ("PERSON", "Ms. Aroha Ngata"), ("LOCATION", "Wellington")]:  # fmt: skip
            if value in text:
                start = text.index(value)
                found.append({"index": index, "entity_type": kind, "start": start, "end": start + len(value),
                              "score": 0.85, "redacted": "x"})  # fmt: skip
    return found


def _run_with_phi(tmp_path, policy) -> RunDir:
    from fedgen.audits.gate import record_decision

    run = RunDir.create(tmp_path / "runs", RunConfig(modality="text"), "r1")
    run.synthetic.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": text, "label": label}, ensure_ascii=False) for text, label in PHI_NOTES]
    (run.synthetic / "texts.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    report = example_report(modalities=("text",))
    findings = _phi_findings()
    report["phi"]["findings"] = findings
    report["phi"]["counts"] = {
        k: sum(f["entity_type"] == k for f in findings) for k in {f["entity_type"] for f in findings}
    }
    write_report(run.audit, record_decision(report, policy, audited_files=synthetic_manifest(run.synthetic)))
    seal(run, policy, None)
    return run


def test_placeholders_replace_only_the_audited_spans_and_the_manifest_lists_the_released_files(tmp_path, policy):
    run = _run_with_phi(tmp_path, policy)
    out = release(run, tmp_path / "out")
    released = [json.loads(line) for line in (out / "synthetic/texts.jsonl").read_text(encoding="utf-8").splitlines()]
    assert released == [
        {"text": "Seen with [NAME] on [DATE], call [PHONE].", "label": "Anxiety"},
        {"text": "No identifiers here at all.", "label": "Normal"},
        {"text": "[NAME] moved to [PLACE].", "label": "Depression"},
    ]
    # the run's own synthetic files are untouched: the audited texts stay as they were audited
    assert (
        synthetic_manifest(run.synthetic) == json.loads((run.audit / "report.json").read_text())["synthetic"]["sha256"]
    )
    # the manifest lists exactly the files released, with their released hashes
    listed = dict(reversed(line.split("  ", 1)) for line in (out / MANIFEST_NAME).read_text().splitlines())
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    assert set(listed) == on_disk
    assert listed["synthetic/texts.jsonl"] == hashlib.sha256((out / "synthetic/texts.jsonl").read_bytes()).hexdigest()
    check = subprocess.run(["sha256sum", "--check", "--strict", MANIFEST_NAME], cwd=out, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    plan = json.loads((out / "audit/report.json").read_text())["phi"]["release"]
    assert plan["action"] == "placeholder" and plan["replaced"] == {
        "PERSON": 2,
        "DATE_TIME": 1,
        "PHONE_NUMBER": 1,
        "LOCATION": 1,
    }


def test_surrogates_keep_every_character_outside_the_spans(tmp_path, policy):
    surrogate = policy.model_copy(update={"phi": policy.phi.model_copy(update={"action": "surrogate"})})
    run = _run_with_phi(tmp_path, surrogate)
    out = release(run, tmp_path / "out")
    released = [
        json.loads(line)["text"] for line in (out / "synthetic/texts.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert released[1] == PHI_NOTES[1][0]
    assert released[0].startswith("Seen with ") and " on " in released[0] and released[0].endswith(".")
    assert "Chidubem" not in released[0] and "7946" not in released[0] and "Wellington" not in released[2]
    assert released[2].endswith(" moved to " + released[2].rsplit(" moved to ", 1)[1])


def test_a_refusing_phi_policy_releases_the_texts_as_audited(tmp_path, policy):
    refusing = policy.model_copy(update={"phi": policy.phi.model_copy(update={"action": "refuse", "max_findings": 10})})
    run = _run_with_phi(tmp_path, refusing)
    out = release(run, tmp_path / "out")
    assert (out / "synthetic/texts.jsonl").read_bytes() == (run.synthetic / "texts.jsonl").read_bytes()


def _edit(path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def _refusal(run, tmp_path, **kwargs) -> list[str]:
    with pytest.raises(ReleaseRefused) as refused:
        release(run, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
    return refused.value.reasons


def test_a_decision_edited_to_passed_is_refused_by_the_recorded_policy(tmp_path, policy):
    run = _audited_run(tmp_path, policy, edit_report=_canary_copied)
    report = json.loads((run.audit / "report.json").read_text())
    report["gate"]["passed"] = True
    for check in report["gate"]["checks"]:
        check["passed"] = True
    (run.audit / "report.json").write_text(json.dumps(report))
    assert [r.split(":")[0] for r in _refusal(run, tmp_path)] == [
        "memorisation.text.canary_reproductions", "utility.text.synthetic_to_real_ratio"
    ]  # fmt: skip


def test_a_signed_decision_is_released_with_its_signature(tmp_path, policy, certs):
    run = _audited_run(tmp_path, policy, certs=certs)
    out = release(run, tmp_path / "out", certs=certs)
    assert (out / "audit" / "decision.json").read_bytes() == (run.audit / "decision.json").read_bytes()


def test_an_edited_report_policy_or_synthetic_file_of_a_signed_decision_is_refused(tmp_path, policy, certs):
    run = _audited_run(tmp_path, policy, certs=certs)
    report = json.loads((run.audit / "report.json").read_text())
    report["utility"]["text"]["synthetic_to_real_ratio"] = 0.99  # a better figure than measured
    (run.audit / "report.json").write_text(json.dumps(report))
    _edit(run.audit / "policy.json", '"max_epsilon": 10.0', '"max_epsilon": 1000.0')
    assert _refusal(run, tmp_path, certs=certs) == [
        "audit/report.json: changed since the audit signed it",
        "audit/policy.json: changed since the audit signed it",
    ]
    run = _audited_run(tmp_path / "again", policy, certs=certs)
    (run.synthetic / "texts.jsonl").write_text('{"text": "Something else.", "label": "Normal"}\n')
    assert _refusal(run, tmp_path, certs=certs) == ["synthetic/texts.jsonl: changed since the audit"]


def test_a_decision_signed_by_another_key_or_unsigned_is_refused(tmp_path, policy, certs):
    stranger = make_certs(tmp_path / "stranger", sites=1)
    run = _audited_run(tmp_path, policy, certs=stranger)
    assert _refusal(run, tmp_path, certs=certs) == [
        f"audit/decision.json: the signature is not the coordinator's ({certs.server_cert})"
    ]
    (run.audit / "decision.json").unlink()
    assert _refusal(run, tmp_path, certs=certs) == ["audit/decision.json: missing: the decision is not signed"]


def test_the_cli_names_every_problem_in_one_line_each(tmp_path, policy, certs):
    run = _audited_run(tmp_path, policy, certs=certs)
    _edit(run.audit / "policy.json", '"max_epsilon": 10.0', '"max_epsilon": 1000.0')
    result = runner.invoke(app, ["release", str(run.root), "--certs", str(certs.root)])
    assert result.exit_code == EXIT_REFUSED
    assert result.output.strip().splitlines() == [
        "release refused: 1 problem(s) with the signed decision",
        "  audit/policy.json: changed since the audit signed it",
    ]
