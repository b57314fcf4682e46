"""Deployment: `fedgen server` / `fedgen client` as real processes on loopback, TLS and node keys.

The end-to-end tests are slow by nature (every ClientApp call is a fresh process importing
torch, and a crashed site is noticed by Flower's heartbeat after about a minute), so one run
covers several properties: training, a site crash mid-round, a coordinator crash and resume.
Every process a test starts runs in its own session and is killed, with all its descendants,
when the test ends.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from PIL import Image
from typer.testing import CliRunner

from fedgen.artifacts import RunDir
from fedgen.certs import make_certs
from fedgen.cli import app
from fedgen.clients.deploy import failure_reason
from fedgen.config import DR_GRADES, RunConfig, load_config
from fedgen.data.site import load_site
from fedgen.errors import FedgenError
from fedgen.files import write_json
from fedgen.privacy.accounting import epsilon_from_history
from fedgen.privacy.ledger import LedgerEntry, PrivacyLedger
from fedgen.processes import descendants, free_port
from fedgen.server.flower_cli import TRAIN_SERVER_APP, write_flower_app, write_flower_config
from fedgen.server.superlink import SuperLinkGuard
from fedgen.server.train_app import rounds_done
from tests.replies import training_metrics

FEDGEN = [sys.executable, "-m", "fedgen"]
TINY = {
    "modality": "image",
    "data": {"image_classes": DR_GRADES},  # the coordinator cannot see the sites' class folders
    "image": {
        "resolution": 16,
        "block_out_channels": [16, 32],
        "norm_num_groups": 4,
        "attention": False,
        "batch_size": 8,
        "sample_steps": 2,
    },
    # A fixed σ and a roomy budget: a round lost in a crash must not end this run early.
    "privacy": {"epsilon": 1000.0, "noise_multiplier": 1.0},
    "federation": {"rounds": 2, "sites": 3, "min_sites": 2, "round_timeout": 150.0},
}
IMAGES_PER_SITE = 40
ROUND_WAIT = 300.0  # seconds: a round on 2 busy cores, or a crashed site noticed by heartbeat
STARTUP_WAIT = 120.0
ORPHAN_WAIT = 15.0  # seconds the Flower processes of a killed fedgen command may take to stop


# --- helpers ------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Processes:
    """The fedgen commands a test started; `kill` ends one with its whole process tree."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.started: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [*FEDGEN, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "COLUMNS": "200"},
            cwd=self.logs,
        )
        proc.log_path = self.logs / f"{name}.log"
        self.started.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL the process and every descendant (a crash: nothing cleans up)."""
        for pid in [*descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)

    def kill_only(self, proc: subprocess.Popen) -> None:
        """SIGKILL the fedgen command's PID alone; every Flower process below it must follow."""
        below = descendants(proc.pid)
        assert below, "the fedgen command runs no Flower process"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + ORPHAN_WAIT
        while any(alive(pid) for pid in below) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in below if alive(pid)], f"{proc.args} left Flower processes running"

    def kill_all(self) -> None:
        for proc in self.started:
            self.kill(proc)


@pytest.fixture
def processes(tmp_path):
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.kill_all()


def wait_for(condition, *, timeout: float, what: str, watch: list[subprocess.Popen] = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        for proc in watch:
            assert proc.poll() is None, f"{proc.args} exited early:\n{tail(proc)}"
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}:\n" + "\n".join(tail(p) for p in watch))


def tail(proc: subprocess.Popen, lines: int = 40) -> str:
    text = proc.log_path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def write_config(path: Path, **federation) -> Path:
    values = {**TINY, "federation": {**TINY["federation"], **federation}}
    path.write_text(tomli_w.dumps(values))
    load_config(path)  # valid
    return path


# --- fast tests: no Flower process --------------------------------------------------------


def _call(guard: SuperLinkGuard, path: str, client: tuple[str, int]) -> int:
    status = {}

    async def downstream(scope, receive, send):
        status["code"] = 200

    async def send(message):
        if message["type"] == "http.response.start":
            status["code"] = message["status"]

    async def receive():
        return {"type": "http.request", "body": b""}

    guard.app = downstream
    scope = {"type": "http", "path": path, "client": client, "method": "POST", "headers": []}
    asyncio.run(guard(scope, receive, send))
    return status["code"]


