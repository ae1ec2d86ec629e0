"""Everything that touches transformers internals lives here (supported and tested: transformers 5.17 and 5.24).

* ``register()`` puts the ``"flashmem"`` attention function and its mask function into
  transformers' registries. The mask function returns ``None``: the attention applies causality
  itself from the true position of every cached slot.
* ``use_attention(model, name)`` temporarily switches a model's attention implementation.
* ``forward_kwargs(model, cache)`` names the cache argument the way the installed release expects
  (``cache=`` from 5.24, ``past_key_values=`` before).
* ``active_runner`` is the context variable through which the attention function finds the object
  that owns the paged cache of the forward pass in flight.
* Rotary helpers: ``rotary_cos_sin`` calls the model's own rotary embedding (so rope scaling such as
  llama3 or YaRN is respected) and ``unrotate`` recovers pre-RoPE vectors.
* ``capture_attention_inputs`` records post-RoPE queries/keys of chosen layers during a plain forward
  (used by calibration and label generation).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch

ATTENTION_NAME = "flashmem"
CAPTURE_NAME = "flashmem_capture"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "olmo2", "granite", "gemma")
# families known not to fit, and why (named in the refusal)
UNSUPPORTED_REASONS = {
    "cohere": "its rotary embedding rotates interleaved pairs (x[2i], x[2i+1]), while TriAttention scoring and "
    "the rotary helpers assume transformers' rotate_half halves, and it scales logits by logit_scale",
    "stablelm": "it applies rotary embeddings to part of each head only (partial_rotary_factor < 1)",
    "gemma2": "it soft-caps attention logits and alternates sliding-window layers",
    "gemma3": "it alternates sliding-window layers and scales rotary per layer type",
}

active_runner: contextvars.ContextVar[Any] = contextvars.ContextVar("flashmem_active_runner", default=None)
_capture_callback: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "flashmem_capture_callback", default=None
)


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack of a causal LM (``model.model``), or the model itself."""
    return getattr(model, "model", model)


def _no_mask(*args, **kwargs):
    """Mask function for the flashmem attention: causality comes from slot positions."""
    return None


def _flashmem_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    runner = active_runner.get()
    if runner is None:
        raise RuntimeError(
            "the 'flashmem' attention ran outside a flashmem forward pass; call the model through "
            "flashmem.wrap(model, config)"
        )
    return runner.attend(module.layer_idx, query, scaling), None


def _capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    callback = _capture_callback.get()
    if callback is not None:
        callback(module.layer_idx, query, key, value)
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )


_registered = False


def register() -> None:
    """Register the flashmem attention (and its mask) with transformers; idempotent."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _flashmem_attention)
    AttentionInterface.register(CAPTURE_NAME, _capture_attention)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    except ImportError:  # pragma: no cover - very old releases
        ALL_MASK_ATTENTION_FUNCTIONS = None
    if ALL_MASK_ATTENTION_FUNCTIONS is not None:
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, _no_mask)
        ALL_MASK_ATTENTION_FUNCTIONS.register(CAPTURE_NAME, sdpa_mask)
    _registered = True


@contextlib.contextmanager
def use_attention(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Switch the model's attention implementation for the duration of the block."""
    register()
    config = model.config
    previous = config._attn_implementation
    configs = [config] + [c for c in (getattr(config, "text_config", None),) if c is not None]
    try:
        for c in configs:
            c._attn_implementation = name
        yield
    finally:
        for c in configs:
            c._attn_implementation = previous


@contextlib.contextmanager
def attention_runner(model: torch.nn.Module, runner) -> Iterator[None]:
    """During the block, the model's attention layers call ``runner.attend(layer_idx, query, scaling)``
    (the "flashmem" attention) and read nothing else."""
    token = active_runner.set(runner)
    try:
        with use_attention(model, ATTENTION_NAME):
            yield
    finally:
        active_runner.reset(token)


