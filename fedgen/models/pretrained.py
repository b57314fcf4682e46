"""Pretrained models a run starts from, checked before use: the image model
(``image.init_checkpoint``) and the text adapter (``text.init_adapter``).

A checkpoint is a folder: the UNet as diffusers writes it (``config.json`` + safetensors
weights) and ``pretraining.json``, the record ``fedgen pretrain`` writes: which public data, how
it trained, and what a loader checks, namely the SHA-256 of the weights file, the architecture
(the ``[image]`` settings that shape the UNet and what it predicts) and the ordered class names.

fedgen also ships checkpoints, named ``fedgen:<name>`` in a configuration. Their record is the
one in ``SHIPPED`` below, in the code, so a weights file or config.json changed inside the
installed package is refused as well; ``recipe`` is the command that made the checkpoint.

On load a checkpoint must match its record (weights digest; the architecture its config.json
builds) and the run (architecture, prediction type, class names). Each mismatch is one line.
When the run names the same classes in another order (a consortium's classes come sorted from
its site folders), the class embeddings are reordered to the run's order.

A text adapter folder is PEFT's (``adapter_config.json`` + ``adapter_model.safetensors``) with
the same kind of record; what it is checked on is its LoRA setup on its base model and the class
prompt it learned (``ADAPTER_KEYS``), and the class names.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DModel
from safetensors import SafetensorError
from safetensors.torch import load_file

from fedgen.config import ImageConfig, TextConfig
from fedgen.errors import FedgenError
from fedgen.manifest import file_sha256
from fedgen.models.diffusion import (
    WEIGHTS_NAME,
    build_unet,
    check_same_architecture,
    first_config_difference,
    load_image_model,
)

__all__ = [
    "RECORD_NAME",
    "SHIPPED_PREFIX",
    "SHIPPED",
    "ARCHITECTURE_KEYS",
    "ADAPTER_KEYS",
    "ADAPTER_WEIGHTS",
    "architecture_of",
    "adapter_setup_of",
    "load_pretrained_adapter",
    "checkpoint_folder",
    "checkpoint_record",
    "load_pretrained",
]

RECORD_NAME = "pretraining.json"
SHIPPED_ROOT = Path(__file__).resolve().parents[1] / "checkpoints"  # package data: fedgen/checkpoints/
SHIPPED_PREFIX = "fedgen:"
# The [image] settings a pretrained UNet is made of: a run must use the same to start from it.
# train_timesteps and prediction_type shape no tensor, but the weights learned them.
ARCHITECTURE_KEYS = (
    "resolution",
    "channels",
    "block_out_channels",
    "layers_per_block",
    "attention",
    "norm_num_groups",
    "train_timesteps",
    "prediction_type",
)
# The [text] settings a pretrained adapter is made of: the base model it adapts, the LoRA setup
# that shapes and places its tensors, and the class prompt it learned to answer.
ADAPTER_KEYS = (
    "base_model",
    "lora_rank",
    "lora_alpha",
    "target_modules",
    "lora_layers",
    "system_prompt",
    "user_prompt",
)
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's file name

# Checkpoints installed with fedgen (fedgen/checkpoints/<name>/), each with the record it is
# checked against on every load: {"weights_sha256": hex digest of the weights file,
# "image_config": its ARCHITECTURE_KEYS, "classes": names in class-embedding order, "labelled":
# bool, "recipe": the command that made it}; a text adapter has "text_config" (its ADAPTER_KEYS
# and the base model's SHA-256) instead of "image_config". The recipe prints the record of what
# it made.
SHIPPED: dict[str, dict] = {
    "fundus-phantoms-32": {
        "weights_sha256": "42c987a46c03c7962f64f9c80047d73ac2a2b19d3e73cfdf9bd9a8d08fad5b91",
        "image_config": {
            "resolution": 32,
            "channels": 1,
            "block_out_channels": [32, 64, 64],
            "layers_per_block": 1,
            "attention": True,
            "norm_num_groups": 8,
            "train_timesteps": 1000,
            "prediction_type": "v_prediction",
        },
        "classes": ["No_DR", "Mild", "Moderate", "Severe", "Proliferate_DR"],
        "labelled": True,
        "recipe": "bash scripts/pretrain-phantoms.sh",
    },
    "public-notes-smollm2": {
        "weights_sha256": "ec0ea62f4478b498b096480d7ff5390d117f0bb75b73b85ee067da12156d954d",
        "text_config": {
            "base_model": "smollm2-135m-instruct",
            "lora_rank": 8,
            "lora_alpha": 16,
            "target_modules": ["q_proj", "v_proj"],
            "lora_layers": 10,
            "system_prompt": "You are a clinician who writes short, factual notes for a patient's record.",
            "user_prompt": "Write a short clinical note for a patient whose mental-health assessment is: {label}.",
            "base_model_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        },
        "classes": ["Anxiety", "Depression", "Normal", "Stress", "Suicidal"],
        "recipe": "bash scripts/pretrain-notes.sh",
    },
}


def architecture_of(image: ImageConfig | dict) -> dict:
    """The ``ARCHITECTURE_KEYS`` of an image configuration (or of a recorded one)."""
    values = image.model_dump() if isinstance(image, ImageConfig) else image
    return {key: values.get(key) for key in ARCHITECTURE_KEYS}


def _shipped_name(checkpoint: str) -> str | None:
    return checkpoint.removeprefix(SHIPPED_PREFIX) if checkpoint.startswith(SHIPPED_PREFIX) else None


def checkpoint_folder(checkpoint: str, *, setting: str = "image.init_checkpoint") -> Path:
    """The folder of ``checkpoint`` (the value of ``setting``): a path, or ``fedgen:<name>`` for
    a shipped checkpoint."""
    name = _shipped_name(checkpoint)
    if name is None:
        return Path(checkpoint)
    if name not in SHIPPED:
        shipped = ", ".join(SHIPPED_PREFIX + n for n in SHIPPED) or "none"
        raise FedgenError(f"{setting} {checkpoint!r}: fedgen ships no such checkpoint (it ships {shipped})")
    return SHIPPED_ROOT / name


def checkpoint_record(checkpoint: str, *, setting: str = "image.init_checkpoint") -> dict | None:
    """What ``checkpoint`` is checked against: the code's record of a shipped checkpoint, else
    the folder's pretraining.json (None if it has none: not made by ``fedgen pretrain``)."""
    name = _shipped_name(checkpoint)
    if name is not None:
        checkpoint_folder(checkpoint, setting=setting)  # an unknown name is one line
        return SHIPPED[name]
    path = Path(checkpoint) / RECORD_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FedgenError(f"pretraining record {path} is not valid JSON: {err}") from None


