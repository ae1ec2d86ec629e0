"""Tiny random-init models (Llama, Qwen2, Qwen3) for tests and benchmarks; nothing is downloaded."""

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def tiny_model(
    family: str = "llama",
    *,
    layers: int = 2,
    q_heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    vocab: int = 128,
    seed: int = 0,
    max_positions: int = 4096,
    **overrides,
):
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(
        vocab_size=vocab,
        hidden_size=q_heads * head_dim,
        intermediate_size=2 * q_heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=q_heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        **overrides,
    )
    return model_cls(config).eval()