def test_the_guard_serves_only_the_fleet_api_to_other_hosts_and_only_after_registration(tmp_path):
    gate = tmp_path / "fleet-open"
    guard = SuperLinkGuard(None, gate=gate)
    remote, local = ("10.0.0.7", 5000), ("127.0.0.1", 5000)
    assert _call(guard, "/v1/control/start-run", remote) == 403
    assert _call(guard, "/v1/runtime/acquire-task", remote) == 403
    assert _call(guard, "/v1/control/start-run", local) == 200
    assert _call(guard, "/v1/control/start-run", ("::ffff:127.0.0.1", 5000)) == 200
    assert _call(guard, "/v1/fleet/activate-node", remote) == 503  # sites not registered yet
    gate.touch()
    assert _call(guard, "/v1/fleet/activate-node", remote) == 200


def test_the_flower_app_bundle_holds_no_code(tmp_path):
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    (tmp_path / "app" / "secret.py").parent.mkdir()
    fab = build_fab_from_disk(
        write_flower_app(tmp_path / "app", server_app=TRAIN_SERVER_APP, run_config={"run-dir": ""})
    )
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert names == ["pyproject.toml", ".info/CONTENT"]
    text = zipfile.ZipFile(io.BytesIO(fab)).read("pyproject.toml").decode()
    assert 'serverapp = "fedgen.server.train_app:app"' in text and 'clientapp = "fedgen.clients.app:app"' in text


def test_the_flower_connection_lives_in_our_flwr_home(tmp_path, monkeypatch):
    from flwr.cli.flower_config import read_superlink_connection

    write_flower_config(tmp_path / "flwr", port=9999, ca_cert=tmp_path / "ca.crt")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    connection = read_superlink_connection(None)
    assert connection.address == "127.0.0.1:9999"
    assert connection.root_certificates == str((tmp_path / "ca.crt").resolve())
    assert connection.insecure is False


def test_a_round_recorded_but_not_checkpointed_counts_as_done(tmp_path):
    run = RunDir.create(tmp_path, RunConfig(), "r")
    (run.round_dir(1) / "image").mkdir(parents=True)
    write_json(run.round_dir(1) / "image" / "metrics.json", {})
    ledger = PrivacyLedger(run.ledger_path)
    for round_ in (1, 2):
        ledger.record(LedgerEntry("site-1", "image", round_, round_, 1.0, 1.0, 1e-5, 1.0, 0.1, 5, 10, float("nan")))
    assert run.completed_rounds("image") == [1]
    assert rounds_done(run) == {"image": 2}  # resume starts from checkpoint 1 as round 3


