"""`fedgen audit RUN --deployment`: the audit submitted to a SuperLink as a run config.

The audit itself, driven through the ServerApp's run config on the simulation engine, is tested
in test_audit_runner.py; these tests cover what the coordinator's command adds around it.
"""

import json
import tomllib

import pytest
from flwr.common.config import fuse_dicts, parse_config_args
from typer.testing import CliRunner

import fedgen.server.deploy
from fedgen.artifacts import RunDir
from fedgen.audits.gate import load_policy, record_decision
from fedgen.audits.report import write_report
from fedgen.cli import app
from fedgen.config import RunConfig
from fedgen.errors import FedgenError
from fedgen.manifest import synthetic_manifest
from fedgen.protocol import AUDIT_RUN_CONFIG
from fedgen.server.deploy import serve_audit
from fedgen.server.flower_cli import AUDIT_SERVER_APP, FLOWER_COMPLETED, run_config_args, write_flower_app
from tests.test_gate import example_report

runner = CliRunner()


@pytest.fixture
def run(tmp_path) -> RunDir:
    run = RunDir.create(tmp_path / "runs", RunConfig(modality="text"), "r1")
    run.synthetic.mkdir(parents=True, exist_ok=True)
    (run.synthetic / "texts.jsonl").write_text('{"text": "Feels calmer.", "label": "Normal"}\n')
    return run


def _write_audit(run: RunDir, policy=None) -> None:
    """What the ServerApp with task=audit leaves in the run folder."""
    report = record_decision(
        example_report(modalities=("text",)), load_policy(policy), audited_files=synthetic_manifest(run.synthetic)
    )
    write_report(run.audit, report)


def test_flower_accepts_the_audit_run_config_the_coordinator_sends(tmp_path):
    """Flower drops nothing silently but refuses keys the app does not declare: all three are."""
    app_dir = write_flower_app(tmp_path / "app", server_app=AUDIT_SERVER_APP, run_config=AUDIT_RUN_CONFIG)
    pyproject = tomllib.loads((app_dir / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["components"]["serverapp"] == "fedgen.server.audit_app:app"
    defaults = pyproject["tool"]["flwr"]["app"]["config"]
    assert defaults == {"run-dir": "", "policy": "", "inception": ""}
    args = run_config_args({"run-dir": "/runs/my run", "policy": "", "inception": "/w/i.pt"})
    assert args[::2] == ["--run-config"] * 3
    assert fuse_dicts(defaults, parse_config_args(args[1::2])) == {
        "run-dir": "/runs/my run", "policy": "", "inception": "/w/i.pt"
    }  # fmt: skip


def test_a_value_flower_cannot_quote_is_one_line():
    with pytest.raises(FedgenError, match="policy .* must not contain a single quote"):
        run_config_args({"policy": "/tmp/o'brien.toml"})


def test_serve_audit_submits_the_audit_app_and_returns_the_new_report(run, monkeypatch, tmp_path):
    submitted = []

    def superlink(run_, app_, task_config, **options):
        submitted.append((app_[1], task_config))
        _write_audit(run_)
        return FLOWER_COMPLETED

    monkeypatch.setattr(fedgen.server.deploy, "_run_on_superlink", superlink)
    policy = tmp_path / "p.toml"
    assert serve_audit(run, certs=None, policy=policy) == run.audit / "report.json"
    assert submitted == [(AUDIT_SERVER_APP, {"policy": str(policy.resolve()), "inception": ""})]


@pytest.mark.parametrize("status", [FLOWER_COMPLETED, "finished:failed"])
def test_an_audit_that_wrote_no_new_report_is_an_error(run, monkeypatch, status):
    _write_audit(run)  # an earlier audit's report stays: it is not this audit's
    monkeypatch.setattr(fedgen.server.deploy, "_run_on_superlink", lambda *args, **kwargs: status)
    with pytest.raises(FedgenError, match=f"did not finish \\(Flower status {status}\\)"):
        serve_audit(run, certs=None)


def test_cli_deployment_prints_the_decision_the_server_app_wrote(run, monkeypatch):
    calls = []

    def fake_serve_audit(run_, *, certs, policy, inception, port, host, echo):
        calls.append((run_.root, certs, policy, port, host))
        _write_audit(run_)
        return run_.audit / "report.json"

    monkeypatch.setattr(fedgen.server.deploy, "serve_audit", fake_serve_audit)
    monkeypatch.setattr("fedgen.audits.inputs.check_inputs", lambda run: None)  # no ledger or checkpoints here
    args = ["audit", str(run.root), "--deployment", "--insecure", "--host", "127.0.0.1", "--port", "0", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert calls == [(run.root, None, None, 0, "127.0.0.1")]
    decision = json.loads(result.stdout)
    assert decision["passed"] is True and decision["report_html"] == str(run.audit / "report.html")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--insecure"], "--insecure is for --deployment"),
        (["--deployment"], "give --certs DIR"),
        (["--deployment", "--insecure", "--site", "x"], "--site names simulated sites"),
    ],
)
def test_cli_deployment_options_are_checked_first(run, extra, message):
    result = runner.invoke(app, ["audit", str(run.root), *extra])
    assert result.exit_code == 1
    assert message in result.output
    assert not run.audit.exists()
