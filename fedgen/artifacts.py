"""The coordinator's run folder: where each artifact of a run lives, and atomic writes into it.

runs/<run-id>/
  config.toml            the resolved configuration
  ledger.sqlite          privacy ledger
  checkpoints/round-NNN/ <modality>/ weights (safetensors) + metrics.json (text: + the sites' note length)
  synthetic/images/<class>/*.png, synthetic/texts.jsonl
  audit/report.json, audit/report.html
  release/
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

from fedgen.config import RunConfig, load_config, save_config
from fedgen.errors import FedgenError
from fedgen.files import write_json

__all__ = ["RunDir", "SITE_STATE_DIR", "EMA_DIR", "CHECKPOINT_METRICS", "NOTE_TOKENS_KEY"]

# Inside a site folder: the site's own state (locally made base models, its durable ledger).
SITE_STATE_DIR = ".fedgen"
# Inside a checkpoint folder: the EMA of the global model, which generation samples from.
EMA_DIR = "ema"
# Inside a checkpoint folder, written last: the round's facts (sites' ε, timings, ...).
CHECKPOINT_METRICS = "metrics.json"
# In a text checkpoint's metrics: the longest coarse note length the sites reported in the run
# so far (fedgen.modalities.coarse_note_length); generation stops there.
NOTE_TOKENS_KEY = "note_tokens"

_ROUND_DIR = re.compile(r"^round-(\d{3,})$")


class RunDir:
    """Paths of one run folder. Creating one writes only the folder and its config."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def create(cls, runs_root: str | Path, config: RunConfig, run_id: str | None = None) -> RunDir:
        run_id = run_id or datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        run = cls(Path(runs_root) / run_id)
        if run.config_path.exists():
            raise FedgenError(f"run folder {run.root} already holds a run; choose another --run-id")
        run.root.mkdir(parents=True, exist_ok=True)
        save_config(config, run.config_path)
        return run

    @classmethod
    def open(cls, root: str | Path) -> RunDir:
        run = cls(root)
        if not run.config_path.is_file():
            raise FedgenError(f"{run.root} is not a fedgen run folder (no config.toml)")
        return run

    @property
    def config_path(self) -> Path:
        return self.root / "config.toml"

    def config(self) -> RunConfig:
        return load_config(self.config_path)

    @property
    def ledger_path(self) -> Path:
        return self.root / "ledger.sqlite"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def round_dir(self, server_round: int) -> Path:
        return self.checkpoints / f"round-{server_round:03d}"

    def completed_rounds(self, modality: str) -> list[int]:
        """Rounds whose checkpoint for `modality` was fully written (metrics.json is written last)."""
        if not self.checkpoints.is_dir():
            return []
        rounds = []
        for child in self.checkpoints.iterdir():
            match = _ROUND_DIR.match(child.name)
            if match and (child / modality / CHECKPOINT_METRICS).is_file():
                rounds.append(int(match.group(1)))
        return sorted(rounds)

    def checkpoint(self, modality: str, server_round: int | None = None) -> Path:
        """The checkpoint folder of `modality` at a round (default: the last complete one)."""
        rounds = self.completed_rounds(modality)
        if not rounds:
            raise FedgenError(f"{self.root} has no complete {modality} checkpoint")
        if server_round is None:
            server_round = rounds[-1]
        elif server_round not in rounds:
            raise FedgenError(
                f"{self.root} has no complete {modality} checkpoint for round {server_round} "
                f"(complete rounds: {', '.join(map(str, rounds))})"
            )
        return self.round_dir(server_round) / modality

    def checkpoint_metrics(self, modality: str, server_round: int | None = None) -> dict:
        """The metrics.json of `modality`'s checkpoint at a round (default: the last complete one)."""
        path = self.checkpoint(modality, server_round) / CHECKPOINT_METRICS
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise FedgenError(f"{path} is not valid JSON ({err.msg})") from None

    def sampling_checkpoint(self, modality: str, server_round: int | None = None) -> Path:
        """What to sample from: the round's EMA of the global model when the run kept one, else the model."""
        checkpoint = self.checkpoint(modality, server_round)
        return checkpoint / EMA_DIR if (checkpoint / EMA_DIR).is_dir() else checkpoint

    @property
    def synthetic(self) -> Path:
        return self.root / "synthetic"

    @property
    def audit(self) -> Path:
        return self.root / "audit"

    @property
    def release(self) -> Path:
        return self.root / "release"

    @property
    def sites_path(self) -> Path:
        """Simulation only: the site folders of the simulated hospitals (audits reach them again)."""
        return self.root / "simulated-sites.json"

    def record_simulated_sites(self, site_dirs) -> None:
        write_json(self.sites_path, [str(Path(p).resolve()) for p in site_dirs])

    def simulated_sites(self) -> list[Path]:
        if not self.sites_path.is_file():
            raise FedgenError(f"{self.root} was not simulated on this machine (no {self.sites_path.name})")
        return [Path(p) for p in json.loads(self.sites_path.read_text(encoding="utf-8"))]

    @property
    def base_models(self) -> Path:
        """Where the coordinator keeps locally made base models (the demo's tiny Llama)."""
        return self.root / "base-models"
