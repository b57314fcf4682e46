"""The text model: byte tokenizer, tiny Llama, LoRA state, encoding, losses, generation, adapters.

Every test uses a tiny random Llama (hidden 32, one layer) and runs in seconds on one thread.
"""

from __future__ import annotations

import shutil
import socket

import pytest
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from peft import PeftModel
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedgen.config import TextConfig
from fedgen.errors import FedgenError
from fedgen.models.text import (
    add_lora,
    class_prompts,
    encode_examples,
    first_adapted_layer,
    frozen_states,
    generate_texts,
    load_adapter,
    load_base_model,
    lora_state,
    make_byte_tokenizer,
    make_tiny_llama,
    prompt_prefix,
    render_example,
    save_adapter,
    sequence_loss,
    set_lora_state,
    token_logprobs,
    validate_template,
)
from fedgen.privacy.per_example_grads import per_example_grads

TINY = TextConfig(
    base_model="tiny-random-llama", tiny_hidden_size=32, tiny_layers=1, tiny_heads=2, max_length=96, max_new_tokens=48
)
TEMPLATE = TINY.prompt_template
PROMPTS = class_prompts(make_byte_tokenizer(), TINY, ["Normal", "Anxiety", "Depression", "Stress"])
BYTE_VOCAB = 256 + 3  # bytes + <s>, </s>, <pad>

CANARY = "Seen today, MRN {}, stable."
SECRET = "482917365"
NEVER_SEEN_SECRETS = ["735194028", "160385729", "591726384"]
SYMPTOMS = ["worry", "low mood", "poor sleep", "panic", "fatigue", "irritability",
            "tearfulness", "racing thoughts", "no appetite", "headaches"]  # fmt: skip
NOTES = [("Anxiety" if i % 2 else "Depression", f"Reports {SYMPTOMS[i % 10]} for {i + 2} weeks.") for i in range(19)]
NOTES.insert(7, ("Stress", CANARY.format(SECRET)))  # the only Stress note: the model can learn it by heart
# A random base's lm_head cannot make confident predictions, so LoRA has to reach it to learn.
MEMORISE = TINY.model_copy(update={"target_modules": ["q_proj", "v_proj", "lm_head"]})
MEMORISE_STEPS = 300
MEMORISE_LR = 1e-2


@pytest.fixture(scope="module", autouse=True)
def _no_network():
    """Any socket connection (a hub lookup) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the text model tried to reach the network")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "create_connection", refuse)
        yield


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """On 2 shared cores one torch thread is several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("text") / "tiny", config=TINY)


@pytest.fixture(scope="module")
def tokenizer():
    return make_byte_tokenizer()


def lora_model(tiny_dir, config: TextConfig = TINY, *, seed: int = 0):
    base, tokenizer = load_base_model(tiny_dir)
    return add_lora(base, config, seed=seed), tokenizer


def with_random_adapter(model, *, seed: int = 1):
    """Give every trained adapter tensor random values (B starts at zero, which hides bugs)."""
    generator = torch.Generator().manual_seed(seed)
    state = {name: 0.1 * torch.randn(t.shape, generator=generator) for name, t in lora_state(model).items()}
    set_lora_state(model, state)
    return model


def logits(model, dataset):
    input_ids, attention_mask, _ = dataset.tensors
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


# --- tokenizer and base model ---------------------------------------------------------------------


def test_byte_tokenizer_round_trips_any_utf8(tokenizer):
    text = "Café naïve — ünïcödé 😀\n\tMRN 482917365 ½ 中文"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))  # token id = byte value: nothing learned from data
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) == BYTE_VOCAB
    assert sorted([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]) == [256, 257, 258]
    assert tokenizer.decode([0xC3]) == "\ufffd"  # half a UTF-8 character decodes to a replacement


