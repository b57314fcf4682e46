"""`fedgen certs`, `fedgen server` and `fedgen client`: a real consortium on Flower's deployment engine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedgen.cli.common import (
    EXIT_USER_ERROR,
    INSECURE_WARNING,
    ConfigOption,
    console,
    coordinator_certs,
    echo_line,
    err_console,
)
from fedgen.errors import FedgenError

__all__ = ["server", "client", "certs"]


def server(
    config: ConfigOption = None,
    certs_dir: Annotated[
        Path | None,
        typer.Option(
            "--certs", help="Credentials folder from `fedgen certs` (ca.crt, server.crt, server.key, authorized-keys)."
        ),
    ] = None,
    port: Annotated[int, typer.Option(help="Port of the SuperLink (sites connect to HOST:PORT).")] = 9092,
    host: Annotated[
        str,
        typer.Option(
            help="0.0.0.0 serves the sites (only the Fleet API is served to other hosts); 127.0.0.1 keeps it on this machine."
        ),
    ] = "0.0.0.0",
    runs_dir: Annotated[Path, typer.Option(help="Where run folders are created.")] = Path("runs"),
    run_id: Annotated[str | None, typer.Option(help="Run folder name (default: a timestamp).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue this run folder from its last complete round.")] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="No TLS, no node authentication: local tests only.")
    ] = False,
) -> None:
    """Coordinator: start a Flower SuperLink and submit the fedgen run (TLS, node auth)."""
    from fedgen.artifacts import RunDir
    from fedgen.config import load_config
    from fedgen.server.deploy import serve
    from fedgen.server.superlink import check_listen_address

    if resume is not None and (config is not None or run_id is not None):
        raise FedgenError("--resume continues a run with its own config.toml; drop --config and --run-id")
    consortium = coordinator_certs(certs_dir, insecure)
    check_listen_address(host, port)
    if resume is not None:
        run = RunDir.open(resume)
    else:
        from fedgen.data.check import CLASS_LISTS
        from fedgen.pretrain import create_run

        run_config = load_config(config)
        unset = [
            CLASS_LISTS[m] for m in run_config.modalities if CLASS_LISTS[m] not in run_config.data.model_fields_set
        ]
        if unset:
            raise FedgenError(
                f"list data.{' and data.'.join(unset)} in --config: the coordinator cannot see the sites' folders"
            )
        run = create_run(runs_dir, run_config, run_id)
    if insecure:
        err_console.print(INSECURE_WARNING)
    if not run.config().privacy.enabled:
        err_console.print("[bold yellow]WARNING: ε = inf — training WITHOUT differential privacy.[/]")
    console.print(f"run folder: {run.root}")
    serve(run, certs=consortium, port=port, host=host, echo=echo_line)
    console.print(f"run finished: {run.root}")


def client(
    server_address: Annotated[str, typer.Option("--server", help="The coordinator's SuperLink, HOST:PORT.")],
    data: Annotated[Path, typer.Option(help="This site's folder (images/<class>/*, texts.jsonl, site.toml).")],
    key: Annotated[
        Path | None, typer.Option(help="This site's node private key (site-K.key from `fedgen certs`).")
    ] = None,
    ca: Annotated[
        Path | None, typer.Option(help="The consortium CA certificate (ca.crt) that signed the coordinator's.")
    ] = None,
    config: ConfigOption = None,
    runtime_port: Annotated[
        int | None, typer.Option(help="Local port of the SuperNode's runtime API (default: a free one).")
    ] = None,
    max_wait: Annotated[
        float | None, typer.Option(help="Give up connecting after this many seconds (default: keep trying).")
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="No TLS, no node authentication: local tests only.")
    ] = False,
    allow_no_dp: Annotated[
        bool | None,
        typer.Option(
            "--allow-no-dp/--require-dp",
            help="Train a run without DP (ε = inf), or refuse it (site.toml require_dp; default: refuse).",
        ),
    ] = None,
    epsilon_budget: Annotated[
        float | None,
        typer.Option(help="This site's ε for the whole run; caps the consortium's target (site.toml epsilon_budget)."),
    ] = None,
    max_delta: Annotated[
        float | None,
        typer.Option(
            help="The largest δ this site trains with (site.toml max_delta; default 1/(10 x its train records))."
        ),
    ] = None,
    min_noise_multiplier: Annotated[
        float | None,
        typer.Option(help="The smallest noise multiplier σ this site trains with (site.toml min_noise_multiplier)."),
    ] = None,
    audit_answers: Annotated[
        int | None,
        typer.Option(
            help="How many times this site answers each audit query about one trained model (site.toml audit_answers)."
        ),
    ] = None,
) -> None:
    """Site: start a Flower SuperNode serving the fedgen ClientApp for SITE_DIR.

    The policy flags override the site's site.toml for this SuperNode; a run asking for less
    privacy than the policy accepts is refused, in one line the coordinator sees.
    """
    from fedgen.clients.deploy import serve_site
    from fedgen.config import load_config
    from fedgen.data.check import check_site, classes_from_sites, site_class_names
    from fedgen.site_policy import policy_from_settings

    if not insecure and (key is None or ca is None):
        raise FedgenError("give --key site-K.key and --ca ca.crt (from `fedgen certs`), or --insecure for a local test")
    if insecure and (key is not None or ca is not None):
        raise FedgenError("--insecure runs without TLS and node keys; drop --key and --ca")
    run_config = load_config(config)  # class lists it leaves out: this site's own, until the run's arrive
    found = [m for m, names in site_class_names(data).items() if names]
    run_config = classes_from_sites(run_config, [data], modalities=found)
    result = check_site(data, run_config.data, channels=run_config.image.channels)
    for problem in result.problems:
        err_console.print(f"problem: {problem}", markup=False, highlight=False, soft_wrap=True)
    if result.problems:
        raise typer.Exit(EXIT_USER_ERROR)
    flags = {
        "require_dp": None if allow_no_dp is None else not allow_no_dp,
        "epsilon_budget": epsilon_budget,
        "max_delta": max_delta,
        "min_noise_multiplier": min_noise_multiplier,
        "audit_answers": audit_answers,
    }
    policy = {key: value for key, value in flags.items() if value is not None}
    try:
        policy_from_settings(policy)
    except ValueError as err:
        raise FedgenError(f"--{str(err).split(' ', 1)[0].replace('_', '-')}: {err}") from None
    if insecure:
        err_console.print(INSECURE_WARNING)
    serve_site(
        data,
        server=server_address,
        key=key,
        ca=ca,
        runtime_port=runtime_port,
        max_wait=max_wait,
        policy=policy,
        echo=echo_line,
    )


def certs(
    out: Annotated[Path, typer.Argument(help="Folder to create (must be absent or empty).")],
    sites: Annotated[int, typer.Option(help="Number of sites: one node key pair each.")] = 3,
    host: Annotated[
        list[str] | None,
        typer.Option(
            help="Name or IP the sites use for the coordinator (repeatable); localhost and 127.0.0.1 are always in."
        ),
    ] = None,
    valid_days: Annotated[int, typer.Option(help="Validity of the CA and server certificates.")] = 365,
) -> None:
    """Make a consortium CA, a server certificate and per-site node keys."""
    from fedgen.certs import make_certs

    if valid_days < 1:
        raise FedgenError(f"--valid-days must be at least 1, got {valid_days}")
    made = make_certs(out, sites=sites, hosts=host or [], valid_days=valid_days)
    console.print(f"wrote the consortium credentials to {made.root}")
    console.print("  coordinator: ca.crt, server.crt, server.key, authorized-keys (move ca.key offline)")
    console.print("  site K:      ca.crt and site-K.key (keep it at the site only)")
