"""The coordinator on Flower's deployment engine: SuperLink, site registration, the fedgen run.

`serve` does what `fedgen server` promises (and `serve_audit` what `fedgen audit RUN
--deployment` does), with Flower 1.41's own commands as subprocesses:

1. start `flower-superlink` (TLS with the consortium certificates, SuperNode authentication,
   no runtime dependency installation: offline it fails, online it would pull other wheels);
2. register every authorised site key (`flwr supernode register`) through a connection defined
   in RUN/flwr/config.toml (FLWR_HOME is the run folder's, never the user's ~/.flwr);
3. submit the run (`flwr run APP fedgen --stream --run-config run-dir=RUN --run-config
   task=train|audit ...`) and stream its log;
4. stop the SuperLink, also on errors and Ctrl-C, and check the run folder: training succeeded
   when every modality trained its planned rounds (see server.app.rounds_done), the audit when
   it wrote a new RUN/audit/report.json.

The Flower App submitted is code-less: a pyproject.toml naming `server.app:app` and
`clients.app:app`. Every party imports those from the fedgen it installed, so fedgen ships no
code to the hospitals, versions are whatever each party installed, and nothing from the
coordinator's disk (site data, runs) can end up in the bundle. (A SuperNode would still run
code from any bundle its SuperLink hands it: the sites trust the coordinator.)

Flower 1.41 serves its Fleet, Control and Runtime APIs on ONE port, and its open-source Control
API has no authentication: anyone who reaches the port could register a node or submit a run
(code that every site would execute). So fedgen starts the SuperLink through `run_guarded_superlink`,
which lets other hosts reach only the Fleet API; control and runtime calls must come from the
coordinator's own loopback interface.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path

import tomli_w

from fedgen.artifacts import RunDir
from fedgen.certs import ConsortiumCerts
from fedgen.errors import FedgenError
from fedgen.processes import (
    LOOPBACK,
    ProcessGroup,
    flower_command,
    flower_env,
    process_group,
    toml_literal,
)

__all__ = [
    "serve",
    "serve_audit",
    "check_listen_address",
    "check_outcome",
    "write_flower_app",
    "write_flower_config",
    "superlink_command",
    "run_guarded_superlink",
    "SuperLinkGuard",
    "DEFAULT_PORT",
    "CONNECTION",
    "RUN_DIR_KEY",
    "TASK_KEY",
    "POLICY_KEY",
    "INCEPTION_KEY",
    "TASK_TRAIN",
    "TASK_AUDIT",
]

DEFAULT_PORT = 9092
DEFAULT_HOST = "0.0.0.0"
LISTEN_HOSTS = (DEFAULT_HOST, LOOPBACK)
CONNECTION = "fedgen"  # the SuperLink connection's name in RUN/flwr/config.toml
FLOWER_HOME_FOLDER = "flwr"  # inside the run folder
APP_FOLDER = "flower-app"  # inside the run folder: the code-less Flower App
SUPERLINK_LOG = "superlink.log"
READY_TIMEOUT = 180.0  # seconds for the SuperLink to listen (imports are slow on a busy machine)
POLL_INTERVAL = 0.5
FLEET_PREFIX = "/v1/fleet/"
FLEET_GATE_ENV = "FEDGEN_FLEET_GATE"  # file whose existence opens the Fleet API (see SuperLinkGuard)
FLEET_GATE_FILE = "fleet-open"
FLOWER_COMPLETED = "finished:completed"
RUN_STARTED = re.compile(r"Successfully started run (\d+)")
SERVER_APP = "fedgen.server.app:app"
CLIENT_APP = "fedgen.clients.app:app"
PUBLISHER = "fedgen"
# The run config server/app.py reads (the app's defaults; Flower accepts only declared keys).
RUN_DIR_KEY = "run-dir"  # the run folder, absolute: the ServerApp has its own working directory
TASK_KEY = "task"
TASK_TRAIN = "train"
TASK_AUDIT = "audit"
POLICY_KEY = "policy"  # the audit's policy file, absolute; empty = the shipped default policy
INCEPTION_KEY = "inception"  # the audit's Inception file, absolute, the same at every site; empty = FeatureNet
RUN_CONFIG_DEFAULTS = {RUN_DIR_KEY: "", TASK_KEY: TASK_TRAIN, POLICY_KEY: "", INCEPTION_KEY: ""}

Echo = Callable[[str], None]


# --- files the Flower commands read -------------------------------------------------------


def write_flower_app(directory: Path) -> Path:
    """A Flower App that holds no code: components are imported from the installed fedgen."""
    directory.mkdir(parents=True, exist_ok=True)
    pyproject = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {
            "name": "fedgen",
            "version": version("fedgen"),
            "description": "fedgen's ServerApp and ClientApp, imported from the installed fedgen",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": PUBLISHER,
                    "components": {"serverapp": SERVER_APP, "clientapp": CLIENT_APP},
                    "config": dict(RUN_CONFIG_DEFAULTS),
                }
            }
        },
    }
    (directory / "pyproject.toml").write_text(tomli_w.dumps(pyproject), encoding="utf-8")
    return directory


def write_flower_config(flwr_home: Path, *, port: int, ca_cert: Path | None) -> Path:
    """FLWR_HOME/config.toml with one connection to the local SuperLink (insecure if no CA)."""
    connection: dict[str, object] = {"address": f"{LOOPBACK}:{port}"}
    if ca_cert is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(ca_cert.resolve())
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(
        tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}}),
        encoding="utf-8",
    )
    return path


# --- the SuperLink ------------------------------------------------------------------------


def superlink_command(*, certs: ConsortiumCerts | None, host: str, port: int) -> list[str]:
    """The guarded SuperLink's command line; certs None = insecure (no TLS, no node auth)."""
    command = [sys.executable, "-m", "fedgen.server.deploy", "--host", host, "--port", str(port)]
    command.append("--disable-runtime-dependency-installation")
    if certs is None:
        return [*command, "--insecure"]
    return [
        *command,
        "--ssl-ca-certfile", str(certs.ca_cert.resolve()),
        "--ssl-certfile", str(certs.server_cert.resolve()),
        "--ssl-keyfile", str(certs.server_key.resolve()),
        "--enable-supernode-auth",
    ]