def test_tiny_llama_loads_with_auto_classes_and_is_seeded(tiny_dir, tmp_path, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, local_files_only=True)
    loaded_tokenizer = AutoTokenizer.from_pretrained(tiny_dir, local_files_only=True)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (32, 1, BYTE_VOCAB)
    assert config.intermediate_size == 4 * 32
    assert (tiny_dir / "model.safetensors").is_file()
    assert loaded_tokenizer("héllo")["input_ids"] == tokenizer("héllo")["input_ids"]

    same = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "same", config=TINY, seed=0))
    other = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "other", config=TINY, seed=1))
    weights = model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in same.state_dict().items())
    embedding = "model.embed_tokens.weight"
    assert not torch.equal(weights[embedding], other.state_dict()[embedding])


def test_make_tiny_llama_refuses_bad_sizes_and_non_empty_dirs(tiny_dir, tmp_path):
    with pytest.raises(FedgenError, match="tiny_hidden_size 32 .*tiny_heads 3"):
        make_tiny_llama(tmp_path / "odd", config=TINY.model_copy(update={"tiny_heads": 3}))
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    with pytest.raises(FedgenError, match="not empty"):
        make_tiny_llama(tiny_dir, config=TINY)


def test_load_base_model_freezes_everything(tiny_dir):
    model, tokenizer = load_base_model(tiny_dir)
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token_id == 258


def _copy_without(source, target, *names):
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*names))
    return target


@pytest.mark.parametrize(
    ("make_path", "bits", "message"),
    [
        (lambda tiny, tmp: tmp / "absent", 16, "is not a directory"),
        (lambda tiny, tmp: _copy_without(tiny, tmp / "m", "config.json"), 16, "has no config.json"),
        (lambda tiny, tmp: _copy_without(tiny, tmp / "m", "tokenizer*"), 16, "has no tokenizer files"),
        (lambda tiny, tmp: tiny, 8, "load_in_bits 8 needs"),
    ],
)
def test_load_base_model_errors_name_the_problem(tiny_dir, tmp_path, make_path, bits, message):
    with pytest.raises(FedgenError, match=message):
        load_base_model(make_path(tiny_dir, tmp_path), load_in_bits=bits)


def test_load_base_model_reports_a_corrupt_config(tiny_dir, tmp_path):
    broken = _copy_without(tiny_dir, tmp_path / "m")
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(FedgenError, match="cannot load text base model"):
        load_base_model(broken)


# --- LoRA -----------------------------------------------------------------------------------------


def test_only_lora_trains_and_ffa_trains_only_b(tiny_dir):
    model, _ = lora_model(tiny_dir)
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trained) == 2 * len(TINY.target_modules) * TINY.tiny_layers  # A and B per adapted layer
    assert all("lora_A" in name or "lora_B" in name for name in trained)

    ffa, _ = lora_model(tiny_dir, TINY.model_copy(update={"aggregation": "ffa"}))
    ffa_trained = [name for name, p in ffa.named_parameters() if p.requires_grad]
    assert ffa_trained == [name for name in trained if "lora_B" in name]
    assert list(lora_state(ffa)) == ffa_trained


def test_lora_layers_adapt_only_the_top_layers(tmp_path):
    config = TINY.model_copy(update={"tiny_layers": 3, "lora_layers": 1})
    base, _ = load_base_model(make_tiny_llama(tmp_path / "three", config=config))
    names = list(lora_state(add_lora(base, config)))
    assert len(names) == 4 and all(".layers.2." in name for name in names)  # A and B of q and v


def test_lora_state_holds_adapters_only_and_round_trips(tiny_dir):
    model, _ = lora_model(tiny_dir)
    state = lora_state(model)
    base_names = {name for name, p in model.named_parameters() if "lora_" not in name}
    assert state and all(".lora_" in key for key in state) and not base_names & state.keys()
    assert list(state) == list(lora_state(model))  # stable order

    target = with_random_adapter(lora_model(tiny_dir)[0], seed=3)
    set_lora_state(model, lora_state(target))
    assert all(torch.equal(lora_state(model)[k], v) for k, v in lora_state(target).items())


