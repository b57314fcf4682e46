"""Run a consortium of simulated hospitals on Flower's simulation engine (Ray backend).

The same ServerApps and ClientApp as a real deployment: training (fedgen.server.train_app)
and the pre-release audit (fedgen.server.audit_app), against simulated sites whose folders
are on this machine.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from flwr.serverapp import ServerApp

from fedgen.artifacts import SITE_STATE_DIR, RunDir
from fedgen.clients.app import make_client_app
from fedgen.config import RunConfig
from fedgen.data.site import load_site
from fedgen.errors import FedgenError
from fedgen.logs import quiet_libraries
from fedgen.modalities import TextModality
from fedgen.privacy.dp_sgd import check_secure_mode
from fedgen.server.train_app import make_server_app

__all__ = ["simulate", "check_sites", "run_on_simulated_sites", "run_audit"]

# Each simulated site gets federation.threads_per_site cores (default 1).
CPUS_PER_SITE = 1


def check_sites(config: RunConfig, site_dirs: Sequence[Path]) -> None:
    """Validate every site before anything is written: a bad site is an error now, not mid-round.

    Beyond the folder checks, texts are tokenised with the run's template, so a note longer
    than text.max_length is found here rather than by a site failing every round.
    """
    if not site_dirs:
        raise FedgenError("no sites to simulate")
    check_secure_mode(config.privacy.secure_mode)
    for root in site_dirs:
        site = load_site(root, config.data, modalities=tuple(config.modalities), channels=config.image.channels)
        if "text" in config.modalities:
            try:
                TextModality(config, work_dir=Path(root) / SITE_STATE_DIR).datasets(site)
            except FedgenError as err:
                raise FedgenError(f"{site.name}: {err}") from None


def site_cpus(threads_per_site: int, sites: int) -> float:
    """Ray's CPUs per simulated site: its threads, or an equal share of the machine's cores when
    the sites outnumber them, so that every site trains at once. Otherwise they train in waves:
    3 sites on 2 cores are 2 sites, then 1 alone on an idle core, a third more wall time."""
    cores = os.cpu_count() or 1
    share = math.floor(100 * cores / sites) / 100  # two decimals: Ray's pool is cores // share actors
    return max(min(threads_per_site, cores, share), 0.01)


def run_on_simulated_sites(
    server_app: ServerApp, site_dirs: Sequence[Path], *, verbose: bool = False, cpus_per_site: int = CPUS_PER_SITE
) -> None:
    """Run a ServerApp against the fedgen ClientApp on simulated sites (``cpus_per_site`` cores each)."""
    from flwr.simulation import run_simulation

    if not verbose:
        quiet_libraries()
    run_simulation(
        server_app=server_app,
        client_app=make_client_app([str(Path(p).resolve()) for p in site_dirs]),
        num_supernodes=len(site_dirs),
        backend_config={
            "client_resources": {"num_cpus": site_cpus(cpus_per_site, len(site_dirs)), "num_gpus": 0.0},
            "init_args": {
                "num_cpus": os.cpu_count() or 1,
                "include_dashboard": False,
                "log_to_driver": verbose,
            },
        },
        verbose_logging=verbose,
    )


def simulate(run: RunDir, site_dirs: Sequence[Path], *, verbose: bool = False) -> None:
    """Train every configured modality on the simulated sites; results land in the run folder.

    The sites must have passed check_sites with the run's configuration.
    """
    run.record_simulated_sites(site_dirs)
    cpus = run.config().federation.threads_per_site
    run_on_simulated_sites(make_server_app(run.root), site_dirs, verbose=verbose, cpus_per_site=cpus)


def run_audit(
    run: RunDir, *, sites: list[Path] | None = None, inception: str | Path | None = None, progress: bool = True
) -> dict:
    """Audit a simulated run on its sites (default: the run's simulated sites); return report.json."""
    from fedgen.server.audit_app import make_audit_app  # the audit libraries load only when audited

    site_dirs = run.simulated_sites() if sites is None else list(sites)
    sink: dict = {}
    app = make_audit_app(run, expected_sites=len(site_dirs), sink=sink, inception=inception, progress=progress)
    run_on_simulated_sites(app, site_dirs, cpus_per_site=run.config().federation.threads_per_site)
    return sink["report"]