def check_listen_address(host: str, port: int) -> None:
    """Refuse an address the SuperLink cannot serve from, before anything starts or is written.

    Only all interfaces or loopback: the SuperLink's own helpers reach it on 127.0.0.1 (the side
    SuperLinkGuard trusts). A busy port is refused too: another program answering there would
    look like our SuperLink.
    """
    if host not in LISTEN_HOSTS:
        raise FedgenError(
            f"--host must be {DEFAULT_HOST} (serve the sites) or {LOOPBACK} (one machine), got {host!r}"
        )
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is fine
        try:
            sock.bind((host, port))
        except OSError as err:
            raise FedgenError(f"cannot listen on {host}:{port}: {err.strerror}; choose another --port") from None


def wait_until_listening(process: subprocess.Popen, port: int, *, log: Path, timeout: float = READY_TIMEOUT) -> None:
    """Block until the SuperLink accepts connections; a dead process is an error with its reason."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FedgenError(f"the SuperLink exited with code {process.returncode}: {_last_line(log)}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=POLL_INTERVAL):
                return
        except OSError:
            time.sleep(POLL_INTERVAL)
    raise FedgenError(f"the SuperLink did not listen on port {port} within {timeout:.0f} s (log: {log})")


def _last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "exit" in line.lower()]
    return (errors or lines or ["no output"])[-1]


# --- the flwr CLI -------------------------------------------------------------------------


def _flwr(args: Sequence[str]) -> list[str]:
    """A `flwr` command line. Always run it with cwd in a folder fedgen owns: `flwr` commands
    "migrate" a pyproject.toml they find in their working directory, rewriting it in place."""
    return [flower_command("flwr"), *args]


def register_sites(public_keys: Sequence[str], *, key_dir: Path, env: dict[str, str], group: ProcessGroup) -> None:
    """Register every authorised node key with the SuperLink (concurrently: each call is slow)."""
    key_dir.mkdir(parents=True, exist_ok=True)
    calls = []
    for index, line in enumerate(dict.fromkeys(public_keys), start=1):
        path = key_dir / f"key-{index}.pub"
        path.write_text(line + "\n", encoding="utf-8")
        command = _flwr(["supernode", "register", str(path), CONNECTION])
        calls.append((line, group.start(command, env=env, log=subprocess.PIPE, cwd=key_dir)))
    for line, call in calls:
        output, _ = call.communicate()
        if call.returncode != 0:
            comment = line.split()[-1]
            raise FedgenError(f"could not register node key {comment}: {_flower_error(output.decode(errors='replace'))}")


def _flower_error(output: str) -> str:
    """The informative line of a Flower CLI error box."""
    lines = [line.strip(" │╭╮╰╯─\t") for line in output.splitlines()]
    lines = [line for line in lines if line and line != "Error"]
    return lines[-1] if lines else "no output"


def run_config_args(run_config: dict[str, str]) -> list[str]:
    """`--run-config key='value'` for each entry (values are paths or words: TOML literals)."""
    args = []
    for key, value in run_config.items():
        args += ["--run-config", f"{key}={toml_literal(value, what=key)}"]
    return args


def submit_run(app_dir: Path, run_config: dict[str, str], *, env: dict[str, str], echo: Echo, group: ProcessGroup) -> int:
    """Submit a run of the fedgen app, echo its log until it ends; returns Flower's run id."""
    process = group.start(
        _flwr(["run", str(app_dir), CONNECTION, "--stream", *run_config_args(run_config)]),
        env=env,
        log=subprocess.PIPE,
        cwd=app_dir,
    )
    flower_run_id = None
    for raw in process.stdout:
        line = raw.decode(errors="replace").rstrip("\n")
        echo(line)
        match = RUN_STARTED.search(line)
        if match:
            flower_run_id = int(match.group(1))
    process.wait()
    if flower_run_id is None:
        raise FedgenError(f"the SuperLink did not accept the run (flwr run exited with {process.returncode})")
    return flower_run_id