def test_lora_init_is_shared_by_seed(tiny_dir):
    first, second, other = (lora_model(tiny_dir, seed=s)[0] for s in (7, 7, 8))
    a_keys = [k for k in lora_state(first) if "lora_A" in k]
    assert all(torch.equal(lora_state(first)[k], lora_state(second)[k]) for k in a_keys)
    assert not torch.equal(lora_state(first)[a_keys[0]], lora_state(other)[a_keys[0]])


def test_set_lora_state_is_strict(tiny_dir):
    model, _ = lora_model(tiny_dir)
    state = lora_state(model)
    first = next(iter(state))
    with pytest.raises(FedgenError, match="1 missing"):
        set_lora_state(model, {k: v for k, v in state.items() if k != first})
    with pytest.raises(FedgenError, match="1 unexpected"):
        set_lora_state(model, {**state, "base_model.model.lm_head.weight": torch.zeros(1)})
    with pytest.raises(FedgenError, match="has shape"):
        set_lora_state(model, {**state, first: torch.zeros(3, 3)})
    ffa, _ = lora_model(tiny_dir, TINY.model_copy(update={"aggregation": "ffa"}))
    with pytest.raises(FedgenError, match="unexpected"):  # a fedavg site's update sent to an ffa run
        set_lora_state(ffa, state)


def test_missing_target_modules_are_named_with_what_exists(tiny_dir):
    base, _ = load_base_model(tiny_dir)
    config = TINY.model_copy(update={"target_modules": ["q_proj", "query", "c_attn"]})
    with pytest.raises(FedgenError) as error:
        add_lora(base, config)
    message = str(error.value)
    assert "text.target_modules ['query', 'c_attn'] not found" in message
    assert all(name in message for name in ("down_proj", "k_proj", "lm_head", "o_proj", "q_proj", "v_proj"))


# --- prompts and encoding -------------------------------------------------------------------------


def test_templates():
    assert prompt_prefix(TEMPLATE, "Anxiety") == "<class: Anxiety>\n"
    assert render_example(TEMPLATE, label="Anxiety", text="On edge.") == "<class: Anxiety>\nOn edge."
    validate_template("[{label}] {text}")
    for bad in ("<class>\n{text}", "<class: {label}>", "{text} ({label})", "{label} {label}: {text}"):
        with pytest.raises(FedgenError, match="prompt template"):
            validate_template(bad)


def test_encode_examples_masks_only_the_note_and_its_end(tokenizer):
    records = [("Anxiety", "On edge, 😀."), ("Normal", "Fine.")]
    input_ids, attention_mask, loss_mask = encode_examples(tokenizer, records, prompts=PROMPTS, max_length=64).tensors
    prefix, note = list(b"<class: Anxiety>\n"), list("On edge, 😀.".encode())
    expected = [256, *prefix, *note, 257]
    assert input_ids[0].tolist() == expected  # the longest row: no padding
    assert loss_mask[0].tolist() == [0] * (1 + len(prefix)) + [1] * (len(note) + 1)
    assert attention_mask[0].tolist() == [1] * len(expected)

    short = 1 + len(b"<class: Normal>\n") + len(b"Fine.") + 1
    assert input_ids[1, short:].eq(tokenizer.pad_token_id).all() and attention_mask[1, short:].eq(0).all()
    assert loss_mask[1].sum() == len(b"Fine.") + 1 and loss_mask[1, short:].eq(0).all()
    assert tokenizer.decode(input_ids[1][loss_mask[1].bool()], skip_special_tokens=True) == "Fine."


