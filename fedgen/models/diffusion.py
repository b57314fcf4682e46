"""The class-conditioned image diffusion model: a diffusers ``UNet2DModel``, its loss and sampler.

Plain PyTorch + diffusers, so clients (DP training), the server (generation) and the audits
(per-example losses for membership inference) share one definition.

- Conditioning: one learned embedding per class plus one extra *null class* (index
  ``num_classes``). Training replaces labels by the null class with probability
  ``cond_drop_prob``, so the same network predicts conditional and unconditional noise, and
  sampling mixes them (classifier-free guidance, Ho & Salimans 2022).
- Training: v prediction (or epsilon, ``prediction_type``) on a DDPM noise schedule; the loss
  is returned *per example* because DP-SGD clips per example and membership-inference attacks
  score per example.
- Sampling: ancestral DDPM on a strided chain (50 steps) by default; DDIM and DPM-Solver++
  deterministically.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import get_args

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image, ImageDraw, ImageFont
from safetensors import SafetensorError, safe_open

from fedgen.config import ImageConfig, Sampler
from fedgen.errors import FedgenError
from fedgen.files import atomic_dir

__all__ = [
    "SAMPLERS",
    "build_unet",
    "select_trainable",
    "check_same_architecture",
    "first_config_difference",
    "null_class",
    "update_ema",
    "make_noise_scheduler",
    "make_sampler",
    "denoising_loss",
    "training_target",
    "predicted_noise",
    "sample_images",
    "save_image_model",
    "load_image_model",
    "to_uint8",
    "contact_sheet",
]

ATTENTION_HEAD_DIM = 8
# Cosine schedule (Nichol & Dhariwal 2021): better than linear betas for small images, and
# it reaches pure noise for any number of training timesteps.
BETA_SCHEDULE = "squaredcos_cap_v2"
# Start DDIM at the last training timestep (Lin et al. 2023, "Common Diffusion Noise
# Schedules and Sample Steps are Flawed"); "leading" would start from a partly noised image.
DDIM_TIMESTEP_SPACING = "trailing"
# DPM-Solver needs its log-SNR clipped with the cosine schedule (see diffusers' docstring).
DPM_LAMBDA_MIN_CLIPPED = -5.1
# fedgen's two DPM-Solver++ samplers (Lu et al. 2022), both second order: the ODE and the SDE.
DPM_ALGORITHMS = {"dpm": "dpmsolver++", "dpm-sde": "sde-dpmsolver++"}

SAMPLERS = get_args(Sampler)
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"


def _check_architecture(config: ImageConfig, num_classes: int) -> None:
    """Reject sizes diffusers would fail on later with an obscure message."""
    if num_classes < 1:
        raise FedgenError("the image model needs at least one class, got an empty class list")
    channels = config.block_out_channels
    if not channels:
        raise FedgenError("image.block_out_channels is empty: give at least one channel count")
    downsamples = 2 ** (len(channels) - 1)
    if config.resolution % downsamples:
        raise FedgenError(
            f"image.resolution {config.resolution} is not divisible by {downsamples} "
            f"(one halving per extra entry of block_out_channels {channels})"
        )
    bad = [c for c in channels if c % config.norm_num_groups]
    if bad:
        raise FedgenError(
            f"image.block_out_channels {channels}: {bad} not divisible by "
            f"image.norm_num_groups {config.norm_num_groups}"
        )
    if config.attention and channels[-1] % ATTENTION_HEAD_DIM:
        raise FedgenError(
            f"image.block_out_channels {channels}: the last entry must be a multiple of the "
            f"attention head size {ATTENTION_HEAD_DIM} when image.attention is on"
        )


def _block_types(levels: int, attention: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Down/up block names, with self-attention only at the lowest resolution (the cheapest)."""
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if attention:
        down[-1] = "AttnDownBlock2D"
        up[0] = "AttnUpBlock2D"
    return tuple(down), tuple(up)


