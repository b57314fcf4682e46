"""The fedgen ClientApp: thin Flower glue around clients/local.py.

Only weights and aggregate metrics leave the site. The site folder comes from the node config
(`data-path`, set by `fedgen client`) or, in simulation, from the list of simulated sites
indexed by Flower's `partition-id`.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedgen.artifacts import SITE_STATE_DIR
from fedgen.clients.local import SiteUpdate, train_site, with_node_policy
from fedgen.clients.secagg import secagg_mod, train_inputs, train_reply
from fedgen.config import config_from_toml
from fedgen.data.site import load_site
from fedgen.modalities import get_modality
from fedgen.privacy.ledger import LedgerEntry, PrivacyLedger
from fedgen.protocol import RUN_DIR_KEY
from fedgen.site_progress import progress_path, progress_writer

__all__ = ["make_client_app", "app", "site_ledger"]


def site_path(context: Context, site_dirs: Sequence[str] | None) -> Path:
    if site_dirs is not None:
        return Path(site_dirs[int(context.node_config["partition-id"])])
    return Path(str(context.node_config["data-path"]))


def round_seed(run_seed: int, server_round: int, site_name: str) -> int:
    """Distinct, reproducible randomness per run, round and site."""
    return run_seed * 1_000_003 + server_round * 10_007 + zlib.crc32(site_name.encode()) % 10_007


def _history_key(modality: str) -> str:
    return f"dp-history-{modality}"


def load_history(context: Context, modality: str) -> list[tuple[float, float, int]]:
    """The site's DP-SGD history of this run, kept in the node's state across rounds."""
    record = context.state.get(_history_key(modality))
    if record is None:
        return []
    return list(zip(record["noise-multiplier"], record["sample-rate"], record["steps"], strict=True))


def save_history(context: Context, modality: str, history: list[tuple[float, float, int]]) -> None:
    sigmas, rates, steps = zip(*history, strict=True) if history else ((), (), ())
    context.state[_history_key(modality)] = ConfigRecord(
        {"noise-multiplier": list(sigmas), "sample-rate": list(rates), "steps": list(steps)}
    )


def site_ledger(root: Path, context: Context) -> PrivacyLedger | None:
    """The site's own durable ledger of what it released in this run (deployment only).

    context.state forgets everything when a SuperNode restarts or a run is resumed (a resume
    is a new Flower run), so in deployment the site also keeps its DP history on its own disk:
    SITE_DIR/.fedgen/runs/<coordinator run>/ledger.sqlite. One row per update the site
    released, numbered 1, 2, ... per modality in the order they were released (a coordinator
    crash can make it answer one server round twice; each release is counted exactly once).
    In simulation (no run-dir in the run config) context.state lives as long as the run.
    """
    run_dir = str(context.run_config.get(RUN_DIR_KEY, ""))
    if not run_dir:
        return None
    run_key = f"{Path(run_dir).name}-{hashlib.sha256(run_dir.encode()).hexdigest()[:8]}"
    return PrivacyLedger(root / SITE_STATE_DIR / "runs" / run_key / "ledger.sqlite")


def record_release(
    ledger: PrivacyLedger, site: str, modality: str, server_round: int, update: SiteUpdate, *, accountant: str
) -> None:
    ledger.record(LedgerEntry.from_metrics(site, modality, server_round, update.metrics, accountant=accountant))


def make_client_app(site_dirs: Sequence[str] | None = None) -> ClientApp:
    """A ClientApp serving one site per node: simulated (site_dirs) or real (node config)."""
    app = ClientApp()

    @app.train(mods=[secagg_mod])  # SecAgg+ rounds (federation.secagg) mask the reply
    def train(msg: Message, context: Context) -> Message:
        global_state, settings = train_inputs(msg.content)
        config = config_from_toml(str(settings["run-config"]))
        torch.set_num_threads(config.federation.threads_per_site)
        modality_name = str(settings["modality"])
        root = site_path(context, site_dirs)
        # Every modality of the run: the site's budget and δ cover all of them.
        site = load_site(root, config.data, modalities=tuple(config.modalities), channels=config.image.channels)
        site = with_node_policy(site, context.node_config)
        modality = get_modality(modality_name, config, work_dir=root / SITE_STATE_DIR)
        ledger = site_ledger(root, context)
        if ledger is not None:
            histories = ledger.histories(site.name)
        else:
            histories = {name: load_history(context, name) for name in config.modalities}
        server_round = int(settings["server-round"])

        def progress_for(epochs: int, steps_per_epoch: int):
            path = progress_path(root / SITE_STATE_DIR, modality_name)
            return progress_writer(
                path,
                site=site.name,
                modality=modality_name,
                round=server_round,
                epochs=epochs,
                steps_per_epoch=steps_per_epoch,
            )

        update = train_site(
            modality,
            site,
            global_state,
            histories=histories,
            seed=round_seed(config.seed, server_round, site.name),
            proximal_mu=float(settings.get("proximal-mu", 0.0)),  # sent by FedProx only
            progress_for=progress_for,
        )
        save_history(context, modality_name, update.history)
        if ledger is not None:  # before the reply leaves: a lost reply is over-, never under-counted
            record_release(ledger, site.name, modality_name, server_round, update, accountant=config.privacy.accountant)
        released = json.dumps({**histories, modality_name: update.history})
        content = train_reply(msg.content, update.state, update.metrics, site.name, released=released)
        return Message(content=content, reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Site-side audit (fedgen.clients.site_audit): aggregates of the site's own records only."""
        from fedgen.clients.site_audit import answer_query  # the audit libraries load only when audited

        root = site_path(context, site_dirs)
        content = answer_query(msg.content, root, work_dir=root / SITE_STATE_DIR, node_config=context.node_config)
        return Message(content=content, reply_to=msg)

    return app


app = make_client_app()
