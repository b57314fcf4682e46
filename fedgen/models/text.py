"""The text model: a causal LM from a local directory with LoRA adapters, and what it needs.

Only the LoRA adapter trains, is sent and is aggregated; the base model stays frozen at every
site. The base model is a pretrained chat model by default (fedgen.models.base_models); fast
tests use a tiny randomly initialised Llama (`make_tiny_llama`) and a byte-level tokenizer with
no merges (`make_byte_tokenizer`): a tokenizer trained on the sites' notes would itself carry
their text.

A training example is a class prompt followed by the note and the token that ends it
(`class_prompts`). With a chat model the prompt is the chat template's system and user turns
("write a ... note ... {label}") up to the start of the assistant's turn, the note is the
assistant's turn and its end is the end-of-turn token; a model without a chat template (the tiny
one) reads ``<s>`` and the prompt template up to its ``{text}`` slot, and ends with ``</s>``.
The loss covers only the note and its end token, so the model learns to write notes given a
class, not to predict the prompt, and logits are computed for those positions only: a 49k-word
vocabulary at every prompt position would dominate the memory of a step. Losses are per example
because DP-SGD clips per example and membership attacks score per example.

Aggregating LoRA. A site's update is W = W0 + (alpha/r) B A. FedAvg of A and of B separately
(`aggregation="fedavg"`, the baseline) gives mean(B) mean(A), which is not the mean of the
sites' products mean(B A): the cross terms B_i A_j of different sites enter, so the global
model is not the average of what the sites learned, and the gap grows with how far the sites
drift apart (non-IID data, several local epochs). FFA-LoRA (`aggregation="ffa"`, Sun et al.
2024) freezes A at its shared seeded initialisation, so B A is linear in B and averaging B
averages the products exactly; it also halves the bytes sent, and under DP the noise is added
to half as many parameters.

Nothing here reaches a model hub: every load is from a local directory and is checked first.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, set_peft_model_state_dict
from safetensors import SafetensorError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import Tensor, nn
from torch.utils.data import TensorDataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from fedgen.config import TextConfig
from fedgen.errors import FedgenError
from fedgen.files import atomic_dir

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "make_byte_tokenizer",
    "make_tiny_llama",
    "load_base_model",
    "load_tokenizer",
    "add_lora",
    "lora_state",
    "set_lora_state",
    "load_saved_adapter_state",
    "ClassPrompts",
    "class_prompts",
    "validate_template",
    "prompt_prefix",
    "render_example",
    "encode_examples",
    "first_adapted_layer",
    "frozen_states",
    "token_logprobs",
    "sequence_loss",
    "decoding_steps",
    "generate_texts",
    "save_adapter",
    "load_adapter",
]

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
TEXT_SLOT = "{text}"
LABEL_SLOT = "{label}"
NOTE_MARK = "\x00NOTE\x00"  # stands for the note when the chat template is rendered
TINY_MLP_RATIO = 4  # intermediate size of the tiny Llama's MLP, as a multiple of the hidden size
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PEFT_MODEL_CARD = "README.md"  # what PEFT's save_pretrained writes beside them
LORA_MARKER = "lora_"  # PEFT names every LoRA parameter ...lora_A... / ...lora_B...
FFA_FROZEN_MARKER = "lora_A"  # FFA-LoRA keeps the A matrices at their shared seeded init

ProgressFn = Callable[[int, int], None]  # (decoding steps done, at most this many)


# --- files ----------------------------------------------------------------------------------------


def _one_line(err: BaseException) -> str:
    """A library error as one line: its first two non-empty lines (the second often says what)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:2]) or type(err).__name__


# --- tokenizer and base model ---------------------------------------------------------------------