def cache_argument_name(model: torch.nn.Module) -> str:
    """``"cache"`` on releases whose forward takes it (5.24+), else ``"past_key_values"``."""
    params = inspect.signature(base_model(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward_kwargs(model: torch.nn.Module, cache) -> dict:
    return {cache_argument_name(model): cache, "use_cache": True}


# ---- driving the decoder layer by layer (layer-major prefill) -----------------------------------
def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers in order (``model.model.layers``)."""
    base = base_model(model)
    return list(base.layers[: text_config(model).num_hidden_layers])


def embed_tokens(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Input embeddings ``[1, T, hidden]`` of ``input_ids`` ``[1, T]``, as the model's forward makes them
    (Granite multiplies them by ``embedding_multiplier``; Gemma by ``sqrt(hidden_size)``, inside its
    embedding module on releases that have ``GemmaTextScaledWordEmbedding``, in the forward before)."""
    config = text_config(model)
    embed = base_model(model).embed_tokens
    hidden = embed(input_ids)
    model_type = getattr(config, "model_type", None)
    if model_type == "granite":
        hidden = hidden * config.embedding_multiplier
    elif model_type == "gemma" and not hasattr(embed, "embed_scale"):
        hidden = hidden * torch.tensor(config.hidden_size**0.5, dtype=hidden.dtype)
    return hidden


_LAYER_CACHE_NAMES: dict[type, str] = {}


def _layer_cache_name(layer: torch.nn.Module) -> str:
    """``"cache"`` where the decoder layer's forward takes it (5.24+), else ``"past_key_values"``."""
    cls = type(layer)
    if cls not in _LAYER_CACHE_NAMES:
        params = inspect.signature(cls.forward).parameters
        _LAYER_CACHE_NAMES[cls] = "cache" if "cache" in params else "past_key_values"
    return _LAYER_CACHE_NAMES[cls]


def run_decoder_layer(
    model: torch.nn.Module, layer: torch.nn.Module, hidden: torch.Tensor, positions: torch.Tensor, cache
) -> torch.Tensor:
    """One decoder layer on ``hidden`` ``[1, t, hidden]`` at true ``positions`` ``[t]`` (call inside
    :func:`attention_runner`); returns the layer's output ``[1, t, hidden]``."""
    position_ids = positions[None]
    cos, sin = rotary_embedding(model)(hidden, position_ids)
    out = layer(
        hidden,
        attention_mask=None,
        position_ids=position_ids,
        use_cache=True,
        position_embeddings=(cos, sin),
        **{_layer_cache_name(layer): cache},
    )
    return out[0] if isinstance(out, tuple) else out


def lm_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits ``[1, t, vocab]`` of the last layer's hidden states ``[1, t, hidden]``: the final norm,
    then the LM head, as the model's forward applies them (Granite divides by ``logits_scaling``)."""
    logits = model.lm_head(base_model(model).norm(hidden))
    config = text_config(model)
    if getattr(config, "model_type", None) == "granite":
        logits = logits / config.logits_scaling
    return logits


# ---- model checks ------------------------------------------------------------------------------
def text_config(model: torch.nn.Module):
    config = model.config
    return getattr(config, "text_config", None) or config


def sliding_window(model: torch.nn.Module) -> int | None:
    """The sliding window the model's attention applies, in any spelling (``sliding_window`` alone as
    Mistral and Phi-3 read it, gated by ``use_sliding_window`` as Qwen2 does), or None."""
    config = text_config(model)
    if getattr(config, "use_sliding_window", None) is False:
        return None
    window = getattr(config, "sliding_window", None)
    return int(window) if window else None


def validate_model(model: torch.nn.Module, max_context_tokens: int | None = None) -> None:
    """Refuse models flashmem cannot run exactly, with a message that says why.

    max_context_tokens: the longest sequence the caller will run; a sliding window at least that long
    never binds (attention is then exactly full attention), a shorter one is refused. Without it
    (calibration, which runs the model's own attention) the window is not checked."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(
            f"expected a Hugging Face causal LM (torch.nn.Module with .config), got {type(model)}"
        )
    config = text_config(model)
    model_type = getattr(config, "model_type", None)
    if model_type in UNSUPPORTED_REASONS:
        raise ValueError(f"model type {model_type!r} is not supported: {UNSUPPORTED_REASONS[model_type]}")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type {model_type!r} is not supported; flashmem supports {SUPPORTED_MODEL_TYPES} "
            "(decoder-only, full attention, rotary position embeddings)"
        )
    if rotary_embedding(model) is None:
        raise ValueError(
            "the model has no rotary embedding (model.model.rotary_emb); flashmem needs RoPE models"
        )
    head_dim = kv_geometry(model)[3]
    rope = getattr(config, "rope_parameters", None) or {}
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    rotary_dim = 2 * rope_omega(model).numel()
    if float(partial) != 1.0 or rotary_dim != head_dim:
        raise ValueError(
            f"partial rotary embeddings are not supported (partial_rotary_factor {partial}: {rotary_dim} of "
            f"{head_dim} head dims rotated): TriAttention scoring and the rotary helpers rotate whole heads"
        )
    for name in ("final_logit_softcapping", "attn_logit_softcapping", "logit_scale"):
        if getattr(config, name, None) is not None:
            raise ValueError(
                f"{name} is not supported: the layer-major prefill and decode attention do not apply it"
            )
    layer_types = getattr(config, "layer_types", None) or []
    other = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
    if other:
        raise ValueError(
            f"unsupported attention types {other}: flashmem supports full causal attention in every layer"
        )
    window = sliding_window(model)
    if window is None and "sliding_attention" in layer_types:
        raise ValueError("layer_types name sliding_attention layers but the config gives no sliding_window")
    if max_context_tokens is not None and window is not None and window < max_context_tokens:
        raise ValueError(
            f"sliding-window attention (sliding_window={window}) is not supported: flashmem attends to the "
            f"whole context, which equals the model's attention only while the context fits the window; set "
            f"FlashMemConfig.max_context_tokens <= {window}, or use a model without a sliding window"
        )


def kv_geometry(model: torch.nn.Module) -> tuple[int, int, int, int]:
    """(num_layers, num_q_heads, num_kv_heads, head_dim) of a supported model."""
    config = text_config(model)
    num_q = config.num_attention_heads
    num_kv = getattr(config, "num_key_value_heads", None) or num_q
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_q
    return config.num_hidden_layers, num_q, num_kv, head_dim


def model_fingerprint(model: torch.nn.Module) -> dict:
    """What must match for calibration stats or an indexer checkpoint to apply to a model."""
    config = text_config(model)
    layers, num_q, num_kv, head_dim = kv_geometry(model)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope = {
        k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
        for k, v in rope.items()
    }
    if "rope_theta" not in rope and getattr(config, "rope_theta", None) is not None:
        rope["rope_theta"] = float(config.rope_theta)
    return {
        "architecture": getattr(config, "model_type", "unknown"),
        "num_layers": int(layers),
        "num_attention_heads": int(num_q),
        "num_key_value_heads": int(num_kv),
        "head_dim": int(head_dim),
        "hidden_size": int(config.hidden_size),
        "rope": {k: v for k, v in sorted(rope.items()) if isinstance(v, (int, float, str))},
    }


def attention_scaling(model: torch.nn.Module, layer: int) -> float:
    """The softmax scale layer ``layer``'s attention applies (``head_dim ** -0.5`` unless the model says
    otherwise)."""
    try:
        return float(base_model(model).layers[layer].self_attn.scaling)
    except (AttributeError, IndexError, TypeError):
        return kv_geometry(model)[3] ** -0.5


# ---- rotary ------------------------------------------------------------------------------------
def rotary_embedding(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model's own rotary embedding module (``model.model.rotary_emb``), or None."""
    return getattr(base_model(model), "rotary_emb", None)


def rope_omega(model: torch.nn.Module) -> torch.Tensor:
    """The rotary frequencies ``[D/2]`` fp32 the model really applies (``rotary_emb.inv_freq``)."""
    inv_freq = getattr(rotary_embedding(model), "inv_freq", None)
    if inv_freq is None:
        raise ValueError("the model has no rotary embedding with inv_freq (model.model.rotary_emb.inv_freq)")
    return inv_freq.detach().to("cpu", torch.float32).reshape(-1).clone()


def rotary_cos_sin(
    model: torch.nn.Module, positions: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[T, D]`` of the model's own rotary embedding at ``positions`` ``[T]``."""
    rotary = rotary_embedding(model)
    device = positions.device
    probe = torch.empty((), dtype=dtype, device=device)
    cos, sin = rotary(probe, positions.reshape(1, -1).long())
    return cos[0].to(dtype), sin[0].to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE as transformers does: ``x [..., T, D]`` with ``cos, sin [T, D]``."""
    return x * cos + _rotate_half(x) * sin


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Invert :func:`rotate` (also when cos/sin carry an attention scaling factor)."""
    return (x * cos - _rotate_half(x) * sin) / (cos * cos + sin * sin)


@contextlib.contextmanager
def capture_attention_inputs(model: torch.nn.Module, callback: Callable) -> Iterator[None]:
    """During the block, every attention call of ``model`` first calls
    ``callback(layer_idx, query [B, H_q, T, D], key [B, H_kv, S, D], value [B, H_kv, S, D])``
    with post-RoPE tensors, then computes SDPA attention as usual."""
    token = _capture_callback.set(callback)
    try:
        with use_attention(model, CAPTURE_NAME):
            yield
    finally:
        _capture_callback.reset(token)