def run_status(flower_run_id: int, *, env: dict[str, str], cwd: Path) -> str:
    """Flower's status of a run, e.g. 'finished:completed' or 'finished:failed'."""
    out = subprocess.run(
        _flwr(["ls", CONNECTION, "--run-id", str(flower_run_id), "--format", "json"]),
        env=env, capture_output=True, text=True, check=False, cwd=cwd,
    )
    try:
        return str(json.loads(out.stdout)["runs"][0]["status"])
    except (ValueError, KeyError, IndexError):
        return "unknown"


# --- the whole coordinator ----------------------------------------------------------------


def _run_on_superlink(
    run: RunDir,
    task_config: dict[str, str],
    *,
    certs: ConsortiumCerts | None,
    port: int,
    host: str,
    echo: Echo,
    interrupted: str,
) -> str:
    """Start a fresh SuperLink, register the sites, submit one run of the fedgen app with
    run-dir=RUN and ``task_config``, stop the SuperLink; returns Flower's status of the run.

    The SuperLink keeps no state between starts (its SQLite file database fails with 'database
    is locked' under load in 1.41); what must survive lives in the run folder, and every start
    registers the keys again. ``interrupted`` is the error shown on Ctrl-C.
    """
    check_listen_address(host, port)
    root = run.root.resolve()  # the flwr commands run with their own working directory
    flwr_home = root / FLOWER_HOME_FOLDER
    write_flower_config(flwr_home, port=port, ca_cert=certs.ca_cert if certs else None)
    app_dir = write_flower_app(root / APP_FOLDER)
    gate = flwr_home / FLEET_GATE_FILE
    gate.unlink(missing_ok=True)
    env = flower_env(flwr_home, **{FLEET_GATE_ENV: str(gate.resolve())})
    log_path = flwr_home / SUPERLINK_LOG
    run_config = {RUN_DIR_KEY: str(root), **task_config}
    try:
        with process_group() as group, log_path.open("ab") as log:
            superlink = group.start(superlink_command(certs=certs, host=host, port=port), env=env, log=log)
            echo(f"SuperLink (pid {superlink.pid}) starting on {host}:{port}; log: {log_path}")
            wait_until_listening(superlink, port, log=log_path)
            if certs is not None:
                register_sites(certs.public_keys(), key_dir=flwr_home / "keys", env=env, group=group)
                echo(f"registered {len(certs.public_keys())} site key(s)")
            gate.touch()
            flower_run_id = submit_run(app_dir, run_config, env=env, echo=echo, group=group)
            return run_status(flower_run_id, env=env, cwd=flwr_home)
    except KeyboardInterrupt:
        raise FedgenError(interrupted) from None


def serve(
    run: RunDir,
    *,
    certs: ConsortiumCerts | None,
    port: int = DEFAULT_PORT,
    host: str = DEFAULT_HOST,
    echo: Echo = print,
) -> None:
    """Run the fedgen run in `run` on a fresh SuperLink; return when it ended, raise if unfinished."""
    # server.app imports torch: import it here, never in the SuperLink's own process
    from fedgen.server.app import rounds_done

    planned = run.config().federation.rounds
    if all(done >= planned for done in rounds_done(run).values()):
        echo(f"{run.root} has trained all its {planned} rounds: nothing to do")
        return
    status = _run_on_superlink(
        run, {TASK_KEY: TASK_TRAIN}, certs=certs, port=port, host=host, echo=echo,
        interrupted=f"interrupted; continue with `fedgen server --resume {run.root}`",
    )
    check_outcome(run, status=status, echo=echo)


