"""The files and commands of Flower's deployment engine that fedgen drives: app, connection, `flwr`.

The Flower Apps submitted are code-less: a pyproject.toml naming fedgen's ServerApp
(``fedgen.server.train_app:app`` or ``fedgen.server.audit_app:app``) and ClientApp
(``fedgen.clients.app:app``). Every party imports those from the fedgen it installed, so fedgen
ships no code to the hospitals, versions are whatever each party installed, and nothing from the
coordinator's disk (site data, runs) can end up in the bundle. (A SuperNode would still run
code from any bundle its SuperLink hands it: the sites trust the coordinator with that.)

Connections live in a FLWR_HOME that fedgen owns (the run folder's ``flwr/``), never the user's
~/.flwr, and every `flwr` command runs with its working directory in a folder fedgen owns:
`flwr` "migrates" a pyproject.toml it finds in its working directory, rewriting it in place.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path

import tomli_w

from fedgen.errors import FedgenError
from fedgen.processes import LOOPBACK, ProcessGroup, flower_command, toml_literal

__all__ = [
    "CONNECTION",
    "TRAIN_SERVER_APP",
    "AUDIT_SERVER_APP",
    "CLIENT_APP",
    "FLOWER_COMPLETED",
    "write_flower_app",
    "write_flower_config",
    "register_sites",
    "run_config_args",
    "submit_run",
    "run_status",
]

CONNECTION = "fedgen"  # the SuperLink connection's name in RUN/flwr/config.toml
TRAIN_SERVER_APP = "fedgen.server.train_app:app"
AUDIT_SERVER_APP = "fedgen.server.audit_app:app"
CLIENT_APP = "fedgen.clients.app:app"
PUBLISHER = "fedgen"
FLOWER_COMPLETED = "finished:completed"
RUN_STARTED = re.compile(r"Successfully started run (\d+)")

Echo = Callable[[str], None]


def write_flower_app(directory: Path, *, server_app: str, run_config: dict[str, str]) -> Path:
    """A Flower App that holds no code: components are imported from the installed fedgen.

    ``run_config`` declares the app's run-config keys and their defaults (Flower accepts only
    declared keys).
    """
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
                    "components": {"serverapp": server_app, "clientapp": CLIENT_APP},
                    "config": dict(run_config),
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
            raise FedgenError(
                f"could not register node key {comment}: {_flower_error(output.decode(errors='replace'))}"
            )


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


def submit_run(
    app_dir: Path, run_config: dict[str, str], *, env: dict[str, str], echo: Echo, group: ProcessGroup
) -> int:
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
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
    )
    try:
        return str(json.loads(out.stdout)["runs"][0]["status"])
    except (ValueError, KeyError, IndexError):
        return "unknown"
