"""The coordinator on Flower's deployment engine: SuperLink, site registration, one fedgen run.

``serve`` does what ``fedgen server`` promises (and ``serve_audit`` what ``fedgen audit RUN
--deployment`` does), with Flower's own commands as subprocesses:

1. start the guarded SuperLink (fedgen.server.superlink: TLS with the consortium
   certificates, SuperNode authentication, only the Fleet API for other hosts);
2. register every authorised site key (``flwr supernode register``) through a connection
   defined in RUN/flwr/config.toml (fedgen.server.flower_cli);
3. submit the run of the training or the audit app (``flwr run APP fedgen --stream
   --run-config run-dir=RUN ...``) and stream its log;
4. stop the SuperLink, also on errors and Ctrl-C, and check the run folder: training succeeded
   when every modality trained its planned rounds (see fedgen.server.train_app.rounds_done),
   the audit when it wrote a new RUN/audit/report.json.
"""

from __future__ import annotations

from pathlib import Path

from fedgen.artifacts import RunDir
from fedgen.certs import ConsortiumCerts
from fedgen.errors import FedgenError
from fedgen.processes import flower_env, process_group
from fedgen.protocol import AUDIT_RUN_CONFIG, INCEPTION_KEY, POLICY_KEY, RUN_DIR_KEY, TRAIN_RUN_CONFIG
from fedgen.server.flower_cli import (
    AUDIT_SERVER_APP,
    FLOWER_COMPLETED,
    TRAIN_SERVER_APP,
    Echo,
    register_sites,
    run_status,
    submit_run,
    write_flower_app,
    write_flower_config,
)
from fedgen.server.superlink import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    FLEET_GATE_ENV,
    check_listen_address,
    superlink_command,
    wait_until_listening,
)

__all__ = ["serve", "serve_audit", "check_outcome"]

FLOWER_HOME_FOLDER = "flwr"  # inside the run folder
TRAIN_APP_FOLDER = "flower-app"  # inside the run folder: the code-less training Flower App
AUDIT_APP_FOLDER = "flower-audit-app"  # the code-less audit Flower App
SUPERLINK_LOG = "superlink.log"
FLEET_GATE_FILE = "fleet-open"


def _run_on_superlink(
    run: RunDir,
    app: tuple[str, str, dict[str, str]],
    task_config: dict[str, str],
    *,
    certs: ConsortiumCerts | None,
    port: int,
    host: str,
    echo: Echo,
    interrupted: str,
) -> str:
    """Start a fresh SuperLink, register the sites, submit one run of ``app`` (its folder in the
    run folder, its ServerApp, its declared run config) with run-dir=RUN and ``task_config``,
    stop the SuperLink; returns Flower's status of the run.

    The SuperLink keeps no state between starts (its SQLite file database fails with 'database
    is locked' under load in 1.41); what must survive lives in the run folder, and every start
    registers the keys again. ``interrupted`` is the error shown on Ctrl-C.
    """
    check_listen_address(host, port)
    root = run.root.resolve()  # the flwr commands run with their own working directory
    flwr_home = root / FLOWER_HOME_FOLDER
    write_flower_config(flwr_home, port=port, ca_cert=certs.ca_cert if certs else None)
    folder, server_app, declared = app
    app_dir = write_flower_app(root / folder, server_app=server_app, run_config=declared)
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
    # train_app imports torch: import it here, never in the SuperLink's own process
    from fedgen.server.train_app import check_resumable, rounds_done

    planned = run.config().federation.rounds
    if all(done >= planned for done in rounds_done(run).values()):
        echo(f"{run.root} has trained all its {planned} rounds: nothing to do")
        return
    check_resumable(run)
    status = _run_on_superlink(
        run,
        (TRAIN_APP_FOLDER, TRAIN_SERVER_APP, TRAIN_RUN_CONFIG),
        {},
        certs=certs,
        port=port,
        host=host,
        echo=echo,
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
    """Audit the run on the sites that connect to a fresh SuperLink (the audit ServerApp writes
    RUN/audit/report.{json,html}); returns report.json, raises if none was written.

    ``policy`` None is the shipped default policy; ``inception`` None keeps the FeatureNet for fidelity.
    """
    from fedgen.audits.report import REPORT_JSON

    report = run.audit / REPORT_JSON
    before = _modified_ns(report)
    task_config = {
        POLICY_KEY: str(policy.resolve()) if policy else "",
        INCEPTION_KEY: str(inception.resolve()) if inception else "",
    }
    status = _run_on_superlink(
        run, (AUDIT_APP_FOLDER, AUDIT_SERVER_APP, AUDIT_RUN_CONFIG), task_config,
        certs=certs, port=port, host=host, echo=echo,
        interrupted=f"interrupted: the audit of {run.root} did not finish; run it again",
    )  # fmt: skip
    if status != FLOWER_COMPLETED or _modified_ns(report) == before:
        raise FedgenError(
            f"the audit of {run.root} did not finish (Flower status {status}); its reason is in the log above"
        )
    return report


def check_outcome(run: RunDir, *, status: str, echo: Echo) -> None:
    """Return if every modality trained its planned rounds or ended early on purpose, else raise."""
    # train_app imports torch: import it here, never in the SuperLink's own process
    from fedgen.server.train_app import rounds_done

    planned = run.config().federation.rounds
    unfinished = {m: n for m, n in rounds_done(run).items() if n < planned}
    if not unfinished:
        return
    done = ", ".join(f"{m} {n}/{planned}" for m, n in unfinished.items())
    if status == FLOWER_COMPLETED:  # the ServerApp ended early on purpose (fedgen.server.strategy.BudgetSpent)
        echo(
            f"WARNING: the run ended before its planned rounds (rounds done: {done}): too few "
            "sites had privacy budget left"
        )
        return
    raise FedgenError(
        f"run stopped early (Flower status {status}; rounds done: {done}); "
        f"continue with `fedgen server --resume {run.root}`"
    )
