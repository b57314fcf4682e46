"""The compliance officer's report: decision first, self-contained, redacted, readable in a browser."""

import base64
import io
import json
import re
import shutil
import subprocess

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fedgen.artifacts import RunDir
from fedgen.audits.gate import evaluate_gate, load_policy
from fedgen.audits.report import write_report
from fedgen.cli import app
from fedgen.config import RunConfig
from fedgen.manifest import synthetic_manifest
from fedgen.models.diffusion import contact_sheet
from fedgen.privacy.dp_sgd import noise_source
from tests.test_gate import default_policy_text, example_report

DECISION_RED = (0xB4, 0x23, 0x18)  # the refused decision box's background in the template
CHROMIUM = "chromium"
CHROMIUM_TIMEOUT = 60


@pytest.fixture(scope="module")
def policy():
    return load_policy()


def _run_with_sheet(tmp_path) -> RunDir:
    run = RunDir.create(tmp_path / "runs", RunConfig(modality="both"), "r1")
    (run.synthetic / "images" / "Mild").mkdir(parents=True)
    torch.manual_seed(0)
    contact_sheet({"No_DR": torch.rand(4, 1, 16, 16) * 2 - 1, "Mild": torch.rand(4, 1, 16, 16) * 2 - 1}).save(
        run.synthetic / "contact-sheet.png"
    )
    return run


def _refused_report(run: RunDir, policy) -> dict:
    report = example_report()
    report["synthetic"]["contact_sheet"] = str(run.synthetic / "contact-sheet.png")
    report["phi"]["memorisation"]["canary_reproductions"] = 1
    report["gate"] = evaluate_gate(report, policy)
    return report


def _data_uris(html: str) -> list[str]:
    return re.findall(r'src="(data:image/png;base64,[^"]+)"', html)


def test_report_files_hold_the_report_and_the_decision_comes_first(tmp_path, policy):
    run = _run_with_sheet(tmp_path)
    report = _refused_report(run, policy)
    json_path, html_path = write_report(run.audit, report)

    assert (json_path, html_path) == (run.audit / "report.json", run.audit / "report.html")
    assert json.loads(json_path.read_text())["gate"] == report["gate"]
    assert sorted(p.name for p in run.audit.iterdir()) == ["report.html", "report.json"]  # no temp files left
    html = html_path.read_text()
    decision = html.index("REFUSED — release blocked")
    assert decision < html.index("1. Privacy guarantee")
    # the failed check is listed inside the decision box, not only in the table at the end
    assert decision < html.index("memorisation.text.canary_reproductions") < html.index("1. Privacy guarantee")
    assert "guaranteed by the accountant" in html
    assert "measured — a lower bound, not a guarantee" in html
    assert "Clinical validation is still needed" in html


def test_a_passing_report_says_pass(tmp_path, policy):
    report = example_report()
    report["gate"] = evaluate_gate(report, policy)
    _, html_path = write_report(tmp_path / "audit", report)
    html = html_path.read_text()
    assert "PASS — release allowed" in html
    assert "REFUSED" not in html


def test_the_privacy_table_gives_each_sites_total_first_and_says_different_people(tmp_path, policy):
    report = example_report()
    report["privacy"]["accountant"] = "prv"
    report["privacy"]["noise"] = noise_source(False)
    report["privacy"]["sites"]["site-2"]["composition"] = "different people"
    report["gate"] = evaluate_gate(report, policy)
    _, html_path = write_report(tmp_path / "audit", report)
    html = html_path.read_text()
    section = html[html.index("1. Privacy guarantee") : html.index("2. ")]
    assert "Opacus' <b>PRV</b> accountant" in section
    assert "Mersenne Twister" in section and "NOT a cryptographically secure generator" in section
    site_two = section[section.index("<td>site-2</td>") :]
    site_two = site_two[: site_two.index("</tr>")]
    cells = re.findall(r"<td[^>]*>(.*?)</td>", site_two)
    # total, budget, within, composition, δ, then each modality's own ε, σ and rounds
    assert cells[:5] == ["site-2", "7.5", "10", '<span class="ok">yes</span>', "different people"]
    assert cells[6:9] == ["5", "1.1", "3"]
    assert "same people" in section[section.index("<td>site-1</td>") :]


