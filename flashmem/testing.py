"""Tiny random-init models (Llama, Qwen2, Qwen3) for tests and benchmarks; nothing is downloaded."""

from __future__ import annotations

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
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **overrides,
):
    """A random-init causal LM of ``family`` in eval mode, its weights drawn after
    ``torch.manual_seed(seed)`` on ``device`` (default: torch's), then cast to ``dtype`` (if given).

    ``hidden_size = q_heads * head_dim`` and ``intermediate_size = 2 * hidden_size`` unless
    ``overrides`` say otherwise; every other keyword goes to the family's config class."""
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=vocab,
        hidden_size=q_heads * head_dim,
        intermediate_size=2 * q_heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=q_heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
    )
    fields.update(overrides)
    config = config_cls(**fields)
    if device is None:
        model = model_cls(config)
    else:
        with torch.device(device):
            model = model_cls(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
