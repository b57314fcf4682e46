"""Image feature extractors for the fidelity and utility audits, with nothing to download.

Two extractors share one interface (``features(images) -> [N, D]``, ``num_features``,
``description``), so every fidelity figure can name the extractor it was computed with —
scores from different extractors are not comparable:

- ``FeatureNet``: a small CNN classifier trained by fedgen itself (at a site, on synthetic
  data, or anywhere else: ``train_feature_net`` takes plain tensors). Its penultimate
  activations are the features; its head is the classifier of the image utility audit.
- ``InceptionFeatures``: Inception-v3 as a TorchScript file from a LOCAL path only (the format
  of NVlabs' ``inception-2015-12-05.pt``, used by the StyleGAN2-ADA/3 metrics and clean-fid).
  torchmetrics' own Inception needs torch-fidelity, which needs torchvision, which cannot be
  installed beside fedgen's CPU torch; a TorchScript file needs neither.

Images everywhere in the audits are float tensors ``[N, C, H, W]`` in ``[-1, 1]`` (the
diffusion model's range); labels are class indices ``[N]``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fedgen.errors import FedgenError

__all__ = [
    "FeatureExtractor",
    "FeatureNet",
    "InceptionFeatures",
    "classify",
    "extract_features",
    "load_inception",
    "train_feature_net",
]

DEFAULT_WIDTHS = (32, 64, 128)  # channels of the three conv blocks; the last is the feature size
GROUPS_PER_NORM = 8  # GroupNorm, not BatchNorm: Opacus cannot train BatchNorm under DP
EVAL_BATCH_SIZE = 256
# The one training recipe of every FeatureNet (utility classifiers, the sites' fidelity
# extractors, the benchmarks'): see train_feature_net.
MAX_STEPS = 1000
EVAL_EVERY = 25
PATIENCE = 4  # validation measurements without a lower loss before training stops
VALIDATION_FRACTION = 0.2
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
INCEPTION_FEATURES = 2048  # the pool features FID is defined on
INCEPTION_PROBE_SIZE = 32  # side of the blank image a loaded detector is tried on (it resizes itself)


class FeatureExtractor(Protocol):
    """What the fidelity audit needs from an extractor."""

    num_features: int
    description: str

    def features(self, images: Tensor) -> Tensor: ...


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    # Pooling before the ReLU computes the same function (the ReLU is monotone) on a quarter of
    # the values; both hold no weights, so saved nets load either way.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.GroupNorm(min(GROUPS_PER_NORM, out_channels), out_channels),
        nn.MaxPool2d(2),
        nn.ReLU(),
    )


class FeatureNet(nn.Module):
    """Three conv blocks, global average pooling (the features) and a linear head.

    Global pooling makes the net independent of the image resolution. The constructor's
    arguments are the whole configuration, saved next to the weights by ``save_pretrained``.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        widths: tuple[int, ...] = DEFAULT_WIDTHS,
        trained_on: str = "nothing (untrained)",
    ) -> None:
        super().__init__()
        self.config = {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "widths": list(widths),
            "trained_on": trained_on,
        }
        channels = [in_channels, *widths]
        self.blocks = nn.Sequential(*(_conv_block(a, b) for a, b in zip(channels, channels[1:])))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[-1], num_classes)
        self.num_features = widths[-1]
        self.training_record: dict | None = None  # set by train_feature_net

    @property
    def description(self) -> str:
        return f"fedgen FeatureNet (trained on {self.config['trained_on']})"

    def features(self, images: Tensor) -> Tensor:
        return self.pool(self.blocks(images)).flatten(1)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``model.safetensors`` and ``config.json``; each file appears whole or not at all."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        _write_atomically(directory / WEIGHTS_FILE, lambda tmp: save_file(weights, tmp))
        config_text = json.dumps(self.config, indent=2)
        _write_atomically(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(config_text))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> FeatureNet:
        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise FedgenError(f"feature net folder {directory} has no {name}")
        config = json.loads((directory / CONFIG_FILE).read_text())
        net = cls(**{**config, "widths": tuple(config["widths"])})
        net.load_state_dict(load_file(directory / WEIGHTS_FILE))
        return net.eval()


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def _validation_split(labels: Tensor, fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(train, validation) indices: ``fraction`` of each class held back, at least one example of
    a class always left to train on (a class of one is not validated)."""
    train, validation = [], []
    for label in labels.unique():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        held = min(round(fraction * len(members)), len(members) - 1)
        validation.append(members[:held])
        train.append(members[held:])
    return torch.cat(train), torch.cat(validation)


@torch.no_grad()
def _validation_loss(net: FeatureNet, images: Tensor, labels: Tensor) -> tuple[float, float]:
    logits = _in_batches(net, images, EVAL_BATCH_SIZE)
    return float(nn.functional.cross_entropy(logits, labels)), float((logits.argmax(dim=1) == labels).float().mean())


def train_feature_net(
    images: Tensor,
    labels: Tensor,
    *,
    num_classes: int,
    trained_on: str,
    seed: int = 0,
    max_steps: int = MAX_STEPS,
    batch_size: int = 64,
    lr: float = 1e-3,
    widths: tuple[int, ...] = DEFAULT_WIDTHS,
    validation_fraction: float = VALIDATION_FRACTION,
    oversample: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> FeatureNet:
    """Supervised training to convergence (Adam, cross-entropy); returns the net in eval mode.

    ``validation_fraction`` of each class is held back; every EVAL_EVERY steps the loss on it is
    measured, the weights with the lowest are kept, and training stops PATIENCE measurements
    after the last improvement, or at ``max_steps``. No fixed step budget fits every set: 25
    steps left a site's real-trained classifier at 0.52 accuracy where the same data reach 0.90,
    and a set of noise with random labels has nothing more to teach after its first steps.
    ``net.training_record`` holds the steps taken, the step whose weights were kept and their
    validation accuracy. ``validation_fraction=0`` trains exactly ``max_steps`` steps.

    ``oversample(images, labels)`` (e.g. SMOTE) rebalances the part that trains, after the
    validation records are set aside: validated on interpolations of its own training records,
    a net looks better the longer it fits them and never stops early.

    ``trained_on`` says what the images were (e.g. "site-1 real train split") and ends up in
    every report that uses the net. The global RNG is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatureNet(in_channels=images.shape[1], num_classes=num_classes, widths=widths, trained_on=trained_on)
    # Trained channels-last (its convolutions and pooling run ~1.25x faster on the CPU), returned
    # in the default layout: features then match, to the last bit, the same net saved and loaded.
    net = net.to(memory_format=torch.channels_last)
    shuffle = torch.Generator().manual_seed(seed)
    fit, held = _validation_split(labels, validation_fraction, shuffle)
    fit_images, fit_labels = images[fit], labels[fit]
    if oversample is not None:
        fit_images, fit_labels = oversample(fit_images, fit_labels)
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    best = {"loss": math.inf, "step": 0, "accuracy": None, "state": copy.deepcopy(net.state_dict())}
    step, stopped = 0, False
    while not stopped:
        order = torch.randperm(len(fit_labels), generator=shuffle)
        for start in range(0, len(order), batch_size):
            net.train()
            batch = order[start : start + batch_size]
            optimiser.zero_grad()
            loss_fn(net(fit_images[batch]), fit_labels[batch]).backward()
            optimiser.step()
            step += 1
            if len(held) and (step % EVAL_EVERY == 0 or step == max_steps):
                loss, accuracy = _validation_loss(net.eval(), images[held], labels[held])
                if loss < best["loss"]:
                    best = {"loss": loss, "step": step, "accuracy": accuracy, "state": copy.deepcopy(net.state_dict())}
                stopped = step - best["step"] >= PATIENCE * EVAL_EVERY
            stopped = stopped or step >= max_steps
            if stopped:
                break
    if len(held):
        net.load_state_dict(best["state"])
    net.training_record = {
        "steps": step,
        "kept_step": best["step"] if len(held) else step,
        "validation_accuracy": best["accuracy"],
        "n_validation": len(held),
    }
    return net.to(memory_format=torch.contiguous_format).eval()


@torch.no_grad()
def _in_batches(fn, images: Tensor, batch_size: int) -> Tensor:
    return torch.cat([fn(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def extract_features(extractor: FeatureExtractor, images: Tensor, *, batch_size: int = EVAL_BATCH_SIZE) -> Tensor:
    """Features ``[N, D]`` of ``[-1, 1]`` images, in batches, without gradients."""
    if len(images) == 0:
        return torch.empty(0, extractor.num_features)
    return _in_batches(extractor.features, images, batch_size)


def classify(net: FeatureNet, images: Tensor, *, batch_size: int = EVAL_BATCH_SIZE) -> Tensor:
    """Predicted class index for each image."""
    net.eval()
    return _in_batches(lambda batch: net(batch).argmax(dim=1), images, batch_size)


class InceptionFeatures(nn.Module):
    """A TorchScript Inception-v3 detector taking fedgen's ``[-1, 1]`` images.

    The detector is called as ``detector(images, return_features=True)`` on uint8
    ``[N, 3, H, W]`` images (it resizes to 299 x 299 itself) and returns the 2048-d pool features,
    like NVlabs' ``inception-2015-12-05.pt``. Gray images are repeated to three channels.
    """

    num_features = INCEPTION_FEATURES

    def __init__(self, detector: nn.Module, *, path: Path) -> None:
        super().__init__()
        self.detector = detector
        self.path = path
        self.description = f"Inception-v3 (TorchScript detector from local path {path})"

    def features(self, images: Tensor) -> Tensor:
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        uint8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        features = self.detector(uint8, return_features=True)
        expected = (len(images), self.num_features)
        if not isinstance(features, Tensor) or tuple(features.shape) != expected:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise FedgenError(
                f"{self.path}: the detector returned {shape} for {len(images)} images, not features of shape {expected}"
            )
        return features.float()

    def forward(self, images: Tensor) -> Tensor:
        return self.features(images)


def load_inception(path: str | Path) -> InceptionFeatures:
    """The TorchScript Inception detector in ``path`` (e.g. ``inception-2015-12-05.pt``), on the CPU.

    Never downloads: a missing file is a FedgenError, and so is a file that is not TorchScript or
    a detector that cannot be called as above (it is tried once on a blank image).
    """
    path = Path(path)
    if not path.is_file():
        raise FedgenError(f"Inception file not found: {path} (fedgen never downloads weights)")
    try:
        with warnings.catch_warnings():  # torch deprecates TorchScript; the published detector is one
            warnings.simplefilter("ignore", DeprecationWarning)
            detector = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError:
        raise FedgenError(
            f"{path} is not a TorchScript file (expected a detector like inception-2015-12-05.pt)"
        ) from None
    inception = InceptionFeatures(detector.eval(), path=path)
    try:
        with torch.no_grad():
            inception.features(torch.zeros(1, 3, INCEPTION_PROBE_SIZE, INCEPTION_PROBE_SIZE))
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[0]
        raise FedgenError(f"{path} cannot be called as detector(images, return_features=True): {reason}") from None
    return inception