def make_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer that knows only the 256 bytes (token id = byte value) plus <s>, </s>, <pad>.

    It is built from nothing but the byte alphabet, so it cannot leak any site's text, and it
    round-trips every UTF-8 string exactly. Invalid byte runs in generated text decode to U+FFFD.
    """
    vocab = {symbol: byte for byte, symbol in bytes_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([BOS_TOKEN, EOS_TOKEN, PAD_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )


def _tiny_llama_config(config: TextConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    hidden, heads = config.tiny_hidden_size, config.tiny_heads
    if hidden % heads or (hidden // heads) % 2:
        raise FedgenError(
            f"text.tiny_hidden_size {hidden} must split into text.tiny_heads {heads} heads "
            "of an even size (rotary embeddings rotate pairs)"
        )
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=TINY_MLP_RATIO * hidden,
        num_hidden_layers=config.tiny_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=config.max_length + (config.max_new_tokens or 0),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def make_tiny_llama(directory: str | Path, *, config: TextConfig, seed: int = 0) -> Path:
    """Write a tiny randomly initialised LlamaForCausalLM and the byte tokenizer to `directory`.

    The result loads with `load_base_model` (or AutoModelForCausalLM / AutoTokenizer). An
    existing non-empty directory is refused rather than overwritten.
    """
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise FedgenError(f"cannot create a tiny text model in {directory}: it is not empty")
    tokenizer = make_byte_tokenizer()
    llama_config = _tiny_llama_config(config, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama_config)
    with atomic_dir(directory) as scratch:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
    return directory


def _check_base_dir(path: Path) -> None:
    if not path.is_dir():
        raise FedgenError(f"text base model {path} is not a directory")
    if not (path / "config.json").is_file():
        raise FedgenError(f"text base model {path} has no config.json")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FedgenError(f"text base model {path} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")


def _quantization(load_in_bits: int) -> BitsAndBytesConfig | None:
    """None for 16 (the checkpoint's own dtype); a bitsandbytes config for 8 / 4 bits."""
    if load_in_bits == 16:
        return None
    if load_in_bits not in (8, 4):
        raise FedgenError(f"text.load_in_bits {load_in_bits} is not one of 16, 8, 4")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise FedgenError(f"text.load_in_bits {load_in_bits} needs the bitsandbytes package, which is not installed")
    if not torch.cuda.is_available():
        raise FedgenError(f"text.load_in_bits {load_in_bits} needs a CUDA GPU and none is available")
    return BitsAndBytesConfig(load_in_8bit=load_in_bits == 8, load_in_4bit=load_in_bits == 4)


def _load_failed(path: Path, err: BaseException) -> FedgenError:
    return FedgenError(f"cannot load text base model {path}: {_one_line(err)}")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """The base model's own tokenizer from its local directory (pad falls back to EOS)."""
    path = Path(path)
    _check_base_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise _load_failed(path, err) from None
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise FedgenError(f"the tokenizer in {path} has no begin/end-of-sequence token")
    if tokenizer.pad_token_id is None:  # e.g. Llama 3: padding is masked out, any id will do
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def base_dtype(name: str) -> torch.dtype | str:
    """The base weights' dtype: "auto" is bfloat16 where the CPU computes in it natively (AVX512-BF16,
    AMX) or on a GPU, else float32; "checkpoint" keeps the checkpoint's own."""
    if name == "checkpoint":
        return "auto"
    if name == "auto":
        native = torch.cuda.is_available() or torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return torch.bfloat16 if native else torch.float32
    return getattr(torch, name)


def load_base_model(
    path: str | Path, *, load_in_bits: int = 16, dtype: str = "checkpoint"
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a causal LM and its tokenizer from a local directory, with every parameter frozen.

    16 bits loads the weights in `dtype` (`base_dtype`); 8 and 4 quantize with bitsandbytes,
    which needs a CUDA GPU.
    """
    path = Path(path)
    tokenizer = load_tokenizer(path)
    quantization = _quantization(load_in_bits)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=base_dtype(dtype), quantization_config=quantization
        )
    except (OSError, ValueError, KeyError) as err:
        raise _load_failed(path, err) from None
    model.requires_grad_(False)
    return model, tokenizer


# --- LoRA -----------------------------------------------------------------------------------------


def _linear_module_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _check_target_modules(model: nn.Module, targets: Sequence[str]) -> None:
    """PEFT matches a target to a module whose dotted name equals it or ends with '.target'."""
    names = _linear_module_names(model)
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        available = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise FedgenError(f"text.target_modules {missing} not found in the model; its linear layers are {available}")


def add_lora(model: PreTrainedModel, config: TextConfig, *, seed: int = 0) -> PeftModel:
    """Wrap `model` with LoRA adapters on `config.target_modules`; only the adapters train.

    The seed fixes the adapters' initialisation (A random, B zero), so every site and the
    server start from the same adapter. With `aggregation="ffa"` (FFA-LoRA) A stays frozen at
    that shared init and only B trains: averaging the sites' B is then exactly averaging their
    updates B·A, which FedAvg of both factors is not.
    """
    _check_target_modules(model, config.target_modules)
    layers = model.config.num_hidden_layers
    upper = config.lora_layers is not None and config.lora_layers < layers
    lora_config = LoraConfig(
        layers_to_transform=list(range(layers - config.lora_layers, layers)) if upper else None,
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, lora_config)
    if config.aggregation == "ffa":
        for name, param in peft_model.named_parameters():
            if FFA_FROZEN_MARKER in name:
                param.requires_grad_(False)
    return peft_model


def _trained_adapter_parameters(model: PeftModel) -> dict[str, nn.Parameter]:
    params = {name: param for name, param in model.named_parameters() if LORA_MARKER in name and param.requires_grad}
    assert params, "the model has no trainable LoRA parameters (was it built with add_lora?)"
    return params


def lora_state(model: PeftModel) -> dict[str, Tensor]:
    """Copies of the adapter tensors that train, in module order; never a base weight.

    This is the model update a site sends. With FFA-LoRA it holds only the B matrices: A is
    the same seeded init everywhere and never changes. Keys are the PeftModel's parameter names
    (".lora_B.default.weight"). Pass the PeftModel, not an Opacus wrapper; a model loaded with
    `load_adapter` trains nothing and has no state here.
    """
    return {name: param.detach().cpu().clone() for name, param in _trained_adapter_parameters(model).items()}


def set_lora_state(model: PeftModel, state: dict[str, Tensor]) -> None:
    """Load `state` (from `lora_state` of a model with the same LoRA setup) into `model`, strictly."""
    params = _trained_adapter_parameters(model)
    missing = sorted(params.keys() - state.keys())
    unexpected = sorted(state.keys() - params.keys())
    if missing or unexpected:
        raise FedgenError(
            f"adapter state does not match the model's LoRA setup: {len(missing)} missing "
            f"(e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]})"
        )
    for name, param in params.items():
        if state[name].shape != param.shape:
            raise FedgenError(
                f"adapter tensor {name} has shape {tuple(state[name].shape)}, the model expects {tuple(param.shape)}"
            )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])


def load_saved_adapter_state(model: PeftModel, tensors: dict[str, Tensor]) -> None:
    """Set every trained adapter tensor of ``model`` from ``tensors``, an adapter file's content
    (PEFT's saved names, without the adapter name), strictly: each tensor present, no other."""
    expected = set(_trained_adapter_parameters(model))
    try:
        result = set_peft_model_state_dict(model, tensors)
    except RuntimeError as err:  # a shape that does not fit
        raise FedgenError(f"the adapter does not fit the model's LoRA setup: {_one_line(err)}") from None
    missing = expected & set(result.missing_keys)
    if missing or result.unexpected_keys:
        raise FedgenError(
            f"the adapter does not match the model's LoRA setup: {len(missing)} tensors missing "
            f"(e.g. {sorted(missing)[:1]}), {len(result.unexpected_keys)} unexpected"
        )


# --- prompts and data -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassPrompts:
    """The token ids every note of a class starts from, and the token that ends a note."""

    prompts: dict[str, list[int]]
    end_id: int


def _token_ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def class_prompts(tokenizer: PreTrainedTokenizerFast, config: TextConfig, labels: Sequence[str]) -> ClassPrompts:
    """Each label's prompt: chat turns when the tokenizer has a chat template, else the template.

    With a chat template the end of a note is the first token the template writes after the
    assistant's message (``<|im_end|>`` for SmolLM2, ``<|eot_id|>`` for Llama 3).
    """
    if not tokenizer.chat_template:
        return ClassPrompts(
            {
                label: [tokenizer.bos_token_id, *_token_ids(tokenizer, prompt_prefix(config.prompt_template, label))]
                for label in labels
            },
            tokenizer.eos_token_id,
        )

    def turns(label: str) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": config.system_prompt},
            {"role": "user", "content": config.user_prompt.replace(LABEL_SLOT, label)},
        ]

    def rendered(label: str, **options) -> str:
        return tokenizer.apply_chat_template(turns(label) + options.pop("note", []), tokenize=False, **options)

    prompts = {label: _token_ids(tokenizer, rendered(label, add_generation_prompt=True)) for label in labels}
    after_note = rendered("", note=[{"role": "assistant", "content": NOTE_MARK}]).split(NOTE_MARK, 1)[1]
    if not after_note:
        raise FedgenError(
            "the base model's chat template writes nothing after the assistant's message: no end-of-turn token"
        )
    return ClassPrompts(prompts, _token_ids(tokenizer, after_note)[0])


def validate_template(template: str) -> None:
    """A template holds {label} once, then ends with {text}: the note is everything generated."""
    if template.count(LABEL_SLOT) != 1 or template.count(TEXT_SLOT) != 1:
        raise FedgenError(f"prompt template {template!r} needs exactly one {LABEL_SLOT} and one {TEXT_SLOT} slot")
    if not template.endswith(TEXT_SLOT):
        raise FedgenError(f"prompt template {template!r} must end with the {TEXT_SLOT} slot")


def prompt_prefix(template: str, label: str) -> str:
    """The template up to its {text} slot, with the label filled in: what generation starts from."""
    validate_template(template)
    return template.removesuffix(TEXT_SLOT).replace(LABEL_SLOT, label)


def render_example(template: str, *, label: str, text: str) -> str:
    return prompt_prefix(template, label) + text


def encode_examples(
    tokenizer: PreTrainedTokenizerFast,
    records: Sequence[tuple[str, str]],
    *,
    prompts: ClassPrompts,
    max_length: int,
) -> TensorDataset:
    """Encode (label, text) records as ``prompt(label) text end``, right-padded to the longest.

    Returns TensorDataset(input_ids, attention_mask, loss_mask), all int64 [N, T]. loss_mask is
    1 on the note's tokens and the end token only. An empty note or an example longer than
    `max_length` tokens is an error: truncating would silently train on cut notes.
    """
    if not records:
        raise FedgenError("no text records to encode")
    sequences, note_lengths = [], []
    for index, (label, text) in enumerate(records):
        if not text.strip():
            raise FedgenError(f"text record {index} (label {label!r}) is empty")
        note = _token_ids(tokenizer, text) + [prompts.end_id]
        sequence = [*prompts.prompts[label], *note]
        if len(sequence) > max_length:
            raise FedgenError(
                f"text record {index} is {len(sequence)} tokens with its prompt, "
                f"longer than text.max_length {max_length}"
            )
        sequences.append(sequence)
        note_lengths.append(len(note))
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    loss_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (sequence, note_length) in enumerate(zip(sequences, note_lengths)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
        loss_mask[row, len(sequence) - note_length : len(sequence)] = 1
    return TensorDataset(input_ids, attention_mask, loss_mask)


# --- frozen lower layers -------------------------------------------------------------------------
#
# With LoRA on the upper decoder layers only, everything below the lowest adapted layer is a fixed
# function of a note's tokens: its output can be computed once per note and reused at every step,
# epoch and round (the DP guarantee is unchanged; it covers what the adapters learn from). A step
# then runs the adapted layers alone, forward and backward.


def _causal_lm(model: nn.Module) -> PreTrainedModel:
    model = getattr(model, "_module", model)  # an Opacus GradSampleModule wraps the model
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _backbone(model: nn.Module) -> nn.Module:
    causal_lm = _causal_lm(model)
    return getattr(causal_lm, causal_lm.base_model_prefix)


def first_adapted_layer(model: nn.Module) -> int:
    """The index of the lowest decoder layer with a parameter that trains; 0 when the backbone
    has no ``layers`` list (nothing below it is then frozen for certain)."""
    layers = getattr(_backbone(model), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        return 0
    trains = [i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())]
    return trains[0] if trains else len(layers)


@contextmanager
def _only_layers(backbone: nn.Module, layers: slice, *, final_norm: bool = True) -> Iterator[None]:
    """Run ``backbone`` through ``layers`` of its decoder layers only (and without its final norm)."""
    all_layers, norm = backbone.layers, backbone.norm
    backbone.layers = nn.ModuleList(list(all_layers)[layers])
    if not final_norm:
        backbone.norm = nn.Identity()
    try:
        yield
    finally:
        backbone.layers, backbone.norm = all_layers, norm


@torch.no_grad()
def frozen_states(
    model: nn.Module, dataset: TensorDataset, *, batch_size: int = 16, advance: Callable[[int], None] | None = None
) -> Tensor:
    """The output of the decoder layers below the lowest adapted one for every example of
    ``dataset`` (``encode_examples``), [N, T, hidden], zero at padding positions: what
    ``token_logprobs`` takes as ``lower_states`` in place of running those layers again.
    The examples run in order of length, each batch cut to its longest row (right padding under
    causal attention changes nothing before it); ``advance(n)`` is called after each batch of
    ``n`` examples."""
    backbone, first = _backbone(model), first_adapted_layer(model)
    input_ids, attention_mask = dataset.tensors[:2]
    lengths = attention_mask.sum(dim=1)
    states = None
    with _only_layers(backbone, slice(0, first), final_norm=False):
        for rows in lengths.argsort().split(batch_size):
            width = int(lengths[rows].max())
            mask = attention_mask[rows, :width]
            hidden = backbone(input_ids=input_ids[rows, :width], attention_mask=mask).last_hidden_state
            if states is None:
                states = hidden.new_zeros((*input_ids.shape, hidden.shape[-1]))
            states[rows, :width] = hidden * mask[..., None].to(hidden.dtype)
            if advance is not None:
                advance(len(rows))
    return states


def _last_hidden_state(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, lower_states: Tensor | None
) -> Tensor:
    backbone = _backbone(model)
    if lower_states is None:
        return backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    first = first_adapted_layer(model)
    with _only_layers(backbone, slice(first, None)):
        return backbone(inputs_embeds=lower_states, attention_mask=attention_mask).last_hidden_state


# --- scoring --------------------------------------------------------------------------------------


def token_logprobs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor, lower_states: Tensor | None = None
) -> Tensor:
    """log p(token t | tokens before t) at the positions under `loss_mask`, 0 elsewhere; [B, T].

    Right padding is cut to the batch's longest row first (dynamic padding), and the output
    layer runs only where a note token is predicted: each row's note positions are gathered
    into [B, longest note, hidden], which keeps the batch dimension per-example gradients need.
    A loss mask must be one run of positions after the first (as `encode_examples` makes it).
    ``lower_states`` (``frozen_states`` of these rows) stand in for the frozen lower layers.
    """
    shape, width = input_ids.shape, int(attention_mask.sum(dim=1).max())
    input_ids, attention_mask, loss_mask = input_ids[:, :width], attention_mask[:, :width], loss_mask[:, :width]
    if lower_states is not None:
        lower_states = lower_states[:, :width]
    causal_lm = _causal_lm(model)
    hidden = _last_hidden_state(model, input_ids, attention_mask, lower_states)
    lengths = loss_mask.sum(dim=1)
    starts = loss_mask.argmax(dim=1)  # first note position of each row
    offsets = torch.arange(int(lengths.max()), device=input_ids.device)
    targets = (starts[:, None] + offsets).clamp(max=width - 1)  # [B, L] positions predicted
    valid = offsets < lengths[:, None]
    assert bool((starts > 0).all()), "a note must follow a prompt (position 0 is never predicted)"
    states = hidden.gather(1, (targets - 1)[..., None].expand(-1, -1, hidden.shape[-1]))
    logits = causal_lm.get_output_embeddings()(states).float()
    picked = torch.log_softmax(logits, dim=-1).gather(-1, input_ids.gather(1, targets)[..., None]).squeeze(-1)
    return picked.new_zeros(shape).scatter_add(1, targets, picked * valid)


def sequence_loss(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor, lower_states: Tensor | None = None
) -> Tensor:
    """Per-example mean negative log-likelihood of the tokens under `loss_mask`, shape [B]."""
    logprobs = token_logprobs(model, input_ids, attention_mask, loss_mask, lower_states)
    return -logprobs.sum(dim=1) / loss_mask.sum(dim=1).clamp(min=1).to(logprobs.dtype)


# --- generation -----------------------------------------------------------------------------------


def _until_eos(tokens: list[int], eos_token_id: int) -> list[int]:
    return tokens[: tokens.index(eos_token_id)] if eos_token_id in tokens else tokens


class _EachStep(StoppingCriteria):
    """Calls ``step()`` after every decoding step of a batch; never stops one."""

    def __init__(self, step: Callable[[], None]):
        self.step = step

    def __call__(self, input_ids: Tensor, scores: Tensor | None, **kwargs) -> Tensor:
        self.step()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@contextmanager
def _contiguous_head_input(model: nn.Module) -> Iterator[None]:
    """Hand the output layer a contiguous input. Generation computes logits for the prompt's last
    position only, a strided slice of the hidden states; PyTorch's CPU bf16 linear layer on such
    a 3-D slice copies its weight once per row (49k x 576 x 100 rows: 5 GB for 100 notes)."""
    head = _causal_lm(model).get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def decoding_steps(n_texts: int, *, batch_size: int, max_new_tokens: int) -> int:
    """The most decoding steps ``generate_texts`` takes for ``n_texts``: what its progress counts to."""
    return math.ceil(n_texts / batch_size) * max_new_tokens


def _left_padded(rows: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Token rows left-padded to the longest, and the attention mask that hides the padding."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row, device=device)
        attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask


@torch.no_grad()
def generate_texts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    *,
    prompts: ClassPrompts,
    labels: Sequence[str],
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 16,
    progress: ProgressFn | None = None,
) -> list[str]:
    """Sample one note per entry of `labels`, in that order; the same seed gives the same notes.

    Each note is what the model writes after its class's prompt, up to its end token (or
    `max_new_tokens`). Notes of different classes share a batch: the prompts are left-padded,
    the attention mask hides the padding (position ids follow the mask), and the batch is
    decoded together with the key-value cache, so a larger batch costs less per note.
    ``progress(done, total)`` counts decoding steps, ``max_new_tokens`` a batch (a batch whose
    notes all ended early jumps to its end), so a log shows a long batch advancing.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    texts: list[str] = []
    total_steps = decoding_steps(len(labels), batch_size=batch_size, max_new_tokens=max_new_tokens)
    steps = 0

    def step() -> None:
        nonlocal steps
        steps += 1
        if progress is not None:
            progress(steps, total_steps)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), _contiguous_head_input(model):
        torch.manual_seed(seed)
        for start in range(0, len(labels), batch_size):
            input_ids, attention_mask = _left_padded(
                [prompts.prompts[label] for label in labels[start : start + batch_size]], tokenizer.pad_token_id, device
            )
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=0,  # off (transformers' default is 50): sampling is temperature + top-p only
                max_new_tokens=max_new_tokens,
                eos_token_id=prompts.end_id,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
                stopping_criteria=StoppingCriteriaList([_EachStep(step)]),
            )
            for row in output[:, input_ids.shape[1] :].tolist():
                note = _until_eos(row, prompts.end_id)
                texts.append(tokenizer.decode(note, skip_special_tokens=True).strip())
            steps = (start // batch_size + 1) * max_new_tokens
            if progress is not None:
                progress(steps, total_steps)
    model.train(was_training)
    return texts


# --- adapter files --------------------------------------------------------------------------------


def save_adapter(model: PeftModel, directory: str | Path) -> Path:
    """Write the adapter in PEFT's format (adapter_config.json + adapter_model.safetensors).

    Loadable with `load_adapter` or `PeftModel.from_pretrained(base, directory)`. An existing
    directory is replaced only once the new files are complete.
    """
    assert isinstance(model, PeftModel), f"expected a PeftModel (unwrap Opacus), got {type(model).__name__}"
    directory = Path(directory)
    with atomic_dir(directory) as scratch:
        # False: the embeddings are never adapted, and "auto" would look the base up on the hub.
        model.save_pretrained(scratch, save_embedding_layers=False)
        (scratch / PEFT_MODEL_CARD).unlink(missing_ok=True)  # a template naming this machine's paths
    return directory


def load_adapter(base_model: PreTrainedModel, directory: str | Path) -> PeftModel:
    """Attach a saved adapter to `base_model` for inference (all parameters frozen).

    PEFT wraps `base_model` in place: after an error, load a fresh base before trying again.
    """
    directory = Path(directory)
    missing = [name for name in ADAPTER_FILES if not (directory / name).is_file()]
    if missing:
        raise FedgenError(f"text adapter {directory} is missing {', '.join(missing)}")
    try:
        return PeftModel.from_pretrained(base_model, directory, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        raise FedgenError(f"text adapter {directory} cannot be loaded: {_one_line(err)}") from None
