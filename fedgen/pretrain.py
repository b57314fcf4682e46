"""Public pretraining: a model learns, without DP, from data declared non-sensitive.

DP fine-tuning from a model that already draws a fundus spends the sites' privacy budget on
what only the sites have (how each class looks) rather than on anatomy any public image shows;
with public pretraining, DP diffusion models reach far better fidelity than trained from
scratch (Ghalebikesabi et al. 2023; Lyu et al. 2023, DP-LDM). The same holds for notes: a
pretrained language model fine-tuned under DP learns little from a few hundred notes a site
(BENCHMARKS.md, "The demo, end to end"), and an adapter first trained on public notes of the
classes starts it where the sites' budget refines rather than teaches.

The public image folder is either an ImageFolder whose class folders are consortium classes
(the labels are used) or any folder of images (no labels: the model learns the null class,
i.e. the unconditional prior, and the classes are learned at the sites under DP). Public notes
are a folder laid out as a site's (``texts.jsonl``). The output is a model folder plus
``pretraining.json`` (what data, how trained), which a run names in ``image.init_checkpoint``
or ``text.init_adapter``; the run folder keeps a copy and the audit report shows it.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch.utils.data import Subset, TensorDataset

from fedgen.artifacts import RunDir
from fedgen.config import RunConfig
from fedgen.data.check import IMAGE_SUFFIXES, TEXTS_FILE
from fedgen.data.site import load_images, load_site
from fedgen.errors import FedgenError
from fedgen.files import atomic_dir, write_json
from fedgen.logs import progress_bar
from fedgen.manifest import file_sha256
from fedgen.modalities import ImageModality, TextModality
from fedgen.models.base_models import recorded_base_model
from fedgen.models.diffusion import WEIGHTS_NAME, update_ema
from fedgen.models.pretrained import (
    ADAPTER_WEIGHTS,
    RECORD_NAME,
    SHIPPED_PREFIX,
    checkpoint_folder,
    load_pretrained_adapter,
)
from fedgen.training import ProgressCallback, train_local

__all__ = [
    "PROVENANCE_NAME",
    "PublicImages",
    "read_public_images",
    "public_class_names",
    "class_balanced_draws",
    "pretrain_image_model",
    "pretrain_text_adapter",
    "pretraining_of",
    "start_classes_from_null",
    "create_run",
]

PROVENANCE_NAME = RECORD_NAME


class PublicImages:
    """The public images as model inputs, with where they came from."""

    def __init__(self, root: Path, paths: list[Path], labels: list[int] | None, classes: list[str]):
        self.root, self.paths, self.labels, self.classes = root, paths, labels, classes

    def describe(self) -> dict:
        """Provenance: the folder, its size, whether labels were used, a digest of its bytes."""
        digest = hashlib.sha256()
        for path in self.paths:
            digest.update(path.relative_to(self.root).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        counts = None
        if self.labels is not None:
            counts = {c: self.labels.count(i) for i, c in enumerate(self.classes) if i in self.labels}
        return {
            "public_dir": str(self.root.resolve()),
            "images": len(self.paths),
            "labelled": self.labels is not None,
            "class_counts": counts,
            "content_sha256": digest.hexdigest(),
        }


def public_class_names(folder: str | Path) -> list[str] | None:
    """The class folders of a labelled public set, sorted; None when some image sits elsewhere."""
    root = Path(folder)
    paths = _image_files(root)
    parts = [p.relative_to(root).parts for p in paths]
    if not paths or any(len(part) != 2 for part in parts):
        return None
    return sorted({part[0] for part in parts})


def _image_files(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def read_public_images(folder: str | Path, classes: list[str]) -> PublicImages:
    """Every image under ``folder``; labelled when all sit in folders named after ``classes``."""
    root = Path(folder)
    if not root.is_dir():
        raise FedgenError(f"public data folder not found: {root}")
    paths = _image_files(root)
    if not paths:
        raise FedgenError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    folders = {p.relative_to(root).parts[0] if len(p.relative_to(root).parts) == 2 else None for p in paths}
    labelled = None not in folders and folders <= set(classes)
    labels = [classes.index(p.parent.name) for p in paths] if labelled else None
    return PublicImages(root, paths, labels, classes)


def _new_output(out: str | Path, what: str, *, epochs: int, batch_size: int, lr: float) -> Path:
    """``out`` as a Path, after refusing an existing folder and a schedule that cannot train."""
    out = Path(out)
    if out.exists():
        raise FedgenError(f"{out} already exists; choose a new folder for the pretrained {what}")
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise FedgenError(f"epochs ({epochs}) and batch size ({batch_size}) must be >= 1 and lr ({lr}) > 0")
    return out


def _train_on_public(
    task, model, dataset, schedule: dict, *, progress: bool, what: str, after_step: ProgressCallback | None = None
):
    """Train ``model`` on a public ``dataset`` without DP for ``schedule`` (epochs, batch_size, lr,
    seed), with a progress bar; ``after_step(step, loss)`` runs after each step."""
    steps = schedule["epochs"] * -(-len(dataset) // schedule["batch_size"])
    with progress_bar(progress, total=steps, description=f"pretraining on public {what}") as advance:

        def each_step(step: int, loss: float) -> None:
            if after_step is not None:
                after_step(step, loss)
            advance(1)

        return train_local(
            model,
            dataset,
            task.per_example_loss(),
            **schedule,
            noise_multiplier=None,
            max_grad_norm=1.0,
            delta=1.0 / len(dataset),  # unused without DP
            progress=each_step,
        )


def pretrain_image_model(
    public: str | Path,
    out: str | Path,
    config: RunConfig,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    ema_decay: float = 0.0,
    balance_classes: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Train the run's image architecture on ``public`` without DP; write ``out``; return provenance.

    ``ema_decay`` > 0 writes the exponential moving average of the weights over the steps
    instead of the last step's weights: at a constant learning rate the last weights carry the
    last batches' noise, and diffusion models are sampled from such an average (Ho et al. 2020).
    ``balance_classes`` (labelled public sets only) draws the same number of images in as many
    steps, every class equally often (``class_balanced_draws``).
    """
    out = _new_output(out, "model", epochs=epochs, batch_size=batch_size, lr=lr)
    if not 0 <= ema_decay < 1:
        raise FedgenError(f"ema decay must be in [0, 1), got {ema_decay}")
    data = read_public_images(public, config.data.image_classes)
    if balance_classes and data.labels is None:
        raise FedgenError(f"{public} is unlabelled: balancing classes needs class folders")
    image = config.image
    try:
        pixels = load_images(data.paths, resolution=image.resolution, channels=image.channels)
    except OSError as err:
        raise FedgenError(f"a public image cannot be read: {err}") from None
    task = ImageModality(
        config.model_copy(update={"image": image.model_copy(update={"trainable": []})}), work_dir=out.parent
    )
    model = task.build_model()  # every parameter trains here; image.trainable is for DP fine-tuning
    null = len(config.data.image_classes)
    labels = torch.tensor(data.labels) if data.labels is not None else torch.full((len(pixels),), null)
    dataset = TensorDataset(pixels, labels)
    passes = epochs
    if balance_classes:  # one pass over `epochs` passes' worth of balanced draws: the same steps
        dataset, passes = Subset(dataset, class_balanced_draws(labels, epochs * len(dataset), seed=seed)), 1
    started = time.perf_counter()
    ema = None

    def keep_average(step: int, loss: float) -> None:
        nonlocal ema
        if ema_decay:  # warm-up as diffusers' EMAModel: the average does not keep the random start
            ema = update_ema(ema, model.state_dict(), min(ema_decay, (1 + step) / (10 + step)))

    schedule = {"epochs": passes, "batch_size": batch_size, "lr": lr, "seed": seed}
    result = _train_on_public(task, model, dataset, schedule, progress=progress, what="images", after_step=keep_average)
    if ema is not None:
        model.load_state_dict(ema)
    if data.labels is None:
        start_classes_from_null(model)
    provenance = {
        **data.describe(),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "ema_decay": ema_decay,
        "balance_classes": balance_classes,
        "steps": result.steps,
        "final_mean_loss": result.mean_loss,
        "seconds": round(time.perf_counter() - started, 1),
        "image_config": image.model_dump(),
        "classes": list(config.data.image_classes),  # the class embeddings' order
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    with atomic_dir(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        provenance["weights_sha256"] = file_sha256(staging / WEIGHTS_NAME)  # checked on every load
        write_json(staging / PROVENANCE_NAME, provenance)
    return provenance


def pretrain_text_adapter(
    public: str | Path,
    out: str | Path,
    config: RunConfig,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Train the run's text adapter on the notes in ``public`` without DP; write ``out``; return provenance.

    ``public`` is a folder laid out as a site's notes (``texts.jsonl``, labels among the run's
    text classes), checked the same way. Each note trains as a site's does: the class's chat
    prompt, the loss on the note and its end-of-turn token. ``out`` is PEFT's adapter folder
    plus ``pretraining.json``, which a run names in ``text.init_adapter``.
    """
    from fedgen.models.text import encode_examples, save_adapter  # transformers: text runs only

    out = _new_output(out, "adapter", epochs=epochs, batch_size=batch_size, lr=lr)
    notes = load_site(public, config.data, modalities=("text",))
    names = config.data.text_classes
    config = config.model_copy(update={"text": recorded_base_model(config.text)})  # the record names its base
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedgen-pretrain-") as work:  # the frozen layers' cache
        task = TextModality(config, work_dir=Path(work))
        model = task.build_model()
        encoded = encode_examples(
            task.tokenizer(),
            [(names[label], text) for text, label in zip(notes.texts, notes.text_labels, strict=True)],
            prompts=task.prompts(),
            max_length=config.text.max_length,
        )
        dataset = task.training_set(model, encoded, progress=progress)
        schedule = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed}
        result = _train_on_public(task, model, dataset, schedule, progress=progress, what="notes")
    provenance = {
        "public_dir": str(Path(public).resolve()),
        "notes": len(notes.texts),
        "class_counts": {c: notes.text_labels.count(i) for i, c in enumerate(names)},
        "content_sha256": file_sha256(Path(public) / TEXTS_FILE),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "steps": result.steps,
        "final_mean_loss": result.mean_loss,
        "seconds": round(time.perf_counter() - started, 1),
        "text_config": config.text.model_dump(),
        "classes": list(names),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    with atomic_dir(out) as staging:
        save_adapter(model, staging)
        provenance["weights_sha256"] = file_sha256(staging / ADAPTER_WEIGHTS)  # checked on every load
        write_json(staging / PROVENANCE_NAME, provenance)
    return provenance


def class_balanced_draws(labels: torch.Tensor, draws: int, *, seed: int) -> torch.Tensor:
    """``draws`` indices into ``labels``, drawn with replacement so every class is equally likely.

    Public graded sets are skewed like screening (about half of them No_DR); drawn as they are,
    the rare grades get a few percent of the steps while the sites need them all.
    """
    weights = 1.0 / torch.bincount(labels).double()[labels]
    return torch.multinomial(weights, draws, replacement=True, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def start_classes_from_null(unet: torch.nn.Module) -> None:
    """Set every class embedding to the learned null-class one.

    Unlabelled pretraining trains only the null class; the class rows keep their random
    initialisation, which the model never saw. Copied from the null row, each class starts as
    the unconditional prior and DP fine-tuning only has to learn how the classes differ.
    """
    weight = unet.class_embedding.weight
    weight[:-1] = weight[-1]


# Where a modality's run configuration names the pretrained model it starts from, and that
# model's weights file.
PRETRAINED_SETTING = {"image": "init_checkpoint", "text": "init_adapter"}
PRETRAINED_WEIGHTS = {"image": WEIGHTS_NAME, "text": ADAPTER_WEIGHTS}


def _check_pretrained(config: RunConfig, modality: str) -> None:
    """A one-line error if the modality's pretrained model does not fit its record or the run."""
    if modality == "image":
        ImageModality(config, work_dir=Path(".")).initial_model()
    else:
        load_pretrained_adapter(config.text.init_adapter, config.text, config.data.text_classes)


def pretraining_of(config: RunConfig) -> dict[str, dict]:
    """Per modality that starts from a pretrained model (image.init_checkpoint,
    text.init_adapter), its pretraining record, after checking the model against its own record
    and the run (``fedgen.models.pretrained``)."""
    records = {}
    for modality in config.modalities:
        setting = PRETRAINED_SETTING[modality]
        checkpoint = getattr(getattr(config, modality), setting)
        if checkpoint is None:
            continue
        _check_pretrained(config, modality)
        folder = checkpoint_folder(checkpoint, setting=f"{modality}.{setting}")
        record_file = folder / PROVENANCE_NAME
        record = (
            json.loads(record_file.read_text(encoding="utf-8"))
            if record_file.is_file()
            else {"note": f"no {PROVENANCE_NAME}: not made by `fedgen pretrain`, public data unknown"}
        )
        shipped = checkpoint.startswith(SHIPPED_PREFIX)  # a name that resolves wherever fedgen is installed
        records[modality] = {
            **record,
            "checkpoint": checkpoint if shipped else str(folder.resolve()),
            "weights_sha256": file_sha256(folder / PRETRAINED_WEIGHTS[modality]),
        }
    return records


def create_run(runs_dir: str | Path, config: RunConfig, run_id: str | None = None) -> RunDir:
    """A new run folder, its pretrained models (if any) checked first and recorded beside the
    config, in ``pretraining.json`` by modality.

    A named text base model is resolved here (converted into the cache on first use) and
    recorded with its SHA-256, which every site checks. A pretrained model's path is stored
    absolute, as the ServerApp may run from another directory; a shipped one keeps its
    ``fedgen:`` name, which resolves wherever fedgen is installed.
    """
    if "text" in config.modalities:
        config = config.model_copy(update={"text": recorded_base_model(config.text)})
    pretraining = pretraining_of(config)
    for modality, record in pretraining.items():
        section = getattr(config, modality).model_copy(update={PRETRAINED_SETTING[modality]: record["checkpoint"]})
        config = config.model_copy(update={modality: section})
    run = RunDir.create(runs_dir, config, run_id)
    if pretraining:
        write_json(run.root / PROVENANCE_NAME, pretraining)
    return run
