"""What a modality plugs into the shared federation: a model, its trainable state, a loss, data.

Image and text share everything else (DP training, ledger, strategy, checkpoints, audits
plumbing). A modality is built from the run configuration plus a working folder where
locally made artifacts live (the demo's tiny Llama); nothing here talks to Flower.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fedgen.config import RunConfig
from fedgen.data.site import SiteData, image_splits, text_splits
from fedgen.files import atomic_file
from fedgen.logs import progress_bar

__all__ = [
    "Modality",
    "ImageModality",
    "TextModality",
    "get_modality",
    "MODALITIES",
    "NOTE_TOKENS",
    "coarse_note_length",
]

PerExampleLoss = Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]

# The training reply's metric that carries a site's coarse note length (TextModality.reply_metrics).
NOTE_TOKENS = "note-tokens"
NOTE_LENGTH_QUANTILE = 0.9  # at least a tenth of a site's notes (>= 2) reach the reported length
NOTE_LENGTH_GRID = 32  # tokens: the reported length is rounded up to a multiple of this
MIN_NOTES_FOR_LENGTH = 20  # fewer training notes and the site reports no length (as the audit's floor)
FROZEN_STATES_DIR = "frozen-text-layers"  # in the work folder: TextModality.training_set's cache


def coarse_note_length(lengths: Sequence[int]) -> int | None:
    """A high quantile of a site's note lengths (tokens), rounded UP to a multiple of
    NOTE_LENGTH_GRID; None under MIN_NOTES_FOR_LENGTH notes.

    Generation needs to know how long notes run, and the coordinator never sees a note. So each
    site sends this, once per training reply: the nearest-rank NOTE_LENGTH_QUANTILE, which at
    least a tenth of its notes (two or more) reach or pass, so it is never the longest note's own
    length, then coarsened to the grid, so one record added or removed rarely moves it. Like the
    audit's aggregates it is a floor against singling out a record, outside the DP guarantee.
    """
    if len(lengths) < MIN_NOTES_FOR_LENGTH:
        return None
    rank = math.ceil(NOTE_LENGTH_QUANTILE * len(lengths))
    quantile = sorted(lengths)[rank - 1]
    return -(-quantile // NOTE_LENGTH_GRID) * NOTE_LENGTH_GRID


class Modality(ABC):
    """The interface: subclasses fill in the model, its state, data and loss."""

    name: str

    def __init__(self, config: RunConfig, *, work_dir: Path):
        self.config = config
        self.work_dir = Path(work_dir)

    def load_trainable(self, directory: Path) -> nn.Module:
        """A model that trains on from a checkpoint (load() gives a frozen, inference model)."""
        model = self.build_model()
        model.load_state_dict(self.load(directory).state_dict())
        return model

    def initial_model(self) -> nn.Module:
        """The model a federation starts from (the coordinator's round-0 weights)."""
        return self.build_model()

    @property
    def section(self):
        """The modality's own config section (ImageConfig or TextConfig)."""
        return getattr(self.config, self.name)

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh model with the run's initial weights (same seed at every party)."""

    @abstractmethod
    def get_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors that are trained, sent and aggregated."""

    @abstractmethod
    def set_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load tensors from get_state (strict: a key mismatch is an error)."""

    @abstractmethod
    def datasets(self, site: SiteData) -> tuple[Dataset, Dataset]:
        """(train, held-out) splits of the site's records for this modality."""

    def training_set(self, model: nn.Module, train_set: Dataset, *, progress: bool = False) -> Dataset:
        """The train split as ``per_example_loss`` reads it for ``model`` (by default as is);
        ``progress`` shows any long preparation."""
        return train_set

    def reply_metrics(self, train_set: Dataset) -> dict[str, float]:
        """What the site's training reply adds to its ε and DP-SGD parameters (none by default)."""
        return {}

    @abstractmethod
    def per_example_loss(self) -> PerExampleLoss:
        """Loss per example (shape [B]): DP clips per example, attacks score per example."""

    @abstractmethod
    def save(self, model: nn.Module, directory: Path) -> None:
        """Write the model in its library's own format (diffusers / PEFT, safetensors)."""

    @abstractmethod
    def load(self, directory: Path) -> nn.Module:
        """Read what save wrote; a missing or corrupt checkpoint is a FedgenError."""


class ImageModality(Modality):
    name = "image"

    def build_model(self) -> nn.Module:
        from fedgen.models.diffusion import build_unet, select_trainable

        torch.manual_seed(self.config.seed)
        unet = build_unet(self.config.image, len(self.config.data.image_classes))
        select_trainable(unet, self.config.image.trainable)
        return unet

    def initial_model(self) -> nn.Module:
        """The pretrained checkpoint (image.init_checkpoint) if there is one, checked against its
        record and the run (``fedgen.models.pretrained``), else random weights."""
        checkpoint = self.config.image.init_checkpoint
        if checkpoint is None:
            return self.build_model()
        from fedgen.models.pretrained import load_pretrained

        model = self.build_model()
        pretrained = load_pretrained(checkpoint, self.config.image, self.config.data.image_classes)
        model.load_state_dict(pretrained.state_dict())
        return model

    def get_state(self, model):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def set_state(self, model, state):
        model.load_state_dict(state, strict=True)

    def datasets(self, site):
        return image_splits(
            site,
            resolution=self.config.image.resolution,
            channels=self.config.image.channels,
            seed=self.config.data.split_seed,
        )

    def per_example_loss(self):
        from fedgen.models.diffusion import denoising_loss, make_noise_scheduler

        scheduler = make_noise_scheduler(self.config.image)
        drop = self.config.image.cond_drop_prob

        def loss(module: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
            images, labels = batch
            return denoising_loss(module, scheduler, images, labels, cond_drop_prob=drop)

        return loss

    def save(self, model, directory):
        from fedgen.models.diffusion import save_image_model

        save_image_model(model, directory)

    def load(self, directory):
        from fedgen.models.diffusion import load_image_model

        return load_image_model(directory)


class TextModality(Modality):
    name = "text"

    def base_model_dir(self) -> Path:
        """The configured base model as a local directory (``fedgen.models.base_models``): a
        packaged model converted once into the cache, the tiny random Llama made here once, or
        the configured folder."""
        from fedgen.models.base_models import PACKAGED_MODELS, TINY_RANDOM_LLAMA, converted_model_dir

        text = self.config.text
        if text.base_model in PACKAGED_MODELS:
            return converted_model_dir(text.base_model, expected_sha256=text.base_model_sha256)
        if text.base_model != TINY_RANDOM_LLAMA:
            return Path(text.base_model)
        from fedgen.models.text import make_tiny_llama

        shape = json.dumps([text.tiny_hidden_size, text.tiny_layers, text.tiny_heads, self.config.seed])
        directory = self.work_dir / f"tiny-llama-{hashlib.sha256(shape.encode()).hexdigest()[:10]}"
        if not (directory / "config.json").is_file():
            make_tiny_llama(directory, config=text, seed=self.config.seed)
        return directory

    def tokenizer(self):
        from fedgen.models.text import load_tokenizer

        if not hasattr(self, "_tokenizer"):
            self._tokenizer = load_tokenizer(self.base_model_dir())
        return self._tokenizer

    def prompts(self):
        """Each class's prompt and the end-of-note token (fedgen.models.text.class_prompts)."""
        from fedgen.models.text import class_prompts

        return class_prompts(self.tokenizer(), self.config.text, self.config.data.text_classes)

    def max_new_tokens(self, note_tokens: int | None = None) -> int:
        """How long a generated note may run: text.max_new_tokens when set; else ``note_tokens``,
        the longest of the sites' coarse note lengths the run recorded (``reply_metrics``), so
        that a pretrained model that does not stop writes about as much as the notes it learnt
        from, not the configuration's whole bound; else (or if shorter) that bound, max_length
        minus the longest class prompt, which every training note fits in."""
        text = self.config.text
        if text.max_new_tokens is not None:
            return text.max_new_tokens
        longest = max(len(ids) for ids in self.prompts().prompts.values())
        bound = max(1, text.max_length - longest)
        return bound if note_tokens is None else min(note_tokens, bound)

    def reply_metrics(self, train_set):
        """The site's coarse note length (``coarse_note_length``): the note and its end token,
        in the base model's tokenizer, as the loss mask marks them. NaN when the site has too few
        notes to say (Flower aggregates only replies that carry the same metric keys)."""
        loss_mask = train_set.tensors[2]
        length = coarse_note_length(loss_mask.sum(dim=1).tolist())
        return {NOTE_TOKENS: math.nan if length is None else length}

    def _base(self):
        from fedgen.models.text import load_base_model

        text = self.config.text
        base, _ = load_base_model(self.base_model_dir(), load_in_bits=text.load_in_bits, dtype=text.dtype)
        return base

    def build_model(self):
        from fedgen.models.text import add_lora

        return add_lora(self._base(), self.config.text, seed=self.config.seed)

    def initial_model(self):
        """The adapter text.init_adapter names, if any, checked against its record and the run
        (``fedgen.models.pretrained``), else the seeded one that leaves the base model as it is."""
        model = self.build_model()
        if self.config.text.init_adapter is not None:
            from fedgen.models.pretrained import load_pretrained_adapter
            from fedgen.models.text import load_saved_adapter_state

            tensors = load_pretrained_adapter(
                self.config.text.init_adapter, self.config.text, self.config.data.text_classes
            )
            load_saved_adapter_state(model, tensors)
        return model

    def get_state(self, model):
        from fedgen.models.text import lora_state

        return lora_state(model)

    def set_state(self, model, state):
        from fedgen.models.text import set_lora_state

        set_lora_state(model, state)

    def datasets(self, site):
        from fedgen.models.text import encode_examples

        names = self.config.data.text_classes
        splits = text_splits(site, seed=self.config.data.split_seed)
        prompts = self.prompts()
        return tuple(
            encode_examples(
                self.tokenizer(),
                [(names[label], text) for text, label in split],
                prompts=prompts,
                max_length=self.config.text.max_length,
            )
            for split in splits
        )

    def training_set(self, model, train_set, *, progress=False):
        """The train split with, per note, the output of the frozen layers below the lowest
        adapted one (``fedgen.models.text.frozen_states``): computed once and kept in the work
        folder (a site's own state folder) for the next rounds, keyed by the base model's files,
        that layer and the notes' tokens, so a changed model or site recomputes it."""
        from fedgen.models.text import first_adapted_layer, frozen_states

        first = first_adapted_layer(model)
        if first == 0:
            return train_set
        key = hashlib.sha256(f"{_directory_fingerprint(self.base_model_dir())}|{first}".encode())
        for tensor in train_set.tensors[:2]:
            key.update(tensor.numpy().tobytes())
        path = self.work_dir / FROZEN_STATES_DIR / f"{key.hexdigest()[:24]}.safetensors"
        try:
            states = load_file(path)["states"]
        except (OSError, SafetensorError, KeyError):
            with progress_bar(progress, total=len(train_set), description="frozen layers", unit="notes") as advance:
                states = frozen_states(model, train_set, advance=advance)
            _keep_only(path, {"states": states})
        return TensorDataset(*train_set.tensors, states)

    def per_example_loss(self):
        from fedgen.models.text import sequence_loss

        def loss(module: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
            input_ids, attention_mask, loss_mask, *lower_states = batch  # from training_set, or not
            return sequence_loss(module, input_ids, attention_mask, loss_mask, *lower_states)

        return loss

    def save(self, model, directory):
        from fedgen.models.text import save_adapter

        save_adapter(model, directory)

    def load(self, directory):
        from fedgen.models.text import load_adapter

        return load_adapter(self._base(), directory)


def _directory_fingerprint(directory: Path) -> str:
    """The names, sizes and modification times of a directory's files: changes with its content."""
    files = sorted(path for path in Path(directory).rglob("*") if path.is_file())
    return json.dumps([[str(p.relative_to(directory)), p.stat().st_size, p.stat().st_mtime_ns] for p in files])


def _keep_only(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` to ``path`` (atomically) and remove the other files of its folder: one
    cache at a time, not one per configuration ever tried."""
    with atomic_file(path) as staging:
        save_file(tensors, staging)
    for other in path.parent.glob("*.safetensors"):
        if other != path:
            other.unlink(missing_ok=True)


MODALITIES: dict[str, type[Modality]] = {"image": ImageModality, "text": TextModality}


def get_modality(name: str, config: RunConfig, *, work_dir: Path) -> Modality:
    return MODALITIES[name](config, work_dir=work_dir)