def test_the_page_is_self_contained(tmp_path, policy):
    run = _run_with_sheet(tmp_path)
    _, html_path = write_report(run.audit, _refused_report(run, policy))
    html = html_path.read_text()

    assert "<script" not in html
    assert "<link" not in html
    assert "url(" not in html
    assert "http://" not in html and "https://" not in html
    assert "@import" not in html
    every_source = re.findall(r'(?:src|href)="([^"]*)"', html)
    uris = _data_uris(html)
    assert every_source == uris  # every src is an inline PNG, and there is no href at all
    # the sites' ε over rounds (all modalities), ROC curves for image and text, the contact sheet
    assert len(uris) == 4
    for uri in uris:
        png = base64.b64decode(uri.removeprefix("data:image/png;base64,"))
        assert Image.open(io.BytesIO(png)).format == "PNG"
    sheet = base64.b64encode((run.synthetic / "contact-sheet.png").read_bytes()).decode()
    assert f"data:image/png;base64,{sheet}" in uris


def test_only_a_contact_sheet_inside_the_synthetic_folder_is_shown(tmp_path, policy):
    run = _run_with_sheet(tmp_path)
    real = run.root / "real-looking.png"
    shutil.copy(run.synthetic / "contact-sheet.png", real)
    report = _refused_report(run, policy)
    report["synthetic"]["contact_sheet"] = str(real)
    html = write_report(run.audit, report)[1].read_text()
    assert len(_data_uris(html)) == 3  # the plots only: the sites' ε and one ROC per modality
    assert "outside the run&#39;s synthetic folder" in html


def test_phi_values_are_redacted_in_both_files(tmp_path, policy):
    report = example_report()
    planted = "Maria Lopez"
    # a finding whose value slipped through unredacted, with a raw text field beside it
    report["phi"]["findings"].append(
        {
            "index": 7,
            "entity_type": "PERSON",
            "start": 0,
            "end": 11,
            "score": 0.85,
            "redacted": planted,
            "text": f"{planted} at 12 Elm St",
        }
    )
    report["gate"] = evaluate_gate(report, policy)
    json_path, html_path = write_report(tmp_path / "audit", report)
    for text in (json_path.read_text(), html_path.read_text()):
        assert "Maria" not in text and "Lopez" not in text and "Elm St" not in text
    assert "M**** L****" in html_path.read_text()
    saved = json.loads(json_path.read_text())["phi"]["findings"][-1]
    assert saved == {
        "index": 7,
        "entity_type": "PERSON",
        "start": 0,
        "end": 11,
        "score": 0.85,
        "redacted": "M**** L****",
    }


def test_a_run_without_dp_gets_a_loud_banner(tmp_path, policy):
    report = example_report(modalities=("image",))
    report["run"]["dp"] = False
    report["gate"] = evaluate_gate(report, policy)
    html = write_report(tmp_path / "audit", report)[1].read_text()
    assert 'id="no-dp"' in html
    assert "trained WITHOUT differential privacy" in html

    report["run"]["dp"] = True
    assert 'id="no-dp"' not in write_report(tmp_path / "audit", report)[1].read_text()


def test_missing_figures_read_not_measured_and_a_bare_report_still_renders(tmp_path, policy):
    report = example_report(modalities=("image",))
    report["fidelity"]["image"]["precision"] = None
    report["gate"] = evaluate_gate(report, policy)
    html = write_report(tmp_path / "a", report)[1].read_text()
    assert re.search(r"precision: synthetic images inside[^<]*</td><td class=\"num\">not measured", html)

    bare = {"run": {"id": "bare", "modalities": ["image"], "dp": True}}
    html = write_report(tmp_path / "b", bare)[1].read_text()
    assert "NO DECISION" in html
    assert "No privacy accounting was recorded" in html


@pytest.mark.e2e
def test_a_real_headless_browser_renders_the_page(tmp_path, policy):
    chromium = shutil.which(CHROMIUM)
    assert chromium, "chromium is not on PATH: install it (Debian: apt-get install -y chromium)"
    run = _run_with_sheet(tmp_path)
    _, html_path = write_report(run.audit, _refused_report(run, policy))
    shot = tmp_path / "shot.png"
    result = subprocess.run(
        [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
            f"--screenshot={shot}", "--window-size=1200,2000", html_path.resolve().as_uri(),
        ],
        capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    # page-level problems Chromium logs: console messages, script errors, failed loads
    page_errors = [
        line for line in result.stderr.splitlines()
        if "CONSOLE" in line or "Uncaught" in line or "net::ERR" in line or "Not allowed to load" in line
    ]  # fmt: skip
    assert page_errors == []
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2000)
    assert len(set(image.getdata())) > 100  # text, tables and plots, not a blank page
    top = set(image.crop((0, 0, 1200, 400)).getdata())
    assert DECISION_RED in top, "the red REFUSED box is not at the top of the page"


