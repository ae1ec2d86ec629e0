"""Tiny random-init models (Llama, Mistral, Qwen2, Qwen3, Phi-3, OLMo-2, Granite, Gemma; Cohere and
StableLM, which flashmem refuses) and the full-attention reference, for tests and
benchmarks; nothing is downloaded.

* :func:`tiny_model`: the one factory of random-init models (tiny by default; any shape on request).
* :class:`DenseDecoder`: full attention the plain Hugging Face way (the model's own forward over a
  ``DynamicCache``), the baseline every flashmem figure is compared against.
* :func:`pre_rope_keys`: one layer's keys before RoPE, from a plain forward over text.
"""

from __future__ import annotations

import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    StableLmConfig,
    StableLmForCausalLM,
)

from .hf_compat import capture_attention_inputs, forward_kwargs, rotary_cos_sin, unrotate

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "phi3": (Phi3Config, Phi3ForCausalLM),
    "olmo2": (Olmo2Config, Olmo2ForCausalLM),
    "granite": (GraniteConfig, GraniteForCausalLM),
    "gemma": (GemmaConfig, GemmaForCausalLM),
    "cohere": (CohereConfig, CohereForCausalLM),
    "stablelm": (StableLmConfig, StableLmForCausalLM),
}
# per-family settings of the tiny configs (special ids inside the tiny vocabulary; Mistral without a
# sliding window, as Mistral-7B-v0.2 and later; Granite with its multipliers away from 1, so a
# prefill that skipped one would differ)
FAMILY_DEFAULTS = {
    "mistral": dict(sliding_window=None),
    "phi3": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "olmo2": dict(pad_token_id=0, eos_token_id=2),
    "granite": dict(
        embedding_multiplier=4.0, logits_scaling=3.0, attention_multiplier=0.2, residual_multiplier=0.5
    ),
    "gemma": dict(pad_token_id=0, eos_token_id=1, bos_token_id=2),
    "cohere": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),
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
    fields.update(FAMILY_DEFAULTS.get(family, {}))
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


class DenseDecoder:
    """Full attention the plain Hugging Face way: the model's own forward over a ``DynamicCache``
    (``offloading=True``: transformers' offloaded cache, which keeps every layer's K/V in host memory
    and copies a layer back ahead of its use; it needs a CUDA device).

    ``step(input_ids)`` feeds ``input_ids [1, T]`` (the prompt first, then one token at a time) and
    returns the next-token logits ``[vocab]`` of the last position, in the model's dtype.
    ``kv_bytes(device)`` counts the cache's key and value bytes."""

    def __init__(self, model: torch.nn.Module, *, offloading: bool = False) -> None:
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache(config=model.config, offloading=offloading)
        # the cache argument as this transformers release names it (past_key_values or cache)
        self._kwargs = forward_kwargs(model, self.cache)

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, logits_to_keep=1, **self._kwargs)
        return out.logits[0, -1]

    def kv_bytes(self, device: torch.device | None = None) -> tuple[int, int]:
        """(bytes of the cache's key/value tensors on ``device`` (all of them when None), bytes of
        all of them)."""
        on_device = total = 0
        for layer in getattr(self.cache, "layers", []):
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor) and t.numel():
                    n = t.numel() * t.element_size()
                    total += n
                    on_device += n if device is None or t.device == device else 0
        return on_device, total


@torch.no_grad()
def pre_rope_keys(
    model: torch.nn.Module, token_ids: torch.Tensor, layer: int, *, window: int
) -> torch.Tensor:
    """Layer ``layer``'s keys before RoPE, ``[N, H_kv, D]`` fp32 on the model's device.

    token_ids: ``[N]``; they run through a plain forward (SDPA attention, no cache) in windows of
    ``window`` tokens, positions restarting at 0 in each window (as :func:`flashmem.calibrate` does);
    the post-RoPE keys are rotated back with the model's own cos/sin at their positions."""
    device = next(model.parameters()).device
    keys: list[torch.Tensor] = []
    state: dict = {}

    def grab(layer_idx, query, key, value):
        if layer_idx == layer:
            keys.append(unrotate(key[0].float(), state["cos"], state["sin"]).transpose(0, 1))  # [T, H_kv, D]

    for start in range(0, token_ids.numel(), window):
        chunk = token_ids[start : start + window].to(device)
        state["cos"], state["sin"] = rotary_cos_sin(model, torch.arange(chunk.numel(), device=device))
        with capture_attention_inputs(model, grab):
            model(input_ids=chunk[None], use_cache=False)
    return torch.cat(keys)
