"""Everything that touches transformers internals lives here (supported and tested: transformers 5.17 and 5.24).

* Attention routing, per call and per thread, without touching the user's model: both releases pick
  a layer's attention function with ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation,
  eager_attention_forward)``. ``register()`` wraps that one lookup (once, idempotent): while
  ``route_attention(model, handler)`` is active in the current thread (a context variable), the
  attention modules of that model call ``handler(fallback, module, query, key, value, attention_mask,
  **kwargs)``, where ``fallback`` is the function the lookup would have returned (the model's own
  sdpa, eager, ...). Everywhere else (other threads, other models, plain Hugging Face use) the lookup
  returns exactly what it returned before. ``config._attn_implementation`` is never written, so
  several wrappers of one model may decode in several threads while the model is used directly.
* ``attention_runner(model, runner)`` routes the attention to ``runner.attend`` (the paged cache in
  decoding, the layer-major prefill during an exact prefill);
  ``paged_forward_kwargs(model, cache)`` adds an empty 4D attention mask, which transformers' mask
  builders return as given (no ``[T, S]`` mask is built for the paged cache: the attention applies
  causality itself from the true position of every cached slot).
* ``forward_kwargs(model, cache)`` names the cache argument the way the installed release expects
  (``cache=`` from 5.24, ``past_key_values=`` before).
* Rotary helpers: ``rotary_cos_sin`` calls the model's own rotary embedding (so rope scaling such as
  llama3 or YaRN is respected) and ``unrotate`` recovers pre-RoPE vectors.
* ``capture_attention_inputs`` records post-RoPE queries/keys of every layer during a plain forward
  (used by calibration and label generation); the attention itself is the model's own.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "olmo2", "granite", "gemma")
# families known not to fit, and why (named in the refusal)
UNSUPPORTED_REASONS = {
    "cohere": "its rotary embedding rotates interleaved pairs (x[2i], x[2i+1]), while TriAttention scoring and "
    "the rotary helpers assume transformers' rotate_half halves, and it scales logits by logit_scale",
    "stablelm": "it applies rotary embeddings to part of each head only (partial_rotary_factor < 1)",
    "gemma2": "it soft-caps attention logits and alternates sliding-window layers",
    "gemma3": "it alternates sliding-window layers and scales rotary per layer type",
}

# (configs of the routed model, handler) for the forward pass in flight in this thread, or None
_route: contextvars.ContextVar[tuple[tuple[Any, ...], Callable] | None] = contextvars.ContextVar(
    "flashmem_attention_route", default=None
)
_register_lock = threading.Lock()


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack of a causal LM (``model.model``), or the model itself."""
    return getattr(model, "model", model)


def _dispatch(route, fallback: Callable, module, *args, **kwargs):
    configs, handler = route
    config = getattr(module, "config", None)
    if any(config is c for c in configs):
        return handler(fallback, module, *args, **kwargs)
    return fallback(module, *args, **kwargs)


def _routing_lookup(get_interface: Callable) -> Callable:
    """``get_interface`` that returns a dispatcher only while a route is active in this context."""

    @functools.wraps(get_interface)
    def lookup(attn_implementation, default):
        function = get_interface(attn_implementation, default)
        route = _route.get()
        if route is None:
            return function
        return functools.partial(_dispatch, route, function)

    lookup._flashmem_routing = True
    return lookup


def register() -> None:
    """Install the per-call attention routing in transformers' attention lookup; idempotent and
    thread-safe. Without an active route the lookup is unchanged."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if getattr(ALL_ATTENTION_FUNCTIONS.get_interface, "_flashmem_routing", False):
        return
    with _register_lock:
        if getattr(ALL_ATTENTION_FUNCTIONS.get_interface, "_flashmem_routing", False):
            return
        ALL_ATTENTION_FUNCTIONS.get_interface = _routing_lookup(ALL_ATTENTION_FUNCTIONS.get_interface)


def _model_configs(model: torch.nn.Module) -> tuple[Any, ...]:
    config = model.config
    text = getattr(config, "text_config", None)
    return (config,) if text is None or text is config else (config, text)


@contextlib.contextmanager
def route_attention(model: torch.nn.Module, handler: Callable) -> Iterator[None]:
    """During the block, in the current thread only, every attention call of ``model``'s layers goes
    to ``handler(fallback, module, query, key, value, attention_mask, **kwargs)`` (see the module
    docstring); nothing of the model or its config is modified."""
    register()
    token = _route.set((_model_configs(model), handler))
    try:
        yield
    finally:
        _route.reset(token)


@contextlib.contextmanager
def attention_runner(model: torch.nn.Module, runner) -> Iterator[None]:
    """During the block (current thread only), the attention of ``model``'s layers is
    ``runner.attend(layer_idx, query [1, H_q, T, D], scaling) -> [1, T, H_q, D]``, which reads
    nothing else; the model and its config are not modified."""

    def handler(fallback, module, query, key, value, attention_mask, scaling=None, **kwargs):
        return runner.attend(module.layer_idx, query, scaling), None

    with route_attention(model, handler):
        yield


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


def paged_forward_kwargs(model: torch.nn.Module, cache, device: torch.device) -> dict:
    """:func:`forward_kwargs` plus an empty 4D attention mask ``[1, 1, 0, 0]``: both releases return a
    4D mask as given instead of building one (the flashmem attention ignores it; were it ever used by
    another attention function, its size would make that fail loudly rather than broadcast)."""
    mask = torch.ones((1, 1, 0, 0), dtype=torch.bool, device=device)
    return {**forward_kwargs(model, cache), "attention_mask": mask}


# ---- GGUF files ----------------------------------------------------------------------------------
def gguf_architecture(path) -> str:
    """The architecture a GGUF file declares (``general.architecture``), checked against those
    transformers can load from GGUF; raises ValueError naming the file and what is unsupported."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = GGUFReader(str(path))
    except Exception as err:  # a truncated or foreign file: gguf raises several kinds
        raise ValueError(f"{path} is not a readable GGUF file ({err})") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ValueError(f"{path}: its metadata names no architecture (general.architecture)")
    arch = bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not one transformers loads from GGUF "
            f"({', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})"
        )
    return arch


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
    get_head = getattr(model, "get_output_embeddings", None)
    if not callable(get_head) or get_head() is None:
        raise ValueError(
            f"{type(model).__name__} has no language-model head (get_output_embeddings() is None): flashmem "
            "decodes tokens, so wrap the causal LM (e.g. AutoModelForCausalLM / LlamaForCausalLM), not the "
            "bare decoder"
        )
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
    """During the block (current thread), every attention call of ``model`` first calls
    ``callback(layer_idx, query [B, H_q, T, D], key [B, H_kv, S, D], value [B, H_kv, S, D])``
    with post-RoPE tensors, then computes the model's own attention as usual."""

    def handler(fallback, module, query, key, value, attention_mask, **kwargs):
        callback(module.layer_idx, query, key, value)
        return fallback(module, query, key, value, attention_mask, **kwargs)

    with route_attention(model, handler):
        yield