# --- `fedgen audit` -----------------------------------------------------------------------------

runner = CliRunner()


def _fake_runner(monkeypatch, report: dict) -> list:
    """Stand in for the federated audit (it needs trained models and sites)."""
    calls = []

    def run_audit(run, *, sites=None, inception=None, progress=True):
        calls.append((run.root, sites))
        return json.loads(json.dumps(report))

    monkeypatch.setattr("fedgen.simulations.engine.run_audit", run_audit)
    monkeypatch.setattr("fedgen.audits.inputs.check_inputs", lambda run: None)  # no ledger or checkpoints here
    return calls


def test_audit_writes_the_report_and_prints_the_failed_checks(tmp_path, monkeypatch):
    run = _run_with_sheet(tmp_path)
    report = example_report()
    report["phi"]["memorisation"]["canary_reproductions"] = 2
    calls = _fake_runner(monkeypatch, report)

    result = runner.invoke(app, ["audit", str(run.root)])  # short form of `audit run RUN`
    assert result.exit_code == 0, result.output  # the audit succeeded; `release` enforces the decision
    assert calls == [(run.root, None)]
    assert "REFUSED" in result.output
    assert "FAIL memorisation.text.canary_reproductions" in result.output
    saved = json.loads((run.audit / "report.json").read_text())
    assert saved["gate"]["passed"] is False
    assert saved["synthetic"]["sha256"] == synthetic_manifest(run.synthetic)
    assert (run.audit / "report.html").is_file()


def test_audit_json_prints_the_decision_and_takes_a_policy(tmp_path, monkeypatch):
    run = _run_with_sheet(tmp_path)
    _fake_runner(monkeypatch, example_report())
    strict = tmp_path / "strict.toml"
    strict.write_text(
        default_policy_text().replace("synthetic_to_real_ratio_min = 0.5", "synthetic_to_real_ratio_min = 0.8")
    )

    result = runner.invoke(app, ["audit", "run", str(run.root), "--json", "--policy", str(strict)])
    assert result.exit_code == 0, result.output
    decision = json.loads(result.stdout)
    assert decision["passed"] is False
    assert decision["policy"] == str(strict)
    assert [c["name"] for c in decision["checks"] if not c["passed"]] == [
        "utility.image.synthetic_to_real_ratio", "utility.text.synthetic_to_real_ratio"
    ]  # fmt: skip
    assert decision["report_html"] == str(run.audit / "report.html")


def test_audit_of_a_folder_that_is_not_a_run_is_one_line(tmp_path, monkeypatch):
    _fake_runner(monkeypatch, example_report())
    result = runner.invoke(app, ["audit", str(tmp_path)])
    assert result.exit_code == 1
    assert "is not a fedgen run folder" in result.output
    assert "Traceback" not in result.output


def test_audit_phi_prints_one_json_object_per_finding(tmp_path):
    texts = tmp_path / "texts.jsonl"
    texts.write_text(
        json.dumps({"text": "Call Maria Lopez at (617) 555-0143 today."}) + "\n"
        + json.dumps({"text": "Feeling calmer this week."}) + "\n"
    )  # fmt: skip
    result = runner.invoke(app, ["audit", "phi", "--texts", str(texts), "--json"])
    assert result.exit_code == 0, result.output
    findings = [json.loads(line) for line in result.stdout.splitlines()]
    assert findings == [
        {"index": 0, "entity_type": "PERSON", "start": 5, "end": 16, "score": pytest.approx(0.85)},
        # The phone shape's 0.5, raised by the context word "Call".
        {"index": 0, "entity_type": "PHONE_NUMBER", "start": 20, "end": 34, "score": pytest.approx(0.85)},
    ]

    table = runner.invoke(app, ["audit", "phi", "--texts", str(texts)])
    assert table.exit_code == 0, table.output
    assert "M**** L****" in table.output and "Maria" not in table.output
    assert "2 finding(s) in 2 text(s)" in table.output


def test_audit_phi_names_a_bad_line(tmp_path):
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "fine"}\n{"label": "Normal"}\n')
    result = runner.invoke(app, ["audit", "phi", "--texts", str(texts)])
    assert result.exit_code == 1
    assert "line 2" in result.output


