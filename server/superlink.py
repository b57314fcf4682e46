"""The coordinator's SuperLink: its command line, its start-up, and the guard in front of its port.

Flower 1.41+ serves its Fleet, Control and Runtime APIs on ONE port, and its open-source
Control API has no authentication: anyone who reaches the port could register a node or submit
a run (code that every site would execute). So fedgen starts the SuperLink through
``run_guarded_superlink`` (``python -m fedgen.server.superlink``), which lets other hosts reach
only the Fleet API; control and runtime calls must come from the coordinator's own loopback
interface. The SuperLink runs without runtime dependency installation: offline it fails, online
it would pull other wheels.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedgen.certs import ConsortiumCerts
from fedgen.errors import FedgenError
from fedgen.processes import LOOPBACK

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_HOST",
    "FLEET_GATE_ENV",
    "superlink_command",
    "check_listen_address",
    "wait_until_listening",
    "SuperLinkGuard",
    "run_guarded_superlink",
]

DEFAULT_PORT = 9092
DEFAULT_HOST = "0.0.0.0"
LISTEN_HOSTS = (DEFAULT_HOST, LOOPBACK)
READY_TIMEOUT = 180.0  # seconds for the SuperLink to listen (imports are slow on a busy machine)
POLL_INTERVAL = 0.5
FLEET_PREFIX = "/v1/fleet/"
FLEET_GATE_ENV = "FEDGEN_FLEET_GATE"  # file whose existence opens the Fleet API (see SuperLinkGuard)


def superlink_command(*, certs: ConsortiumCerts | None, host: str, port: int) -> list[str]:
    """The guarded SuperLink's command line; certs None = insecure (no TLS, no node auth)."""
    command = [sys.executable, "-m", "fedgen.server.superlink", "--host", host, "--port", str(port)]
    command.append("--disable-runtime-dependency-installation")
    if certs is None:
        return [*command, "--insecure"]
    return [
        *command,
        "--ssl-ca-certfile",
        str(certs.ca_cert.resolve()),
        "--ssl-certfile",
        str(certs.server_cert.resolve()),
        "--ssl-keyfile",
        str(certs.server_key.resolve()),
        "--enable-supernode-auth",
    ]


def check_listen_address(host: str, port: int) -> None:
    """Refuse an address the SuperLink cannot serve from, before anything starts or is written.

    Only all interfaces or loopback: the SuperLink's own helpers reach it on 127.0.0.1 (the side
    SuperLinkGuard trusts). A busy port is refused too: another program answering there would
    look like our SuperLink.
    """
    if host not in LISTEN_HOSTS:
        raise FedgenError(f"--host must be {DEFAULT_HOST} (serve the sites) or {LOOPBACK} (one machine), got {host!r}")
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
