"""A site on Flower's deployment engine: one SuperNode serving the fedgen ClientApp for SITE_DIR.

`serve_site` runs `flower-supernode` until it stops or the operator presses Ctrl-C:

- TLS with the consortium CA (the site verifies the coordinator) and the site's node key (the
  coordinator verifies the site; Flower refuses node keys without TLS);
- `--node-config data-path=SITE_DIR` and the policy flags of `fedgen client` (fedgen.site_policy
  keys): clients/app.py reads the site folder and the policy overrides from there;
- its own Runtime API port (each SuperNode on one host needs one; a free port by default);
- FLWR_HOME in SITE_DIR/.fedgen/flwr, where Flower unpacks the (code-less) app bundles.

The ClientApp itself runs in a fresh `flwr-clientapp` subprocess for every message.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from fedgen.artifacts import SITE_STATE_DIR
from fedgen.errors import FedgenError
from fedgen.processes import (
    LOOPBACK,
    ProcessGroup,
    flower_command,
    flower_env,
    free_port,
    process_group,
    toml_literal,
)

__all__ = ["serve_site", "supernode_command", "check_credentials", "failure_reason", "SITE_FLOWER_HOME"]

SITE_FLOWER_HOME = f"{SITE_STATE_DIR}/flwr"
EXIT_MARK = "Exit Code"  # Flower's failure report starts here ...
MORE_INFO = "For more information"  # ... and ends here
CONNECTED_MARK = "SuperNode ID:"  # Flower logs it once the SuperLink accepted the node
OUTPUT_DRAIN = 30.0  # seconds to collect a stopped SuperNode's last lines (its helper may linger)
RESTART_DELAY = 5.0  # seconds before a SuperNode that lost its coordinator is started again

Echo = Callable[[str], None]


def check_credentials(*, key: Path, ca: Path) -> None:
    """Fail early, with one line, on a key or CA file the SuperNode could not use."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    for path in (key, ca):
        if not path.is_file():
            raise FedgenError(f"file not found: {path}")
    try:
        private = load_ssh_private_key(key.read_bytes(), None)
    except (ValueError, TypeError):
        raise FedgenError(f"{key} is not an unencrypted OpenSSH private key (make one with `fedgen certs`)") from None
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise FedgenError(f"{key} is not an ECDSA key; Flower's node authentication needs one")
    try:
        x509.load_pem_x509_certificate(ca.read_bytes())
    except ValueError:
        raise FedgenError(f"{ca} is not a PEM certificate") from None


def supernode_command(
    *,
    server: str,
    site_dir: Path,
    key: Path | None,
    ca: Path | None,
    runtime_port: int,
    max_wait: float | None = None,
    policy: Mapping[str, bool | int | float | str] | None = None,
) -> list[str]:
    """The SuperNode's command line; key and ca None = insecure (no TLS, no node auth).

    ``policy`` holds site policy settings (fedgen.site_policy keys) that override site.toml.
    """
    data_path = toml_literal(str(site_dir.resolve()), what="site folder")
    node_config = [f"data-path={data_path}"]
    for setting, value in (policy or {}).items():
        if isinstance(value, bool):
            node_config.append(f"{setting}={str(value).lower()}")
        elif isinstance(value, str):
            node_config.append(f"{setting}={toml_literal(value, what=setting)}")
        else:
            node_config.append(f"{setting}={value!r}")
    command = [
        flower_command("flower-supernode"),
        "--superlink",
        server,
        "--node-config",
        " ".join(node_config),
        "--host",
        LOOPBACK,
        "--port",
        str(runtime_port),
    ]
    if max_wait is not None:
        command += ["--max-wait-time", str(max_wait)]
    if key is None or ca is None:
        return [*command, "--insecure"]
    return [
        *command,
        "--root-certificates",
        str(ca.resolve()),
        "--auth-supernode-private-key",
        str(key.resolve()),
    ]


def serve_site(
    site_dir: Path,
    *,
    server: str,
    key: Path | None,
    ca: Path | None,
    runtime_port: int | None = None,
    max_wait: float | None = None,
    policy: Mapping[str, bool | int | float | str] | None = None,
    restart_delay: float = RESTART_DELAY,
    echo: Echo = print,
) -> None:
    """Run the site's SuperNode until the operator stops it; raise FedgenError if it cannot connect.

    A SuperNode that was connected and then stopped (the coordinator restarted and no longer
    knows it) is started again: the site rejoins a resumed run without its operator. One that
    never connected (unregistered key, wrong CA, no TLS) is an error naming Flower's reason.
    """
    if key is not None and ca is not None:
        check_credentials(key=key, ca=ca)
    site_dir = site_dir.resolve()
    command = supernode_command(
        server=server,
        site_dir=site_dir,
        key=key,
        ca=ca,
        runtime_port=runtime_port or free_port(),
        max_wait=max_wait,
        policy=policy,
    )
    env = flower_env(site_dir / SITE_FLOWER_HOME)
    with process_group() as group:
        try:
            while True:
                code, lines = _run_supernode(group, command, env=env, echo=echo)
                if not any(CONNECTED_MARK in line for line in lines):
                    break
                echo(f"the SuperNode stopped (exit code {code}); starting it again in {restart_delay:g} s")
                time.sleep(restart_delay)
        except KeyboardInterrupt:
            echo("stopping the SuperNode")
            return
    raise FedgenError(f"the SuperNode could not join (exit code {code}): {failure_reason(lines)}")


def _run_supernode(
    group: ProcessGroup, command: list[str], *, env: dict[str, str], echo: Echo
) -> tuple[int, list[str]]:
    """Start one SuperNode, echo its output while it runs; (exit code, output lines).

    Its output is read in a thread and the exit awaited here: the SuperNode's own helper
    (flower-superexec) inherits the pipe and only exits once its parent has been reaped, so
    reading the pipe to its end first would wait forever.
    """
    supernode = group.start(command, env=env, log=subprocess.PIPE)
    echo(f"SuperNode (pid {supernode.pid}) started")
    lines: list[str] = []

    def pump() -> None:
        for raw in supernode.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            echo(line)
            lines.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    code = supernode.wait()
    reader.join(timeout=OUTPUT_DRAIN)
    return code, list(lines)


def failure_reason(lines: list[str]) -> str:
    """Flower's multi-line failure report (between 'Exit Code' and 'For more information') as one line."""
    start = max((i for i, line in enumerate(lines) if EXIT_MARK in line), default=None)
    if start is None:
        return lines[-1].strip() if lines else "no output"
    report = []
    for line in lines[start + 1 :]:
        if line.startswith(MORE_INFO):
            break
        if line.strip():
            report.append(line.strip())
    return " ".join(report) or lines[start].strip()