def _check_digest(what: str, weights: Path, expected: str | None) -> None:
    """``weights`` (a file of the pretrained ``what``) has the SHA-256 its record gives."""
    if expected is None or not weights.is_file():
        return
    actual = file_sha256(weights)
    if actual != expected:
        raise FedgenError(
            f"{what}: {weights.name} has SHA-256 {actual[:12]}..., its record {expected[:12]}...: "
            "the weights were changed or damaged"
        )


def _check_against_record(checkpoint: str, folder: Path, record: dict) -> None:
    """The weights file has the recorded digest and config.json builds the recorded architecture."""
    _check_digest(f"pretrained image model {checkpoint}", folder / WEIGHTS_NAME, record.get("weights_sha256"))
    if "image_config" not in record or record.get("classes") is None:
        return
    recorded = build_unet(ImageConfig(**architecture_of(record["image_config"])), len(record["classes"]))
    difference = first_config_difference(load_image_model(folder), recorded)
    if difference is not None:
        key, theirs, value = difference
        raise FedgenError(
            f"pretrained image model {checkpoint}: config.json has {key}={theirs!r} but the recorded "
            f"architecture builds {key}={value!r}: the model folder was changed"
        )


def _check_against_run(checkpoint: str, record: dict, image: ImageConfig, classes: list[str]) -> None:
    """The run asks for the recorded architecture and the recorded classes (in any order)."""
    if "image_config" in record:
        recorded, run = architecture_of(record["image_config"]), architecture_of(image)
        for key, value in recorded.items():
            if _as_list(value) != _as_list(run[key]):
                raise FedgenError(
                    f"pretrained image model {checkpoint} was trained with image.{key} = {value!r} "
                    f"but the run sets {run[key]!r}: use the checkpoint's setting or pretrain with the run's"
                )
    _check_same_classes(f"pretrained image model {checkpoint}", record, classes, "image")