@pytest.fixture
def task_identity():
    """Messages need the identity a Flower runtime sets; give them one outside a runtime."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None


class LateGrid:
    """A grid on which the third site comes online only after the first look."""

    def __init__(self):
        self.looks = 0

    def get_node_ids(self):
        self.looks += 1
        return [11, 12] if self.looks == 1 else [11, 12, 13]


def _reply(node_id: int, site: str):
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    sent = Message(content=RecordDict(), dst_node_id=node_id, message_type="train")
    metrics = training_metrics(loss=float("nan"))
    content = RecordDict(
        {
            "arrays": ArrayRecord(numpy_ndarrays=[np.ones(2, dtype=np.float32)]),
            "metrics": MetricRecord(metrics),
            "site": ConfigRecord({"name": site}),
        }
    )
    return Message(content=content, reply_to=sent)


def _strategy(tmp_path, **federation):
    from fedgen.server.strategy import make_strategy

    config = RunConfig.model_validate({"federation": {"sites": 3, "min_sites": 2, **federation}})
    return make_strategy(config, ledger=PrivacyLedger(tmp_path / "ledger.sqlite"), modality="image")


def test_a_site_that_connects_late_is_still_in_the_first_round(tmp_path, task_identity):
    from flwr.app import ArrayRecord, ConfigRecord

    strategy = _strategy(tmp_path)
    messages = strategy.configure_train(1, ArrayRecord(), ConfigRecord(), LateGrid())
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12, 13]
    assert strategy.min_available_nodes == 2  # later rounds go on without a crashed site


def test_a_round_with_too_few_replies_fails_but_keeps_the_spent_epsilon(tmp_path, task_identity):
    from flwr.app import Error, Message, RecordDict

    strategy = _strategy(tmp_path)
    strategy.round_offset = 4  # a resumed run: its first round is round 5
    crashed = Message(
        Error(code=0, reason="node unavailable"),
        reply_to=Message(content=RecordDict(), dst_node_id=12, message_type="train"),
    )
    with pytest.raises(FedgenError, match="round 5: 1 site\\(s\\) replied, fewer than min_sites = 2"):
        strategy.aggregate_train(1, [_reply(11, "site-1"), crashed])
    assert [(e.site, e.round) for e in strategy.ledger.entries()] == [("site-1", 5)]


def test_the_federation_ends_when_too_few_sites_have_budget_left(tmp_path, task_identity):
    from flwr.app import ArrayRecord, ConfigRecord

    from fedgen.server.strategy import BudgetSpent

    strategy = _strategy(tmp_path)
    strategy.spent_nodes = {11, 12}
    with pytest.raises(BudgetSpent, match="1 site\\(s\\) have privacy budget left for round 3"):
        strategy.configure_train(3, ArrayRecord(), ConfigRecord(), LateGrid())


def test_flowers_failure_report_becomes_one_line():
    lines = [
        "INFO: Starting Flower SuperNode",
        "ERROR :     Exit Code: 305",
        "Failed to initialize the connection to the SuperLink.",
        "[code: 2004] Failed to activate SuperNode.",
        "",
        "For more information, visit: <https://flower.ai/...>",
        "INFO: Shutting down",
    ]
    assert failure_reason(lines) == (
        "Failed to initialize the connection to the SuperLink. [code: 2004] Failed to activate SuperNode."
    )


def test_a_site_key_that_is_not_an_ecdsa_openssh_key_is_named(tmp_path):
    from fedgen.clients.deploy import check_credentials

    certs = make_certs(tmp_path / "certs", sites=1)
    check_credentials(key=certs.site_private_key(1), ca=certs.ca_cert)
    with pytest.raises(FedgenError, match="server.key is not an unencrypted OpenSSH private key"):
        check_credentials(key=certs.server_key, ca=certs.ca_cert)
    with pytest.raises(FedgenError, match="site-1.pub is not a PEM certificate"):
        check_credentials(key=certs.site_private_key(1), ca=certs.site_public_key(1))


def test_the_server_needs_certs_or_an_explicit_insecure(tmp_path):
    result = CliRunner().invoke(app, ["server", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "give --certs DIR" in result.output
    assert list(tmp_path.iterdir()) == []  # no run folder made


def test_a_busy_port_or_an_unservable_host_is_refused_before_the_run_folder_is_made(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = ["server", "--insecure", "--runs-dir", str(tmp_path), "--port", str(port)]
        taken = CliRunner().invoke(app, [*args, "--host", "127.0.0.1"])
        elsewhere = CliRunner().invoke(app, [*args, "--host", "10.9.8.7"])
    assert taken.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in taken.output
    assert elsewhere.exit_code == 1 and "--host must be 0.0.0.0" in elsewhere.output
    assert list(tmp_path.iterdir()) == []


def test_resuming_from_a_truncated_checkpoint_is_one_line_before_anything_starts(tmp_path):
    from fedgen.modalities import get_modality

    run = RunDir.create(tmp_path / "runs", RunConfig.model_validate(TINY), "r")
    modality = get_modality("image", run.config(), work_dir=run.base_models)
    checkpoint = run.round_dir(1) / "image"
    modality.save(modality.build_model(), checkpoint)
    write_json(checkpoint / "metrics.json", {})
    weights = next(checkpoint.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    result = CliRunner().invoke(
        app, ["server", "--insecure", "--resume", str(run.root), "--port", str(free_port()), "--host", "127.0.0.1"]
    )
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: image model weights {weights} are corrupt or truncated: Error while deserializing header: invalid header length"
    ]
    assert "Traceback" not in result.output and "--resume" not in result.output
    assert not (run.root / "flwr").exists()  # no SuperLink was started


def test_a_bad_site_is_refused_before_anything_starts(tmp_path):
    site = tmp_path / "site"
    (site / "images" / "Not_A_Grade").mkdir(parents=True)
    Image.new("L", (8, 8)).save(site / "images" / "Not_A_Grade" / "a.png")
    (site / "images" / "Not_A_Grade" / "b.png").write_bytes(b"not a png")
    result = CliRunner().invoke(app, ["client", "--server", "127.0.0.1:1", "--data", str(site), "--insecure"])
    assert result.exit_code == 1
    assert "problem:" in result.output and "b.png: not a readable image" in result.output
    assert not (site / ".fedgen").exists()  # no SuperNode ever started for it


# --- real processes on loopback -----------------------------------------------------------


@pytest.fixture
def consortium(tmp_path):
    from fedgen.data.demo import make_demo_consortium

    certs = make_certs(tmp_path / "certs", sites=3)
    sites = make_demo_consortium(
        tmp_path / "sites", sites=3, seed=1, images_per_site=IMAGES_PER_SITE, texts_per_site=10, resolution=16
    )
    return certs, sites


def client_args(port: int, site: Path, key: Path, ca: Path, config: Path, *extra: str) -> list[str]:
    return [
        "client",
        "--server",
        f"127.0.0.1:{port}",
        "--data",
        str(site),
        "--key",
        str(key),
        "--ca",
        str(ca),
        "--config",
        str(config),
        *extra,
    ]


@pytest.mark.e2e
def test_tls_and_node_keys_keep_strangers_out(consortium, processes, tmp_path):
    certs, sites = consortium
    coordinator = tmp_path / "coordinator"  # knows sites 1 and 2 only
    coordinator.mkdir()
    for name in ("ca.crt", "server.crt", "server.key"):
        shutil.copy(certs.root / name, coordinator / name)
    (coordinator / "authorized-keys").write_text("\n".join(certs.public_keys()[:2]) + "\n")
    other = make_certs(tmp_path / "other-consortium", sites=1)
    config = write_config(tmp_path / "fed.toml", sites=2)
    port = free_port()
    server = processes.start(
        "server",
        [  # a relative --runs-dir: the commands run in tmp_path
            "server",
            "--config",
            str(config),
            "--certs",
            str(coordinator),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--runs-dir",
            "runs",
        ],
    )
    wait_for(
        lambda: "Successfully started run" in server.log_path.read_text(),
        timeout=STARTUP_WAIT,
        what="the SuperLink to register the sites and accept the run",
        watch=[server],
    )

    limit = ["--max-wait", "10"]
    strangers = {
        "unregistered": client_args(port, sites[2], certs.site_private_key(3), certs.ca_cert, config, *limit),
        "wrong-ca": client_args(port, sites[0], certs.site_private_key(1), other.ca_cert, config, *limit),
        "plain": [
            "client",
            "--server",
            f"127.0.0.1:{port}",
            "--data",
            str(sites[1]),
            "--insecure",
            "--config",
            str(config),
            *limit,
        ],
    }
    started = {name: processes.start(name, args) for name, args in strangers.items()}
    for proc in started.values():
        proc.wait(timeout=STARTUP_WAIT)
    outputs = {name: proc.log_path.read_text() for name, proc in started.items()}
    assert {name: proc.returncode for name, proc in started.items()} == dict.fromkeys(strangers, 1)
    assert "[code: 2004] Failed to activate SuperNode" in outputs["unregistered"]
    assert "certificate verify failed" in outputs["wrong-ca"]
    assert "could not join" in outputs["plain"]
    assert server.poll() is None  # the coordinator is still waiting for its real sites
    run = next((tmp_path / "runs").iterdir())
    assert PrivacyLedger(RunDir(run).ledger_path).entries() == []


@pytest.mark.e2e
def test_sites_refuse_a_noise_multiplier_below_their_floor_in_deployment(consortium, processes, tmp_path):
    """site-1 keeps the default policy (σ at least 0.3); site-2's `fedgen client` flag sets 0.25."""
    certs, sites = consortium
    config = tmp_path / "fed.toml"
    config.write_text(
        tomli_w.dumps(
            {
                **TINY,
                "privacy": {"epsilon": 1000.0, "noise_multiplier": 0.2},
                "federation": {**TINY["federation"], "sites": 2, "min_sites": 2},
            }
        )
    )
    port = free_port()
    server = processes.start(
        "server",
        [
            "server",
            "--config",
            str(config),
            "--certs",
            str(certs.root),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--runs-dir",
            str(tmp_path / "runs"),
            "--run-id",
            "weak",
        ],
    )
    processes.start("site-1", client_args(port, sites[0], certs.site_private_key(1), certs.ca_cert, config))
    processes.start(
        "site-2",
        client_args(port, sites[1], certs.site_private_key(2), certs.ca_cert, config, "--min-noise-multiplier", "0.25"),
    )
    server.wait(timeout=STARTUP_WAIT + ROUND_WAIT)
    log = server.log_path.read_text()
    assert server.returncode == 1, tail(server)
    assert "site-1 refuses to train image: σ = 0.2 is below its floor min_noise_multiplier = 0.3" in log
    assert "site-2 refuses to train image: σ = 0.2 is below its floor min_noise_multiplier = 0.25" in log
    run = RunDir(tmp_path / "runs" / "weak")
    assert PrivacyLedger(run.ledger_path).entries() == [] and run.completed_rounds("image") == []