def build_unet(config: ImageConfig, num_classes: int) -> UNet2DModel:
    """A randomly initialised class-conditioned UNet; label ``num_classes`` is the null class."""
    _check_architecture(config, num_classes)
    down, up = _block_types(len(config.block_out_channels), config.attention)
    return UNet2DModel(
        sample_size=config.resolution,
        in_channels=config.channels,
        out_channels=config.channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups,
        attention_head_dim=ATTENTION_HEAD_DIM,
        add_attention=config.attention,  # the mid block sits at the lowest resolution too
        num_class_embeds=num_classes + 1,
    )


def select_trainable(unet: torch.nn.Module, patterns: list[str]) -> None:
    """Freeze every parameter whose name contains none of ``patterns`` (empty: all train).

    A pattern that matches nothing is a configuration mistake, named with what exists.
    """
    if not patterns:
        return
    names = [name for name, _ in unet.named_parameters()]
    unmatched = [p for p in patterns if not any(p in name for name in names)]
    if unmatched:
        modules = sorted({name.split(".")[0] for name in names})
        raise FedgenError(
            f"image.trainable {unmatched} match no UNet parameter; names start with "
            f"{', '.join(modules)} (e.g. class_embedding, time_emb_proj, attentions, norm)"
        )
    for name, param in unet.named_parameters():
        param.requires_grad_(any(p in name for p in patterns))


def first_config_difference(saved: UNet2DModel, built: UNet2DModel) -> tuple[str, object, object] | None:
    """The first UNet setting of ``built`` that ``saved`` does not share: (key, saved's, built's)."""
    ignored = {"_name_or_path", "_use_default_values", "_diffusers_version", "_class_name"}
    for key, value in built.config.items():
        if key in ignored:
            continue
        theirs = saved.config.get(key)
        if _as_list(theirs) != _as_list(value):
            return key, theirs, value
    return None


def check_same_architecture(saved: UNet2DModel, built: UNet2DModel, *, source: str | Path) -> None:
    """A pretrained UNet must have the run's architecture: name the first setting that differs."""
    difference = first_config_difference(saved, built)
    if difference is not None:
        key, theirs, value = difference
        raise FedgenError(
            f"pretrained image model {source} has {key}={theirs!r} but the run's image "
            f"config builds {key}={value!r}; pretrain with the run's config"
        )


def _as_list(value):
    return list(value) if isinstance(value, tuple | list) else value


def null_class(unet: torch.nn.Module) -> int:
    """The label that means "no class" (the last class embedding)."""
    unet = getattr(unet, "_module", unet)  # Opacus' GradSampleModule wraps the UNet as _module
    return unet.config.num_class_embeds - 1


def update_ema(ema: dict | None, state: dict, decay: float) -> dict:
    """ema <- decay * ema + (1 - decay) * state, tensor by tensor (the first call starts it)."""
    if ema is None:
        return {k: v.detach().clone() for k, v in state.items()}
    return {k: decay * ema[k] + (1 - decay) * v if v.is_floating_point() else v for k, v in state.items()}


def make_noise_scheduler(config: ImageConfig) -> DDPMScheduler:
    """The forward (noising) process used in training."""
    return DDPMScheduler(
        num_train_timesteps=config.train_timesteps,
        beta_schedule=BETA_SCHEDULE,
        prediction_type=config.prediction_type,
        clip_sample=True,
    )


def make_sampler(config: ImageConfig, kind: str) -> SchedulerMixin:
    """A reverse-process scheduler on the training noise schedule, one of ``SAMPLERS``."""
    training = make_noise_scheduler(config).config
    if kind == "ddim":
        return DDIMScheduler.from_config(training, timestep_spacing=DDIM_TIMESTEP_SPACING)
    if kind in DPM_ALGORITHMS:
        return DPMSolverMultistepScheduler.from_config(
            training, algorithm_type=DPM_ALGORITHMS[kind], lambda_min_clipped=DPM_LAMBDA_MIN_CLIPPED
        )
    if kind == "ddpm":
        return DDPMScheduler.from_config(training)
    raise FedgenError(f"unknown sampler {kind!r}: choose one of {', '.join(SAMPLERS)}")


