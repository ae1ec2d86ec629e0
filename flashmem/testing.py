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


# ---- counting what a decode step dispatches ------------------------------------------------------
# aten ops that block the host on an accelerator: a scalar read-back and the ops whose output size
# depends on the data (the host must wait for the count)
SYNC_OPS = frozenset(
    {
        "aten._local_scalar_dense",
        "aten.nonzero",
        "aten.nonzero_static",
        "aten.masked_select",
        "aten.unique",
        "aten._unique",
        "aten._unique2",
        "aten.unique_consecutive",
        "aten.unique_dim",
        "aten.is_nonzero",
        "aten.equal",
    }
)


class OpCounter:
    """Counts the aten ops dispatched and the host syncs they imply while active (a context manager
    around :class:`torch.utils._python_dispatch.TorchDispatchMode`).

    A host sync is an op that would block the host on an accelerator: the ops in :data:`SYNC_OPS`
    (``item()``, ``int(t)``, ``nonzero``, ``unique``, ...), and every copy between the host and the
    device. With ``device`` an accelerator that is an ``aten._to_copy`` / ``aten.copy_`` with a CPU
    source and a ``device`` destination or the reverse. On a CPU, where such copies do not exist, the
    counter counts what would be one instead: every tensor made from Python data (``torch.tensor``,
    indexing with a list: ``aten.lift_fresh``), an upload, and every ``Tensor.tolist()``,
    ``Tensor.numpy()`` and ``Tensor.cpu()`` call, a read-back (those never dispatch an op on a CPU
    tensor, so the methods are wrapped while the counter is active).

    ``ops`` / ``syncs``: totals; ``by_op``: count per op name; ``sync_by_op``: the syncs per op name.
    ``paused``: while True nothing is counted (e.g. around a prefill inside the counted block).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.ops = 0
        self.syncs = 0
        self.by_op: dict[str, int] = {}
        self.sync_by_op: dict[str, int] = {}
        self.paused = False
        self._mode = None
        self._saved: dict[str, object] = {}

    def _sync(self, name: str) -> None:
        if not self.paused:
            self.syncs += 1
            self.sync_by_op[name] = self.sync_by_op.get(name, 0) + 1

    def _is_transfer(self, name: str, args, kwargs) -> bool:
        if self.device.type == "cpu":
            return name == "aten.lift_fresh"
        if name not in ("aten._to_copy", "aten.copy_"):
            return False
        tensors = [a for a in args[:2] if isinstance(a, torch.Tensor)]
        devices = {t.device.type for t in tensors}
        target = kwargs.get("device")
        if target is not None:
            devices.add(torch.device(target).type)
        return "cpu" in devices and len(devices) > 1

    def __enter__(self) -> OpCounter:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if not counter.paused:
                    name = func.overloadpacket._qualified_op_name.replace("::", ".")
                    counter.ops += 1
                    counter.by_op[name] = counter.by_op.get(name, 0) + 1
                    if name in SYNC_OPS or counter._is_transfer(name, args, kwargs):
                        counter._sync(name)
                return func(*args, **kwargs)

        if self.device.type == "cpu":
            for method in ("tolist", "numpy", "cpu"):
                original = getattr(torch.Tensor, method)
                self._saved[method] = original

                def wrapped(t, *a, _original=original, _name=method, **k):
                    self._sync(f"Tensor.{_name}")
                    return _original(t, *a, **k)

                setattr(torch.Tensor, method, wrapped)
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        for method, original in self._saved.items():
            setattr(torch.Tensor, method, original)
        self._saved = {}