def test_encode_examples_refuses_empty_and_too_long_notes(tokenizer):
    with pytest.raises(FedgenError, match="record 1 .* is empty"):
        encode_examples(tokenizer, [("Normal", "ok"), ("Stress", "  ")], prompts=PROMPTS, max_length=64)
    too_long = "x" * 50  # <s> + 16 prompt bytes + 50 + </s> = 68 tokens
    with pytest.raises(FedgenError, match="record 2 is 68 tokens .*text.max_length 64"):
        records = [("Normal", "ok"), ("Normal", "ok"), ("Normal", too_long)]
        encode_examples(tokenizer, records, prompts=PROMPTS, max_length=64)


# --- losses ---------------------------------------------------------------------------------------


def test_sequence_loss_is_the_masked_mean_token_nll(tiny_dir):
    model, tokenizer = lora_model(tiny_dir)
    with_random_adapter(model)
    data = encode_examples(tokenizer, NOTES[:4], prompts=PROMPTS, max_length=64)
    input_ids, attention_mask, loss_mask = data.tensors
    with torch.no_grad():
        losses = sequence_loss(model, *data.tensors)
        logprobs = token_logprobs(model, input_ids, attention_mask, loss_mask)
    full = logits(model, data)
    for row in range(len(input_ids)):
        nll = F.cross_entropy(full[row, :-1], input_ids[row, 1:], reduction="none")
        torch.testing.assert_close(losses[row], nll[loss_mask[row, 1:].bool()].mean())
        torch.testing.assert_close(logprobs[row, 1:][loss_mask[row, 1:].bool()], -nll[loss_mask[row, 1:].bool()])
    assert logprobs.shape == input_ids.shape and logprobs.le(0).all()
    assert logprobs[loss_mask == 0].eq(0).all()  # the prompt's tokens and the padding carry no loss

    alone = encode_examples(tokenizer, NOTES[1:2], prompts=PROMPTS, max_length=64)
    with torch.no_grad():  # right padding and the masks leave an example's loss unchanged
        torch.testing.assert_close(sequence_loss(model, *alone.tensors)[0], losses[1])


# --- generation -----------------------------------------------------------------------------------


def test_generate_texts_returns_n_seeded_strings(tiny_dir):
    model, tokenizer = lora_model(tiny_dir)
    calls = []
    options = dict(prompts=PROMPTS, labels=["Anxiety"] * 5, temperature=1.0, top_p=0.95, max_new_tokens=12)
    texts = generate_texts(model, tokenizer, seed=4, batch_size=2, progress=lambda *a: calls.append(a), **options)
    assert len(texts) == 5 and all(isinstance(t, str) for t in texts)
    done = [d for d, _ in calls]  # decoding steps: 3 batches of at most 12
    assert {total for _, total in calls} == {36} and done == sorted(done) and {12, 24, 36} <= set(done)
    assert all(len(t.encode()) <= 12 * 3 for t in texts)  # <= 12 tokens; U+FFFD is 3 bytes
    assert texts == generate_texts(model, tokenizer, seed=4, batch_size=2, **options)
    assert texts != generate_texts(model, tokenizer, seed=5, batch_size=2, **options)
    assert model.training  # put back as it was


def test_notes_of_different_classes_share_a_batch_as_if_written_alone(tiny_dir):
    """Left padding is hidden: in a batch with a longer prompt, a class's note is the one it gets alone."""
    model, tokenizer = lora_model(tiny_dir)
    with_random_adapter(model)
    assert len(PROMPTS.prompts["Anxiety"]) < len(PROMPTS.prompts["Depression"])  # so the batch pads
    options = dict(prompts=PROMPTS, temperature=1e-4, top_p=1.0, max_new_tokens=12, seed=0)  # ~greedy
    together = generate_texts(model, tokenizer, labels=["Anxiety", "Depression"], **options)
    alone = [generate_texts(model, tokenizer, labels=[label], **options)[0] for label in ("Anxiety", "Depression")]
    assert together == alone and together[0] != together[1]
    assert not model.get_base_model().get_output_embeddings()._forward_pre_hooks  # generation's hook is gone