# What `flwr` commands rewrite in place when they find it in their working directory.
LEGACY_PYPROJECT = """
[project]
name = "decoy"
version = "1.0.0"

[tool.flwr.app]
publisher = "someone"

[tool.flwr.app.components]
serverapp = "fedgen.server.train_app:app"
clientapp = "fedgen.clients.app:app"

[tool.flwr.federations]
default = "local"

[tool.flwr.federations.local]
options.num-supernodes = 3
"""


@pytest.mark.e2e
def test_a_consortium_survives_a_site_crash_and_a_coordinator_crash(consortium, processes, tmp_path):
    certs, sites = consortium
    (tmp_path / "pyproject.toml").write_text(LEGACY_PYPROJECT)  # the working directory's, not ours
    config = write_config(tmp_path / "fed.toml")
    port = free_port()
    server_args = ["--certs", str(certs.root), "--port", str(port), "--host", "127.0.0.1"]
    server = processes.start(
        "server",
        [
            "server",
            "--config",
            str(config),
            *server_args,
            "--runs-dir",
            str(tmp_path / "runs"),
            "--run-id",
            "deploy",
        ],
    )
    clients = [
        processes.start(f"site-{k}", client_args(port, sites[k - 1], certs.site_private_key(k), certs.ca_cert, config))
        for k in (1, 2, 3)
    ]
    run = RunDir(tmp_path / "runs" / "deploy")
    wait_for(
        lambda: "Receiving: train message" in clients[2].log_path.read_text(),
        timeout=STARTUP_WAIT,
        what="round 1 to reach site-3",
        watch=[server, *clients],
    )
    processes.kill_only(clients[2])  # site-3's fedgen client is killed (-9) in the middle of round 1
    wait_for(
        lambda: run.completed_rounds("image") == [1],
        timeout=ROUND_WAIT,
        what="round 1 without site-3",
        watch=[server, *clients[:2]],
    )
    processes.kill_only(server)  # the coordinator's fedgen server is killed (-9) after round 1

    clients[2] = processes.start(
        "site-3-again", client_args(port, sites[2], certs.site_private_key(3), certs.ca_cert, config)
    )
    resumed = processes.start("server-resumed", ["server", "--resume", str(run.root), *server_args])
    resumed.wait(timeout=STARTUP_WAIT + ROUND_WAIT)
    assert resumed.returncode == 0, tail(resumed)

    assert run.completed_rounds("image") == [1, 2]
    ledger = PrivacyLedger(run.ledger_path)
    rows = [r for r in ledger.entries(modality="image") if not r.lost]
    assert sorted((r.site, r.round) for r in rows) == [
        ("site-1", 1),
        ("site-1", 2),
        ("site-2", 1),
        ("site-2", 2),
        ("site-3", 2),
    ]
    assert set(json.loads((run.round_dir(1) / "image" / "metrics.json").read_text())["sites"]) == {"site-1", "site-2"}
    # site-1's SuperNode was restarted and round 2 is a new Flower run (empty context.state):
    # the ε it reported still covers every update it released, read from its durable ledger.
    site_ledger = next((sites[0] / ".fedgen" / "runs").iterdir()) / "ledger.sqlite"
    releases = PrivacyLedger(site_ledger).entries(site="site-1", modality="image")
    round_one, round_two = (next(r for r in rows if (r.site, r.round) == ("site-1", k)) for k in (1, 2))
    assert len(releases) >= 2
    assert round_two.epsilon == pytest.approx(
        epsilon_from_history([(e.noise_multiplier, e.sample_rate, e.steps) for e in releases], delta=round_two.delta)
    )
    assert round_two.epsilon > round_one.epsilon
    # Every update a site released has its row at the coordinator, a lost reply's too: the ε
    # each site reported last is recomputed from the coordinator's rows alone.
    for site in ("site-1", "site-2", "site-3"):
        every = ledger.entries(site=site)
        assert every[-1].site_epsilon == pytest.approx(
            epsilon_from_history([r.entry for r in every], delta=every[-1].delta), rel=1e-6
        )
    assert len(ledger.entries(site="site-1")) == len(releases)
    assert (tmp_path / "pyproject.toml").read_text() == LEGACY_PYPROJECT