# --- the bias view and the clinical review --------------------------------------------------------


def _bias_and_review(tmp_path) -> tuple[dict, list]:
    """A bias view with a badly served class and site, and two sites' review scores of run r1."""
    from fedgen.audits.bias import bias_view
    from fedgen.audits.review import score_kit
    from tests.test_bias import constructed_report
    from tests.test_review import FIRST, SECOND, write_answers, write_key

    constructed = constructed_report(
        train={
            "site-a": {"No_DR": 400, "Mild": 150, "Severe": 20},
            "site-b": {"No_DR": 300, "Mild": 100, "Severe": 10},
        },
        synthetic={"No_DR": 100, "Mild": 100, "Severe": 100},
        class_f1={"No_DR": (0.9, 0.8), "Mild": (0.8, 0.55), "Severe": (0.6, 0.18)},
        site_f1={"site-a": (0.8, 0.6), "site-b": (0.9, 0.4)},
    )
    scores = []
    for n, (site, plan) in enumerate((("site-a", FIRST), ("site-b", SECOND))):
        kit = write_key(tmp_path / f"kit-{site}", kit=f"k{n}", site=site)
        answers = [write_answers(tmp_path / f"{site}-{r}.json", f"Dr {r}", plan, kit=f"k{n}") for r in ("X", "Y")]
        scores.append(score_kit(kit, answers))
    return constructed | {"bias": bias_view(constructed)}, scores


def test_the_report_shows_who_is_served_badly_and_the_clinical_review(tmp_path, policy):
    from fedgen.audits.review import pool_scores

    run = _run_with_sheet(tmp_path)
    extra, scores = _bias_and_review(tmp_path)
    report = _refused_report(run, policy) | extra | {"review": pool_scores(scores, run_id="r1")}
    _, html_path = write_report(run.audit, report)
    html = html_path.read_text()
    bias = html[html.index("7. Who the synthetic data serves") : html.index("8. Clinical review")]
    assert "3 warning(s) for the image data" in bias  # Severe twice, site-b once
    assert "class Severe: a classifier trained on synthetic data scores F1 0.18" in bias
    assert "site site-b: a classifier trained on synthetic data scores macro-F1 0.40" in bias
    assert "The synthetic mix of classes differs from the real one" in bias and "--per-class" in bias
    assert "700 (71%)" in bias and '<td class="num">980</td>' in bias  # pooled over sites, with the share
    review = html[html.index("8. Clinical review") : html.index("9. Synthetic data")]
    assert "What this shows" in review and "What it does not show" in review
    # both sites' reviewers answered every item twice (two reviewers each): 2 x 6 + 2 x 5 of 32
    assert "0.69 (0.50–0.84), 22 of 32; p = 0.05 against 0.5" in review
    assert "Cohen&#39;s kappa, 8 items" in review and "site-a" in review and "site-b" in review


def test_a_report_without_review_says_how_to_run_one(tmp_path, policy):
    run = _run_with_sheet(tmp_path)
    _, html_path = write_report(run.audit, _refused_report(run, policy))
    html = html_path.read_text()
    assert "No clinical review was recorded" in html and "fedgen review kit" in html


def test_audit_review_pools_the_sites_scores_into_the_report(tmp_path, monkeypatch):
    run = _run_with_sheet(tmp_path)
    _fake_runner(monkeypatch, example_report())
    _, scores = _bias_and_review(tmp_path)
    files = []
    for n, site_scores in enumerate(scores):
        files.append(tmp_path / f"scores-{n}.json")
        files[-1].write_text(json.dumps(site_scores | {"run": run.root.name}))
    result = runner.invoke(app, ["audit", str(run.root), "--review", str(files[0]), "--review", str(files[1])])
    assert result.exit_code == 0, result.output
    saved = json.loads((run.audit / "report.json").read_text())
    assert saved["review"]["sites"] == ["site-a", "site-b"]
    assert saved["review"]["modalities"]["image"]["pooled"]["detection"]["k"] == 22
    # a kit of another run is refused before the audit starts
    result = runner.invoke(
        app,
        [
            "audit",
            str(run.root),
            "--review",
            str(tmp_path / "scores-0.json"),
            "--review",
            str(tmp_path / "site-a-X.json"),
        ],
    )
    assert result.exit_code == 1 and "not a fedgen review scores file" in result.output