def denoising_loss(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    cond_drop_prob: float = 0.0,
    generator: torch.Generator | None = None,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-example MSE against the training target (v or noise), shape [B] (mean over pixels).

    ``images`` are in [-1, 1]. Noise, timesteps and label dropout are drawn in that order from
    ``generator`` unless noise / timesteps are given (attacks score fixed draws). Labels are
    replaced by the null class with probability ``cond_drop_prob``. ``unet`` may be wrapped by
    Opacus: the loss of example i depends only on example i.
    """
    batch = images.shape[0]
    if noise is None:
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    if timesteps is None:
        timesteps = torch.randint(
            0,
            scheduler.config.num_train_timesteps,
            (batch,),
            generator=generator,
            device=images.device,
        )
    if cond_drop_prob > 0:
        drop = torch.rand(batch, generator=generator, device=images.device) < cond_drop_prob
        labels = torch.where(drop, null_class(unet), labels)
    noisy = scheduler.add_noise(images, noise, timesteps)
    predicted = unet(noisy, timesteps, class_labels=labels).sample
    target = training_target(scheduler, images, noise, timesteps)
    return F.mse_loss(predicted, target, reduction="none").mean(dim=(1, 2, 3))


def training_target(
    scheduler: SchedulerMixin, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet is trained to predict, per the scheduler's ``prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(images, noise, timesteps)
    raise FedgenError(f"unsupported prediction_type {kind!r}: use 'epsilon' or 'v_prediction'")


def predicted_noise(
    scheduler: SchedulerMixin, output: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The noise estimate implied by the UNet's ``output`` on ``noisy`` images at ``timesteps``."""
    if scheduler.config.prediction_type == "epsilon":
        return output
    alpha_bar = scheduler.alphas_cumprod.to(noisy.device)[timesteps].view(-1, 1, 1, 1)
    return alpha_bar.sqrt() * output + (1 - alpha_bar).sqrt() * noisy


@torch.no_grad()
def _sample_batch(
    unet: UNet2DModel,
    scheduler: SchedulerMixin,
    labels: torch.Tensor,
    *,
    config: ImageConfig,
    steps: int,
    guidance: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Reverse diffusion for one batch with classifier-free guidance."""
    shape = (labels.shape[0], config.channels, config.resolution, config.resolution)
    x = torch.randn(shape, generator=generator, device=unet.device) * scheduler.init_noise_sigma
    both_labels = torch.cat([labels, torch.full_like(labels, null_class(unet))])
    scheduler.set_timesteps(steps, device=unet.device)  # also resets multistep solver state
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([x, x]), t)
        eps_cond, eps_uncond = unet(model_input, t, class_labels=both_labels).sample.chunk(2)
        eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x.clamp(-1.0, 1.0)


def sample_images(
    unet: UNet2DModel,
    labels: torch.Tensor,
    *,
    config: ImageConfig,
    steps: int | None = None,
    guidance: float | None = None,
    sampler: str | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Generate one image per label, shape [N, C, H, W] in [-1, 1].

    Guidance w mixes the two noise predictions, eps = eps_uncond + w (eps_cond - eps_uncond):
    w = 0 ignores the label, w = 1 is plain conditional sampling, w > 1 sharpens classes.
    Labels equal to the null class give unconditional samples. Each network call sees
    2 x ``batch_size`` images (conditional and unconditional halves). ``progress(n)`` is
    called with the number of images finished after each batch. ``sampler`` and ``steps``
    default to the config's; "ddpm" with fewer steps than the training chain samples ancestrally
    on the strided chain (each step draws the exact posterior q(x_t' | x_t, x0-estimate)).
    """
    assert labels.ndim == 1 and len(labels) > 0, "sample_images needs a 1-D tensor of labels"
    sampler = config.sampler if sampler is None else sampler
    steps = config.sample_steps if steps is None else steps
    guidance = config.guidance if guidance is None else guidance
    if not 1 <= steps <= config.train_timesteps:
        raise FedgenError(
            f"sampling steps {steps} must be between 1 and the training timesteps {config.train_timesteps}"
        )
    scheduler = make_sampler(config, sampler)
    was_training = unet.training
    unet.eval()
    try:
        batches = []
        for chunk in labels.to(unet.device).split(batch_size):
            batches.append(
                _sample_batch(
                    unet,
                    scheduler,
                    chunk,
                    config=config,
                    steps=steps,
                    guidance=guidance,
                    generator=generator,
                )
            )
            if progress is not None:
                progress(len(chunk))
    finally:
        unet.train(was_training)
    return torch.cat(batches)


def save_image_model(unet: UNet2DModel, directory: str | Path) -> None:
    """Write config.json + safetensors weights, loadable with ``UNet2DModel.from_pretrained``.

    Written into a temporary sibling folder and renamed, so an interrupted save never leaves a
    half-written model where a loader would look for one.
    """
    with atomic_dir(directory) as staging:
        unet.save_pretrained(staging, safe_serialization=True)


def _check_files(directory: Path) -> None:
    """Name the broken file before diffusers gets to it (its messages repeat paths and advice)."""
    if not directory.is_dir():
        raise FedgenError(f"image model directory not found: {directory}")
    config_file, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for required in (config_file, weights):
        if not required.is_file():
            raise FedgenError(f"image model {directory}: {required.name} is missing")
    try:
        json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FedgenError(f"image model config {config_file} is not valid JSON: {err}") from None
    try:
        with safe_open(weights, framework="pt"):
            pass
    except SafetensorError as err:
        raise FedgenError(f"image model weights {weights} are corrupt or truncated: {err}") from None


def load_image_model(directory: str | Path) -> UNet2DModel:
    """Load a model saved by ``save_image_model``; never reaches a hub."""
    directory = Path(directory)
    _check_files(directory)
    try:
        unet, info = UNet2DModel.from_pretrained(
            directory, local_files_only=True, use_safetensors=True, output_loading_info=True
        )
    except Exception as err:  # diffusers raises ValueError, OSError, ... for a bad config
        first_sentence = str(err).strip().split(". ")[0].splitlines()[0]
        raise FedgenError(
            f"image model config {directory / CONFIG_NAME} cannot build the saved UNet: {first_sentence}"
        ) from None
    missing = info["missing_keys"]  # diffusers would only warn and leave them random
    if missing:
        raise FedgenError(
            f"image model weights {directory / WEIGHTS_NAME} lack {len(missing)} tensors "
            f"of {CONFIG_NAME}, e.g. {sorted(missing)[0]}"
        )
    if unet.config.num_class_embeds is None:
        raise FedgenError(f"image model {directory} is not class-conditioned (no num_class_embeds)")
    return unet


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> uint8 array [B, H, W, C] (the layout PIL and PNG writers use)."""
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _to_pil(pixels: np.ndarray) -> Image.Image:
    """One [H, W, C] uint8 image; gray images become mode "L"."""
    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


def contact_sheet(images_by_class: dict[str, torch.Tensor], *, pad: int = 2) -> Image.Image:
    """A grid with one column per class (its name as the header) and one row per sample."""
    assert images_by_class, "contact_sheet needs at least one class"
    columns = {name: to_uint8(images) for name, images in images_by_class.items()}
    height, width, channels = next(iter(columns.values())).shape[1:]
    assert all(c.shape[1:] == (height, width, channels) for c in columns.values()), (
        "all images of a contact sheet must have the same size and channels"
    )
    font = ImageFont.load_default()
    text_boxes = {name: font.getbbox(name) for name in columns}
    column_width = max([width] + [box[2] for box in text_boxes.values()])
    header = max(box[3] for box in text_boxes.values()) + 2 * pad
    rows = max(len(c) for c in columns.values())
    mode, white = ("L", 255) if channels == 1 else ("RGB", (255, 255, 255))
    sheet = Image.new(mode, (pad + len(columns) * (column_width + pad), header + rows * (height + pad)), 0)
    draw = ImageDraw.Draw(sheet)
    for col, (name, pixels) in enumerate(columns.items()):
        left = pad + col * (column_width + pad)
        draw.text((left, pad), name, fill=white, font=font)
        for row, image in enumerate(pixels):
            top = header + row * (height + pad)
            sheet.paste(_to_pil(image), (left + (column_width - width) // 2, top))
    return sheet