def _check_same_classes(what: str, record: dict, classes: list[str], modality: str) -> None:
    names = record.get("classes")
    if names is not None and record.get("labelled", True) and sorted(names) != sorted(classes):
        raise FedgenError(
            f"{what} learned the classes {', '.join(names)} but the run's {modality} classes are {', '.join(classes)}"
        )


def _as_list(value):
    return list(value) if isinstance(value, tuple | list) else value


@torch.no_grad()
def _reorder_classes(unet: UNet2DModel, recorded: list[str], classes: list[str]) -> None:
    """Row i of the class embedding becomes the recorded row of the run's class i (null last)."""
    order = [recorded.index(name) for name in classes] + [len(recorded)]
    weight = unet.class_embedding.weight
    weight.copy_(weight[order].clone())


def load_pretrained(checkpoint: str, image: ImageConfig, classes: list[str]) -> UNet2DModel:
    """The UNet in ``checkpoint``, after checking it against its record and against the run
    (``image`` settings, ``classes`` in the run's order); class rows follow the run's order."""
    folder = checkpoint_folder(checkpoint)
    if not folder.is_dir():
        raise FedgenError(f"pretrained image model not found: {checkpoint}")
    record = checkpoint_record(checkpoint)
    if record is not None:
        _check_against_record(checkpoint, folder, record)
        _check_against_run(checkpoint, record, image, classes)
    unet = load_image_model(folder)
    check_same_architecture(unet, build_unet(image, len(classes)), source=checkpoint)
    recorded = (record or {}).get("classes")
    if recorded is not None and recorded != classes and sorted(recorded) == sorted(classes):
        _reorder_classes(unet, recorded, classes)
    return unet


def adapter_setup_of(text: TextConfig | dict) -> dict:
    """The ``ADAPTER_KEYS`` of a text configuration (or of a recorded one)."""
    values = text.model_dump() if isinstance(text, TextConfig) else text
    return {key: values.get(key) for key in ADAPTER_KEYS}


def _check_adapter_against_run(what: str, record: dict, text: TextConfig, classes: list[str]) -> None:
    """The run adapts the recorded base model (same file when both know its digest) the recorded
    way, with the recorded class prompt and classes."""
    recorded = record.get("text_config")
    if recorded is not None:
        run = adapter_setup_of(text)
        for key, value in adapter_setup_of(recorded).items():
            if _as_list(value) != _as_list(run[key]):
                raise FedgenError(
                    f"{what} was trained with text.{key} = {value!r} but the run sets {run[key]!r}: "
                    "use the adapter's setting or pretrain with the run's"
                )
        digest = recorded.get("base_model_sha256")
        if None not in (digest, text.base_model_sha256) and digest != text.base_model_sha256:
            raise FedgenError(
                f"{what} adapts {text.base_model} with SHA-256 {digest[:12]}..., the run's is "
                f"{text.base_model_sha256[:12]}...: another version of the base model"
            )
    _check_same_classes(what, record, classes, "text")


def load_pretrained_adapter(checkpoint: str, text: TextConfig, classes: list[str]) -> dict[str, torch.Tensor]:
    """The adapter tensors in ``checkpoint`` (PEFT's names), after checking the folder against
    its record (weights digest) and the run (``ADAPTER_KEYS``, base model, classes)."""
    folder = checkpoint_folder(checkpoint, setting="text.init_adapter")
    what = f"pretrained text adapter {checkpoint}"
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FedgenError(f"{what}: {weights} not found")
    record = checkpoint_record(checkpoint, setting="text.init_adapter")
    if record is not None:
        _check_digest(what, weights, record.get("weights_sha256"))
        _check_adapter_against_run(what, record, text, classes)
    try:
        return load_file(weights)
    except (OSError, SafetensorError) as err:
        raise FedgenError(f"{what}: {weights.name} cannot be read: {err}") from None
