import os

import torch

# Triton kernels run under the interpreter when no GPU is present; this must be set before
# triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _private_flashmem_cache(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's ``flashmem prepare`` cache (~/.cache/flashmem)."""
    monkeypatch.setenv("FLASHMEM_CACHE_DIR", str(tmp_path_factory.mktemp("flashmem-cache")))
