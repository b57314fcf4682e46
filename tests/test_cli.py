"""The command line: every command registered, one-line errors, nothing faked."""

import subprocess
import sys

from typer.testing import CliRunner

from fedgen.cli import app

runner = CliRunner()
COMMANDS = ["simulate", "server", "client", "generate", "audit", "release", "data", "demo-data", "certs"]


def test_help_lists_every_command_in_a_real_subprocess():
    out = subprocess.run([sys.executable, "-m", "fedgen", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for command in COMMANDS:
        assert command in out.stdout


def test_every_command_has_help():
    for command in COMMANDS:
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, (command, result.output)
    assert "check" in runner.invoke(app, ["data", "--help"]).output


def test_a_bad_config_file_is_one_line_and_exit_1(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[privacy]\nepsilon = -1\n")
    result = runner.invoke(app, ["data", "check", str(tmp_path), "--config", str(bad)])
    assert result.exit_code == 1
    assert "invalid configuration: privacy.epsilon" in result.output
    assert "Traceback" not in result.output


def test_a_missing_config_file_is_named(tmp_path):
    result = runner.invoke(app, ["data", "check", str(tmp_path), "--config", str(tmp_path / "nope.toml")])
    assert result.exit_code == 1
    assert "config file not found" in result.output


def test_data_check_says_whether_the_sites_models_share_its_budget(tmp_path):
    from fedgen.data.demo import make_demo_consortium

    said = {
        False: "images and notes: taken to be the same people: both models share one ε budget",
        True: "images and notes: different people (site.toml): each model may spend the whole ε budget",
    }
    for different_people, line in said.items():
        site = make_demo_consortium(
            tmp_path / str(different_people),
            sites=1,
            images_per_site=10,
            texts_per_site=10,
            resolution=16,
            different_people=different_people,
        )[0]
        result = runner.invoke(app, ["data", "check", str(site)])
        assert result.exit_code == 0, result.output
        assert line in result.output


def test_generate_refuses_a_folder_that_is_not_a_run(tmp_path):
    result = runner.invoke(app, ["generate", str(tmp_path)])
    assert result.exit_code == 1
    assert "is not a fedgen run folder" in result.output


def test_an_error_quoting_flower_keeps_its_code_and_an_interrupt_is_one_line(monkeypatch, tmp_path):
    import fedgen.certs
    from fedgen.errors import FedgenError

    def refused(*args, **kwargs):
        raise FedgenError("the SuperNode could not join (exit code 1): [code: 2004] Failed to activate SuperNode")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fedgen.certs, "make_certs", refused)
    result = runner.invoke(app, ["certs", str(tmp_path / "c")])
    assert result.exit_code == 1
    assert (
        result.output.strip()
        == "error: the SuperNode could not join (exit code 1): [code: 2004] Failed to activate SuperNode"
    )
    monkeypatch.setattr(fedgen.certs, "make_certs", interrupted)
    result = runner.invoke(app, ["certs", str(tmp_path / "c")])
    assert result.exit_code == 130 and result.output.strip() == "interrupted"