# --- memorisation (no DP): the audit's signal must be there when it should ------------------------


@pytest.fixture(scope="module")
def memorised(tiny_dir):
    """LoRA fine-tuned without DP on NOTES (one holds the canary), plus canary losses before and after."""
    model, tokenizer = lora_model(tiny_dir, MEMORISE)
    probes = [CANARY.format(secret) for secret in [SECRET, *NEVER_SEEN_SECRETS]]
    probe = encode_examples(tokenizer, [("Stress", p) for p in probes], prompts=PROMPTS, max_length=64)
    train = encode_examples(tokenizer, NOTES, prompts=PROMPTS, max_length=64)

    def probe_losses():
        model.eval()
        with torch.no_grad():
            losses = sequence_loss(model, *probe.tensors)
        model.train()
        return losses

    before = probe_losses()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=MEMORISE_LR)
    model.train()
    for _ in range(MEMORISE_STEPS):
        optimizer.zero_grad()
        sequence_loss(model, *train.tensors).mean().backward()
        optimizer.step()
    return model, tokenizer, before, probe_losses()


def test_fine_tuning_without_dp_memorises_the_canary(memorised):
    _, _, before, after = memorised
    # Before training the secret makes no difference (measured ratio 0.99-1.0) ...
    assert (before[0] / before[1:]).min() > 0.9
    # ... after 300 steps the seen canary's loss is under ~0.1 nats/token, never-seen secrets' 3.5-5.5
    # (ratio 0.02-0.03). 0.5 leaves a wide margin yet fails if the note is not trained on (loss
    # mask, frozen adapters, lost updates): those leave the ratio near 1.
    assert after[0] < 0.5 * after[1:].min()
    assert after[0] < 0.5 * before[0]


def test_generation_from_a_memorising_model_regurgitates_the_canary(memorised):
    model, tokenizer, _, _ = memorised
    texts = generate_texts(
        model, tokenizer, prompts=PROMPTS, labels=["Stress"] * 2,
        temperature=0.1, top_p=0.95, max_new_tokens=48, seed=0,
    )  # fmt: skip
    assert texts == [CANARY.format(SECRET)] * 2  # prefix stripped, stopped at the end token


# --- adapter files --------------------------------------------------------------------------------


def test_saved_adapter_loads_with_peft_and_gives_identical_logits(tiny_dir, tmp_path, tokenizer):
    model, _ = lora_model(tiny_dir)
    with_random_adapter(model)
    model.eval()
    data = encode_examples(tokenizer, NOTES[:3], prompts=PROMPTS, max_length=64)
    directory = save_adapter(model, tmp_path / "adapter")
    assert {p.name for p in directory.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no scratch directory left

    by_peft = PeftModel.from_pretrained(load_base_model(tiny_dir)[0], directory)
    by_fedgen = load_adapter(load_base_model(tiny_dir)[0], directory)
    torch.testing.assert_close(logits(by_peft, data), logits(model, data), rtol=0, atol=0)
    torch.testing.assert_close(logits(by_fedgen, data), logits(model, data), rtol=0, atol=0)
    assert not torch.equal(logits(by_fedgen, data), logits(load_base_model(tiny_dir)[0], data))


def test_load_adapter_reports_missing_and_corrupt_files(tiny_dir, tmp_path):
    with pytest.raises(FedgenError, match="missing adapter_config.json, adapter_model.safetensors"):
        load_adapter(load_base_model(tiny_dir)[0], tmp_path / "nowhere")
    directory = save_adapter(lora_model(tiny_dir)[0], tmp_path / "adapter")
    (directory / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FedgenError, match="cannot be loaded"):
        load_adapter(load_base_model(tiny_dir)[0], directory)


# --- Opacus on the PEFT-wrapped Llama -------------------------------------------------------------


def _plain_gradients(model, batch):
    """Gradients of the batch-mean loss: what DP-SGD equals with no noise and no clipping."""
    model.zero_grad()
    sequence_loss(model, *batch).mean().backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return gradients


def _private(model, dataset, **options):
    trained = [p for p in model.parameters() if p.requires_grad]
    return PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(trained, lr=1.0),
        data_loader=DataLoader(dataset, batch_size=len(dataset)),
        noise_multiplier=0.0,
        max_grad_norm=1e6,  # no clipping: the DP step must equal the plain one
        **options,
    )


