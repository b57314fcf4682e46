"""The training ServerApp: one federation per modality, checkpointed every round.

The run folder comes from the caller (simulation) or from the run config key `run-dir`
(deployment, where the ServerApp does not inherit the caller's environment). The pre-release
audit is a ServerApp of its own (fedgen.server.audit_app).
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from fedgen.artifacts import CHECKPOINT_METRICS, EMA_DIR, NOTE_TOKENS_KEY, RunDir
from fedgen.config import config_to_toml
from fedgen.errors import FedgenError
from fedgen.files import atomic_dir, write_json
from fedgen.modalities import Modality, get_modality
from fedgen.models.diffusion import update_ema
from fedgen.privacy.dp_sgd import noise_source
from fedgen.privacy.ledger import PrivacyLedger
from fedgen.protocol import RUN_DIR_KEY
from fedgen.server.secagg import start_secagg
from fedgen.server.strategy import BudgetSpent, make_strategy

__all__ = ["make_server_app", "run_federation", "rounds_done", "app"]

console = Console(stderr=True)


def _print_site(server_round: int, site: str, metrics: dict[str, float]) -> None:
    eps, own, loss = metrics["site-epsilon"], metrics["epsilon"], metrics["loss"]
    eps_text = "inf (NO DP)" if math.isinf(eps) else f"{eps:.3f} of {metrics['budget']:g}"
    own_text = "" if math.isinf(eps) or own == eps else f" (this modality alone {own:.3f})"
    loss_text = "kept at site (DP)" if math.isnan(loss) else f"{loss:.4f}"
    console.print(
        f"  round {server_round:>3}  {site:<12} site ε {eps_text}{own_text}  loss {loss_text}  "
        f"examples {int(metrics['num-examples'])}"
    )


def save_checkpoint(
    run: RunDir,
    modality: Modality,
    model,
    arrays: ArrayRecord,
    server_round: int,
    ledger: PrivacyLedger,
    ema: dict | None = None,
    round_info: dict | None = None,
) -> None:
    """Write round-NNN/<modality>/ atomically (the EMA weights, if kept, in its EMA_DIR);
    metrics.json, written inside, marks the checkpoint complete."""
    target = run.round_dir(server_round) / modality.name
    with atomic_dir(target) as tmp:
        modality.set_state(model, arrays.to_torch_state_dict())
        modality.save(model, tmp)  # replaces tmp whole: write it before the EMA subfolder
        if ema is not None:
            modality.set_state(model, ema)
            modality.save(model, tmp / EMA_DIR)
        rows = [e for e in ledger.entries(modality=modality.name) if e.round == server_round and not e.lost]
        write_json(
            tmp / CHECKPOINT_METRICS,
            {
                "round": server_round,
                "modality": modality.name,
                "sites": {
                    e.site: {
                        "loss": e.loss,
                        "site_epsilon": e.site_epsilon,
                        "epsilon": e.epsilon,
                        "num_examples": e.num_examples,
                    }
                    for e in rows
                },
                **(round_info or {}),  # wall time, sites' training seconds, failures
            },
        )


def longest_note(recorded: int | None, sites: dict[str, int]) -> int | None:
    """The longest coarse note length reported in the run: ``recorded`` in the last checkpoint,
    or by a site this round (None: no site reported one)."""
    return max([*sites.values(), *([] if recorded is None else [recorded])], default=None)


def rounds_done(run: RunDir) -> dict[str, int]:
    """Rounds each modality has already spent: its last round in the ledger or checkpoints.

    A round in the ledger without a checkpoint (the coordinator died between recording the
    replies and writing the checkpoint) counts as done: the sites spent its ε, so a resumed run
    continues after it (from the last checkpoint) and never records that round number twice.
    """
    ledger = PrivacyLedger(run.ledger_path)
    return {name: max(ledger.last_round(name), *run.completed_rounds(name), 0) for name in run.config().modalities}


def check_resumable(run: RunDir) -> None:
    """Load every modality's last complete checkpoint (and its EMA) as a resume would: a corrupt
    one is a one-line FedgenError naming it, before any Flower process starts."""
    config = run.config()
    for name in config.modalities:
        if run.completed_rounds(name):
            modality = get_modality(name, config, work_dir=run.base_models)
            last = run.checkpoint(name)
            modality.load_trainable(last)
            if (last / EMA_DIR).is_dir():
                modality.load_trainable(last / EMA_DIR)


def run_federation(grid: Grid, run: RunDir, modality_name: str) -> None:
    """Train one modality up to its planned rounds, checkpointing after each round.

    A run folder with progress is resumed: start from the last complete checkpoint and run only
    the rounds not yet spent (see rounds_done); round numbers continue where they stopped.
    """
    config = run.config()
    planned = config.federation.rounds
    done = rounds_done(run)[modality_name]
    if done >= planned:
        console.print(f"{modality_name}: all {planned} rounds already done")
        return
    modality = get_modality(modality_name, config, work_dir=run.base_models)
    ema_decay = getattr(modality.section, "ema_decay", 0.0)
    ema, note_tokens = None, None
    if run.completed_rounds(modality_name):
        last = run.checkpoint(modality_name)
        note_tokens = run.checkpoint_metrics(modality_name).get(NOTE_TOKENS_KEY)
        if ema_decay > 0 and (last / EMA_DIR).is_dir():
            ema = modality.get_state(modality.load_trainable(last / EMA_DIR))
        model = modality.load_trainable(last)
    else:
        model = modality.initial_model()
    ledger = PrivacyLedger(run.ledger_path)
    strategy = make_strategy(config, ledger=ledger, modality=modality_name, report=_print_site)
    strategy.round_offset = done
    resumed = f", resuming after round {done}" if done else ""
    console.rule(f"{modality_name} federation: {planned} rounds, {config.federation.strategy}{resumed}")
    if config.privacy.enabled:
        console.print(
            f"  DP noise: {noise_source(config.privacy.secure_mode)}; ε by Opacus' {config.privacy.accountant.upper()} accountant"
        )

    def checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        nonlocal ema, note_tokens
        if server_round > 0:
            if ema_decay > 0:
                ema = update_ema(ema, arrays.to_torch_state_dict(), ema_decay)
            for reason in strategy.failures:
                console.print(f"[bold yellow]  a site failed round {server_round + done}:[/] {reason}")
            round_info = {
                "round_seconds": strategy.round_seconds,
                "site_train_seconds": strategy.site_train_seconds,
                "failures": strategy.failures,
            }
            note_tokens = longest_note(note_tokens, strategy.site_note_tokens)
            if note_tokens is not None:
                round_info[NOTE_TOKENS_KEY] = note_tokens
            save_checkpoint(run, modality, model, arrays, server_round + done, ledger, ema, round_info)
        return None

    start = strategy.start
    if config.federation.secagg:  # the same rounds, the sites' updates summed under SecAgg+
        start = partial(start_secagg, strategy, max_weight=config.federation.secagg_max_weight)
    try:
        start(
            grid=grid,
            initial_arrays=ArrayRecord(torch_state_dict=modality.get_state(model)),
            num_rounds=planned - done,
            timeout=config.federation.round_timeout,
            train_config=ConfigRecord({"run-config": config_to_toml(config), "modality": modality_name}),
            evaluate_fn=checkpoint,
        )
    except BudgetSpent as stop:
        console.print(f"[bold yellow]{stop}[/]")


def make_server_app(run_dir: str | Path | None = None) -> ServerApp:
    """The training ServerApp for ``run_dir``, or for the run config's `run-dir` (deployment)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        root = run_dir or context.run_config.get(RUN_DIR_KEY)
        if not root:
            raise FedgenError(f"no run folder: pass {RUN_DIR_KEY} in the run config")
        run = RunDir.open(root)
        for modality_name in run.config().modalities:
            run_federation(grid, run, modality_name)

    return app


app = make_server_app()
