"""What the coordinator holds for an audit: the final models and the synthetic data.

Everything is read from the run folder, so the audit runs the same on either engine. The image
fidelity features are each site's own (a FeatureNet trained on its real train split, which knows
its classes: fedgen.clients.image_audit), or, with ``inception`` (``fedgen audit RUN --inception
PATH``), a local TorchScript Inception detector, checked here and loaded from the same path at
every site. FeatureNet FID and Inception FID are not comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from torch import Tensor

from fedgen.artifacts import RunDir
from fedgen.audits.features import InceptionFeatures, load_inception
from fedgen.config import RunConfig
from fedgen.data.site import load_images
from fedgen.errors import FedgenError
from fedgen.generate import synthetic_image_files, synthetic_text_records
from fedgen.modalities import get_modality
from fedgen.privacy.ledger import PrivacyLedger

__all__ = [
    "AuditInputs",
    "check_inputs",
    "load_synthetic_images",
    "load_synthetic_texts",
    "prepare_inputs",
    "say",
]

console = Console(stderr=True)


def say(progress: bool, text: str) -> None:
    """An audit progress line on stderr (when ``progress``)."""
    if progress:
        console.print(f"audit: {text}", highlight=False)


@dataclass(frozen=True)
class AuditInputs:
    """What the coordinator holds for the audit: model states and synthetic data per modality."""

    run: RunDir
    config: RunConfig
    model_states: dict[str, dict[str, Tensor]]
    synthetic_images: tuple[Tensor, Tensor] | None = None  # [N, C, H, W] in [-1, 1], labels [N]
    synthetic_texts: tuple[list[str], list[int]] | None = None
    inception: InceptionFeatures | None = None  # the fidelity extractor, if the user chose Inception


def load_synthetic_images(run: RunDir, config: RunConfig) -> tuple[Tensor, Tensor]:
    """synthetic/images/<class>/*.png as [N, C, H, W] in [-1, 1] (like the sites' images) + labels."""
    paths, labels = synthetic_image_files(run, config.data.image_classes)
    images = load_images(paths, resolution=config.image.resolution, channels=config.image.channels)
    return images, torch.tensor(labels, dtype=torch.long)


def load_synthetic_texts(run: RunDir, config: RunConfig) -> tuple[list[str], list[int]]:
    """synthetic/texts.jsonl as (texts, class indices)."""
    return synthetic_text_records(run, config.data.text_classes)


def _checkpoint_state(run: RunDir, config: RunConfig, modality_name: str) -> dict[str, Tensor]:
    """The trained tensors of the last complete checkpoint, keyed as the sites' models expect."""
    modality = get_modality(modality_name, config, work_dir=run.base_models)
    expected = modality.get_state(modality.build_model()).keys()
    saved = modality.load(run.checkpoint(modality_name)).state_dict()
    return {key: saved[key].detach().clone() for key in expected}


def check_inputs(run: RunDir) -> tuple[Tensor, Tensor] | None:
    """Refuse, in one line and writing nothing, a run the audit cannot cover: no privacy ledger or
    a modality it never trained, a missing or corrupt checkpoint, missing synthetic data.
    Returns the synthetic images (or None), which it had to decode to check them."""
    config = run.config()
    synthetic_images = load_synthetic_images(run, config) if "image" in config.modalities else None
    if "text" in config.modalities:
        load_synthetic_texts(run, config)
    if not run.ledger_path.is_file():  # PrivacyLedger would create an empty one
        raise FedgenError(f"{run.root} has no privacy ledger ({run.ledger_path.name}): train it before auditing it")
    ledger = PrivacyLedger(run.ledger_path)
    for name in config.modalities:
        if not ledger.entries(modality=name):
            raise FedgenError(f"the ledger of {run.root} holds no {name} training round: train it before auditing it")
        get_modality(name, config, work_dir=run.base_models).load(run.checkpoint(name))
    return synthetic_images


def prepare_inputs(run: RunDir, *, inception: str | Path | None = None, progress: bool = False) -> AuditInputs:
    """Check the run (``check_inputs``), load checkpoints and synthetic data (and the Inception
    detector, if given).

    ``inception``: a local TorchScript Inception file for the image fidelity figures.
    """
    config = run.config()
    modalities = config.modalities
    synthetic_images = check_inputs(run)
    synthetic_texts = load_synthetic_texts(run, config) if "text" in modalities else None
    detector = None
    if inception is not None and synthetic_images is not None:
        detector = load_inception(Path(inception).resolve())  # the sites get this absolute path
    states = {name: _checkpoint_state(run, config, name) for name in modalities}
    return AuditInputs(run, config, states, synthetic_images, synthetic_texts, detector)
