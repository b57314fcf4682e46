"""The text section of the end-to-end test runs: the tiny random Llama, small enough that a DP
round and an audit take seconds; runs override max_length and max_new_tokens for their notes."""

from __future__ import annotations

TINY_TEXT = {
    "base_model": "tiny-random-llama",
    "target_modules": ["q_proj", "v_proj", "lm_head"],  # a random base learns only through lm_head
    "dtype": "float32",
    "tiny_hidden_size": 16,
    "tiny_layers": 1,
    "tiny_heads": 2,
    "lora_rank": 4,
    "batch_size": 8,
}