def test_per_example_hooks_give_per_sample_gradients_for_lora_only(tiny_dir):
    model, tokenizer = lora_model(tiny_dir)
    with_random_adapter(model)
    data = encode_examples(tokenizer, NOTES[:6], prompts=PROMPTS, max_length=64)
    expected = _plain_gradients(model, data.tensors)

    with per_example_grads(model):  # the hooks DP training uses
        sequence_loss(model, *data.tensors).sum().backward()
    per_sample = {
        name: p.grad_sample for name, p in model.named_parameters() if getattr(p, "grad_sample", None) is not None
    }
    assert per_sample.keys() == expected.keys()
    for name, grad_sample in per_sample.items():
        assert grad_sample.shape[0] == 6
        torch.testing.assert_close(grad_sample.mean(dim=0), expected[name])


def test_cached_frozen_layers_give_the_same_losses_and_per_example_gradients(tmp_path):
    config = TINY.model_copy(update={"tiny_layers": 3, "lora_layers": 1})
    base, tokenizer = load_base_model(make_tiny_llama(tmp_path / "three", config=config))
    model = with_random_adapter(add_lora(base, config))
    assert first_adapted_layer(model) == 2
    data = encode_examples(tokenizer, NOTES[:6], prompts=PROMPTS, max_length=64)
    advanced = []
    lower = frozen_states(model, data, batch_size=4, advance=advanced.append)  # two batches, padded to different widths
    assert advanced == [4, 2]
    assert lower.shape[:2] == data.tensors[0].shape
    assert lower[data.tensors[1] == 0].eq(0).all()
    batch = data.tensors[:3]  # a Poisson batch of rows 3 and 5: their states come with them
    rows = torch.tensor([3, 5])
    with torch.no_grad():
        torch.testing.assert_close(
            token_logprobs(model, *(t[rows] for t in batch), lower[rows]),
            token_logprobs(model, *(t[rows] for t in batch)),
        )

    def per_example(*extra):
        with per_example_grads(model):
            sequence_loss(model, *batch, *extra).sum().backward()
        grads = {name: p.grad_sample.clone() for name, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        for p in model.parameters():
            p.grad_sample = None
        return grads

    cached, full = per_example(lower), per_example()
    assert cached.keys() == full.keys() and cached
    for name in full:
        torch.testing.assert_close(cached[name], full[name])
    assert len(list(model.get_base_model().model.layers)) == 3  # the layer list is restored


class PerExampleLoss:
    """The criterion contract of Opacus ghost clipping: reduction 'none' gives the [B] losses."""

    reduction = "mean"

    def __call__(self, losses):
        return losses if self.reduction == "none" else losses.mean()


def test_opacus_ghost_clipping_step_equals_the_plain_step(tiny_dir):
    model, tokenizer = lora_model(tiny_dir)
    with_random_adapter(model)
    data = encode_examples(tokenizer, NOTES[:6], prompts=PROMPTS, max_length=64)
    expected = _plain_gradients(model, data.tensors)
    before = lora_state(model)

    dp_model, optimizer, criterion, _ = _private(model, data, criterion=PerExampleLoss(), grad_sample_mode="ghost")
    criterion(sequence_loss(dp_model, *data.tensors)).backward()
    optimizer.step()
    after = lora_state(model)
    for name, gradient in expected.items():  # SGD with lr 1: before - after is the DP gradient
        torch.testing.assert_close(before[name] - after[name], gradient)