@pytest.mark.e2e
def test_a_deployed_consortium_is_audited_at_its_sites(processes, tmp_path):
    """`fedgen audit RUN --deployment`: two SuperNodes answer the audit on their own records."""
    from fedgen.data.demo import make_demo_consortium
    from fedgen.generate import generate_images
    from tests.test_audit_runner import train_one_round

    certs = make_certs(tmp_path / "certs", sites=2)
    # 120 images: held-out splits of at least audits.fidelity.MIN_AGGREGATE_COUNT records
    sites = make_demo_consortium(
        tmp_path / "sites", sites=2, seed=1, images_per_site=120, texts_per_site=10, resolution=16
    )
    config_path = write_config(tmp_path / "fed.toml", sites=2, min_sites=2, rounds=1)
    run = RunDir.create(tmp_path / "runs", load_config(config_path), "deployed")
    train_one_round(run, sites[:2], run.config())
    generate_images(run, per_class=4)  # 20: the fewest a site counts memorisation on
    port = free_port()
    audit = processes.start(
        "audit",
        [
            "audit",
            str(run.root),
            "--deployment",
            "--certs",
            str(certs.root),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--json",
        ],
    )
    clients = [
        processes.start(
            f"site-{k}", client_args(port, sites[k - 1], certs.site_private_key(k), certs.ca_cert, config_path)
        )
        for k in (1, 2)
    ]
    wait_for(
        lambda: audit.poll() is not None, timeout=STARTUP_WAIT + ROUND_WAIT, what="the audit to finish", watch=clients
    )
    assert audit.returncode == 0, tail(audit)

    report = json.loads((run.audit / "report.json").read_text())
    records = sum(len(load_site(root, RunConfig().data, modalities=("image",)).image_paths) for root in sites[:2])
    loss = report["membership"]["image"]["attacks"]["loss"]
    assert set(loss["sites"]) == {"site-1", "site-2"}
    assert loss["pooled"]["n_members"] + loss["pooled"]["n_nonmembers"] == records
    # every site's real images reached a per-class answer (classes this small get counts, not figures)
    assert sum(c["n_real"] for c in report["fidelity"]["image"]["per_class"].values()) == records
    decision = json.loads(audit.log_path.read_text().splitlines()[-1])
    assert decision["report_json"] == str(run.audit / "report.json")