def _modified_ns(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.is_file() else None


def serve_audit(
    run: RunDir,
    *,
    certs: ConsortiumCerts | None,
    policy: Path | None = None,
    inception: Path | None = None,
    port: int = DEFAULT_PORT,
    host: str = DEFAULT_HOST,
    echo: Echo = print,
) -> Path:
    """Audit the run on the sites that connect to a fresh SuperLink (the ServerApp with
    task=audit writes RUN/audit/report.{json,html}); returns report.json, raises if none was written.

    ``policy`` None is the shipped default policy; ``inception`` None keeps the FeatureNet for fidelity.
    """
    from fedgen.audits.report import REPORT_JSON

    report = run.audit / REPORT_JSON
    before = _modified_ns(report)
    task_config = {
        TASK_KEY: TASK_AUDIT,
        POLICY_KEY: str(policy.resolve()) if policy else "",
        INCEPTION_KEY: str(inception.resolve()) if inception else "",
    }
    status = _run_on_superlink(
        run, task_config,
        certs=certs, port=port, host=host, echo=echo,
        interrupted=f"interrupted: the audit of {run.root} did not finish; run it again",
    )  # fmt: skip
    if status != FLOWER_COMPLETED or _modified_ns(report) == before:
        raise FedgenError(f"the audit of {run.root} did not finish (Flower status {status}); its reason is in the log above")
    return report


def check_outcome(run: RunDir, *, status: str, echo: Echo) -> None:
    """Return if every modality trained its planned rounds or ended early on purpose, else raise."""
    # server.app imports torch: import it here, never in the SuperLink's own process
    from fedgen.server.app import rounds_done

    planned = run.config().federation.rounds
    unfinished = {m: n for m, n in rounds_done(run).items() if n < planned}
    if not unfinished:
        return
    done = ", ".join(f"{m} {n}/{planned}" for m, n in unfinished.items())
    if status == FLOWER_COMPLETED:  # the ServerApp ended early on purpose (server.strategy.BudgetSpent)
        echo(f"WARNING: the run ended before its planned rounds (rounds done: {done}): too few "
             "sites had privacy budget left")
        return
    raise FedgenError(
        f"run stopped early (Flower status {status}; rounds done: {done}); "
        f"continue with `fedgen server --resume {run.root}`"
    )


# --- the guarded SuperLink ----------------------------------------------------------------


def _is_loopback(client: tuple[str, int] | None) -> bool:
    if client is None:
        return False
    try:
        address = ipaddress.ip_address(client[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class SuperLinkGuard:
    """ASGI middleware in front of the SuperLink's one port.

    - Other hosts may call the Fleet API only; Control and Runtime calls must be local.
    - The Fleet API answers 503 (SuperNodes retry it) until the gate file exists, i.e. until
      the coordinator has registered the site keys. Without the gate a SuperNode that connects
      first is told "not registered" and exits, which happens whenever sites wait for a
      restarting coordinator.
    """

    def __init__(self, app, *, gate: Path | None = None):
        self.app = app
        self.gate = gate

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self._refusal(scope["path"], scope.get("client"))
            if refusal is not None:
                from starlette.responses import PlainTextResponse

                await PlainTextResponse(refusal[1], status_code=refusal[0])(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, path: str, client: tuple[str, int] | None) -> tuple[int, str] | None:
        if not path.startswith(FLEET_PREFIX):
            return None if _is_loopback(client) else (403, "only the Fleet API is served to other hosts")
        if self.gate is not None and not self.gate.exists():
            return (503, "the coordinator is still registering sites")
        return None


def run_guarded_superlink() -> None:
    """`flower-superlink` (same arguments) with SuperLinkGuard as its outermost middleware."""
    import flwr.superlink.main as superlink_main
    from flwr.superlink.cli.flower_superlink import flower_superlink
    from starlette.middleware import Middleware

    # No public hook in 1.41 (extensions load only from Flower's enterprise package): wrap the
    # app's middleware list, and refuse to start unguarded if that function ever goes away.
    flower_middleware = getattr(superlink_main, "_get_middleware", None)
    if flower_middleware is None:
        raise RuntimeError("this Flower version has no flwr.superlink.main._get_middleware to guard")
    gate = os.environ.get(FLEET_GATE_ENV)
    guard = Middleware(SuperLinkGuard, gate=Path(gate) if gate else None)
    superlink_main._get_middleware = lambda: [guard, *flower_middleware()]
    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    run_guarded_superlink()
