"""One typed configuration for a run, loaded from TOML and written into the run folder.

Every size, step count and privacy parameter lives here, so the same code scales from the
2-core demo to a real consortium by changing a file, not the code. CLI flags override fields.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedgen.errors import FedgenError

__all__ = [
    "DR_GRADES",
    "MENTAL_HEALTH_CLASSES",
    "PRETRAIN_DEFAULTS",
    "DataConfig",
    "ImageConfig",
    "TextConfig",
    "PrivacyConfig",
    "FederationConfig",
    "RunConfig",
    "config_from_toml",
    "config_to_toml",
    "load_config",
    "save_config",
]

DR_GRADES = ["No_DR", "Mild", "Moderate", "Severe", "Proliferate_DR"]
MENTAL_HEALTH_CLASSES = ["Normal", "Anxiety", "Depression", "Stress", "Suicidal"]

# `fedgen pretrain`'s defaults per modality (public pretraining is not part of a run). Image:
# the pretraining of the best-measured small-site combination, with ImageConfig's defaults and
# an init_checkpoint (BENCHMARKS.md, "Quality at privacy"). Text: the recipe of the shipped
# adapter (scripts/pretrain-notes.sh).
PRETRAIN_DEFAULTS = {
    "image": {"epochs": 30, "batch_size": 32, "lr": 2e-3, "ema_decay": 0.999},
    "text": {"epochs": 3, "batch_size": 16, "lr": 2e-3},
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """The consortium's class lists (fixed for the whole run) and the site split.

    A class list that a configuration leaves out comes from the sites when a run is created:
    the sorted union of their class folders (images) or labels (texts), recorded in the run's
    config.toml (``fedgen.data.check.classes_from_sites``). The demo's lists below are only
    what a configuration built in code, without sites, starts from.
    """

    image_classes: list[str] = Field(default_factory=lambda: list(DR_GRADES))
    text_classes: list[str] = Field(default_factory=lambda: list(MENTAL_HEALTH_CLASSES))
    heldout_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    split_seed: int = Field(0, ge=0)


Sampler = Literal["ddim", "dpm", "ddpm", "dpm-sde"]  # what fedgen.models.diffusion.make_sampler builds


class ImageConfig(_Section):
    """Class-conditioned UNet2DModel, its training and its sampler."""

    resolution: int = Field(32, ge=8)
    channels: Literal[1, 3] = 1
    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = Field(1, ge=1)
    attention: bool = True  # self-attention in the lowest-resolution blocks
    norm_num_groups: int = Field(8, ge=1)
    train_timesteps: int = Field(1000, ge=10)
    # What the UNet predicts. An epsilon model's small constant error is multiplied by
    # 1/sqrt(alpha_bar) at the noisy end of the cosine schedule, so its samples drift bright;
    # v = sqrt(a) eps - sqrt(1-a) x0 stays well conditioned at every timestep (Salimans & Ho 2022).
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    cond_drop_prob: float = Field(0.1, ge=0.0, lt=1.0)  # label dropout for classifier-free guidance
    noise_multiplicity: int = Field(1, ge=1)  # K noise/timestep draws per example (DPDM)
    # Parameters that train: substrings of the UNet's parameter names (empty = all). Fine-tuning
    # a pretrained model's class embedding, time projections and attention (as DP-LDM does)
    # puts the DP noise on far fewer dimensions. The rest stays as init_checkpoint left it.
    trainable: list[str] = Field(default_factory=list)
    # A pretrained image model (`fedgen pretrain` output) the federation starts from.
    init_checkpoint: str | None = None
    # Opacus per-sample gradients, as for text; "ghost" uses fedgen's Conv2d norm sampler.
    grad_sample_mode: Literal["hooks", "ghost"] = "hooks"
    # Physical batches of at most this many examples (Opacus' BatchMemoryManager): large
    # logical batches, the DP-SGD lever, in bounded memory. None = the whole logical batch.
    max_physical_batch_size: int | None = Field(None, ge=1)
    local_epochs: int = Field(5, ge=1)  # a diffusion model needs steps: 3 rounds x 1 epoch is ~12
    # DP-SGD's clipping bound C on each example's gradient; the noise is σ·C. Lower bounds
    # (0.25, 0.1) measured no gain here (BENCHMARKS.md, "Quality at privacy").
    max_grad_norm: float = Field(1.0, gt=0)
    batch_size: int = Field(64, ge=1)  # expected (Poisson) batch size
    # Adam's step size for the sites' DP fine-tuning (the small-site benchmark's best-measured
    # mean, BENCHMARKS.md "Quality at privacy").
    lr: float = Field(4e-3, gt=0)
    # Server-side EMA of the global model over rounds, used for sampling; 0 = off (sample the
    # last round). Per round, so 0.5 averages roughly the last two rounds' DP noise away.
    ema_decay: float = Field(0.5, ge=0.0, lt=1.0)
    # "dpm-sde" (DPM-Solver++ SDE, second order) and "ddpm" (ancestral, first order) draw fresh
    # noise at every step, "ddim" and "dpm" are deterministic. At 50 steps ddpm's images lose the
    # fine texture that tells the low grades apart, and guidance 2 overdraws Severe's
    # (BENCHMARKS.md, "Quality at privacy").
    sampler: Sampler = "dpm-sde"
    sample_steps: int = Field(50, ge=1)
    guidance: float = Field(1.25, ge=0.0)


class TextConfig(_Section):
    """Causal LM from a local directory plus LoRA adapters; the only part that trains."""

    # A packaged model's name (converted once into the user's cache, fedgen.models.base_models),
    # "tiny-random-llama" (noise, for tests) or a local Hugging Face directory.
    base_model: str = "smollm2-135m-instruct"
    base_model_sha256: str | None = None  # a packaged model's file, recorded when a run is created
    tiny_hidden_size: int = Field(64, ge=8)
    tiny_layers: int = Field(2, ge=1)
    tiny_heads: int = Field(4, ge=1)
    lora_rank: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # Attention projections of a pretrained base. Not lm_head: SmolLM2 and Llama-3.2 tie it to
    # the input embeddings (a tiny random base learns only through it: tests name it).
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    # LoRA on the top N decoder layers only (None, or N >= the model's layers: all). The backward
    # pass stops at the lowest adapted layer, so a step costs a forward pass plus the upper layers'
    # backward: the top 10 of SmolLM2's 30 cost 0.61x the CPU per note of all 30 without DP,
    # 0.76x with DP, and 0.65x the peak memory (BENCHMARKS.md).
    lora_layers: int | None = Field(10, ge=1)
    # A chat model's class prompt: its chat template's system turn and user turn ({label}); the
    # note is the assistant's turn. A model without a chat template reads prompt_template.
    system_prompt: str = "You are a clinician who writes short, factual notes for a patient's record."
    user_prompt: str = "Write a short clinical note for a patient whose mental-health assessment is: {label}."
    prompt_template: str = "<class: {label}>\n{text}"
    max_length: int = Field(320, ge=8)  # tokens of prompt + note; a longer training note is refused
    # Base weights: "auto" = bfloat16 where the CPU (AVX512-BF16 / AMX) or a GPU computes in it,
    # else float32; "checkpoint" = the checkpoint's own dtype.
    dtype: Literal["auto", "float32", "bfloat16", "checkpoint"] = "auto"
    aggregation: Literal["fedavg", "ffa"] = "fedavg"  # ffa: A frozen at its shared init, B averaged
    load_in_bits: Literal[16, 8, 4] = 16  # 8/4-bit need bitsandbytes and a GPU
    # Opacus per-sample gradients: "hooks" stores them for the LoRA layers only; "ghost" (fast
    # gradient clipping) never forms them but runs two backward passes (it pays off for wide layers).
    grad_sample_mode: Literal["hooks", "ghost"] = "hooks"
    max_physical_batch_size: int | None = Field(None, ge=1)  # Opacus' BatchMemoryManager
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-3, gt=0)
    # DP-SGD's clipping bound C on each note's adapter gradient; the noise is σ·C. When
    # fine-tuning starts, a pretrained base's per-note gradients are far below 1 (SmolLM2's q/v
    # adapters on the demo notes: 0.14-0.33), so a bound of 1 clips none and adds noise four
    # times their size. Below every note's norm each note counts as one unit direction, and with
    # Adam (scale-free) only σ and the batch set the signal-to-noise (Li et al. 2022, "Large
    # language models can be strong differentially private learners"; benchmarks.dp_signal).
    max_grad_norm: float = Field(0.01, gt=0)
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    # None: the longest of the sites' coarse note lengths, which each site with 20 notes or more
    # sends in its training reply (a 0.9 quantile rounded up to 32 tokens; the run records it in
    # its checkpoints), at most max_length minus the class prompt (without one: that bound).
    max_new_tokens: int | None = Field(None, ge=1)
    # An adapter trained without DP on notes the consortium declares non-sensitive
    # (`fedgen pretrain --modality text`, or fedgen:<name> for one fedgen ships): the round-0
    # adapter, checked against its record (fedgen.models.pretrained). None: B = 0, the base model.
    init_adapter: str | None = None

    @field_validator("user_prompt")
    @classmethod
    def _has_label(cls, value: str) -> str:
        if "{label}" not in value:
            raise ValueError("the user prompt needs a {label} slot")
        return value

    @model_validator(mode="after")
    def _pretrained_adapter_needs_both_factors(self) -> TextConfig:
        if self.init_adapter is not None and self.aggregation == "ffa":
            raise ValueError("init_adapter needs aggregation = fedavg: FFA-LoRA keeps A at its seeded start")
        return self

    @field_validator("prompt_template")
    @classmethod
    def _has_slots(cls, value: str) -> str:
        if "{label}" not in value or "{text}" not in value:
            raise ValueError("the prompt template needs a {label} slot and a {text} slot")
        return value


MODALITY_NAMES = ("image", "text")


class PrivacyConfig(_Section):
    """Sample-level DP per site. epsilon = inf trains without DP (and the report says so)."""

    # Target ε per site for the whole run, all modalities together (fedgen.privacy.plan): a
    # site's image and note records are the same people unless its site.toml says otherwise.
    epsilon: float = Field(10.0, gt=0)
    delta: float | None = None  # None: 1 / (10 x the site's training records, largest modality)
    noise_multiplier: float | None = None  # given σ overrides calibration to epsilon
    # Opacus' accountant that calibrates σ and reports ε: "rdp" (Rényi DP) or "prv" (privacy
    # random variables: a tighter ε for the same noise, so less noise for the same ε).
    accountant: Literal["rdp", "prv"] = "rdp"
    # How a site's budget is shared by its modalities when both train on the same people: the
    # noise of each is set as if it had its share alone, then all are scaled to spend the budget.
    split: dict[str, float] = Field(default_factory=lambda: {"image": 0.5, "text": 0.5})
    # Opacus' secure_mode: DP noise and Poisson batches from a cryptographically secure generator
    # (torchcsprng, /dev/urandom), each noise value the sum of four Gaussian draws against
    # floating-point attacks. Needs torchcsprng, which has no build for torch 2.x.
    secure_mode: bool = False

    @model_validator(mode="before")
    @classmethod
    def _no_shared_clipping_bound(cls, values: object) -> object:
        if isinstance(values, dict) and "max_grad_norm" in values:
            raise ValueError("the clipping bound is per modality: image.max_grad_norm and text.max_grad_norm")
        return values

    @field_validator("split")
    @classmethod
    def _split_covers_the_modalities(cls, value: dict[str, float]) -> dict[str, float]:
        if set(value) != set(MODALITY_NAMES) or any(not share > 0 for share in value.values()):
            raise ValueError(f"split needs a share greater than 0 for each of {', '.join(MODALITY_NAMES)}")
        return value

    @property
    def enabled(self) -> bool:
        return math.isfinite(self.epsilon)


class FederationConfig(_Section):
    rounds: int = Field(3, ge=1)
    sites: int = Field(3, ge=1)
    strategy: Literal["fedavg", "fedadam", "fedprox"] = "fedavg"
    fraction_train: float = Field(1.0, gt=0, le=1)
    # Torch threads of each site's training and audit. A simulation runs its sites side by side,
    # one per core by default; a single site or a deployed node can take its machine's cores.
    threads_per_site: int = Field(1, ge=1)
    min_sites: int = Field(1, ge=1)  # the fewest replies a round may complete with
    proximal_mu: float = Field(0.01, ge=0)
    server_lr: float = Field(0.1, gt=0)  # FedAdam's eta
    round_timeout: float = Field(3600.0, gt=0)  # seconds
    # Client-level DP on top of each site's sample-level DP: the server clips every site's
    # update (its change to the global arrays) and adds Gaussian noise to the average.
    client_dp: Literal["off", "fixed", "adaptive"] = "off"
    client_dp_noise_multiplier: float = Field(1.0, ge=0)
    client_dp_clipping_norm: float = Field(1.0, gt=0)  # "adaptive": the initial norm
    # SecAgg+: the coordinator sees only the sum of the sites' updates (server/secagg.py).
    secagg: bool = False
    secagg_max_weight: float = Field(1000.0, gt=0)  # >= the largest site's training examples

    @model_validator(mode="after")
    def _client_dp_needs_plain_averaging(self) -> FederationConfig:
        if self.client_dp != "off" and self.strategy == "fedadam":
            raise ValueError(
                "client_dp needs strategy 'fedavg' or 'fedprox': FedAdam's server step would sit "
                "between the clipping and the noise"
            )
        if self.client_dp != "off" and self.secagg:
            raise ValueError("client_dp clips each site's update, which secagg hides from the server")
        return self


class RunConfig(_Section):
    modality: Literal["image", "text", "both"] = "image"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    image: ImageConfig = Field(default_factory=ImageConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)

    @property
    def modalities(self) -> list[str]:
        return ["image", "text"] if self.modality == "both" else [self.modality]


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    where = ".".join(str(p) for p in e["loc"])
    return f"{where}: {e['msg']}" if where else e["msg"]


def config_from_dict(values: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(values)
    except ValidationError as err:
        raise FedgenError(f"invalid configuration: {_first_error(err)}") from None


def config_from_toml(text: str) -> RunConfig:
    """The inverse of config_to_toml: how the server's resolved config reaches the sites."""
    try:
        return config_from_dict(tomllib.loads(text))
    except tomllib.TOMLDecodeError as err:
        raise FedgenError(f"run configuration is not valid TOML: {err}") from None


def config_to_toml(config: RunConfig) -> str:
    return tomli_w.dumps(_toml_safe(config.model_dump()))


def load_config(path: str | Path | None, overrides: dict | None = None) -> RunConfig:
    """Load a TOML config (or the defaults when path is None), then apply dotted overrides."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FedgenError(f"config file not found: {path}")
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise FedgenError(f"config file {path} is not valid TOML: {err}") from None
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = values
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return config_from_dict(values)


def _toml_safe(value):
    """TOML has no null: leave unset optional fields out (they load back as None)."""
    if isinstance(value, dict):
        return {k: _toml_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_toml_safe(v) for v in value]
    return value


def save_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(config_to_toml(config), encoding="utf-8")
