"""The argument checks every kernel wrapper shares (flashmem_kernels/checks.py)."""

import pytest
import torch

from flashmem.kernels.checks import check_float_tensor, check_int, check_triton_device, resolve_backend


def test_triton_device_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"compaction needs CUDA tensors \(got cpu\).*reference_compaction"):
        check_triton_device("compaction", torch.device("cpu"), "reference_compaction")
    check_triton_device("compaction", torch.device("cuda", 0), "reference_compaction")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_triton_device("compaction", torch.device("cpu"), "reference_compaction")


def test_float_tensor_int_and_backend_checks():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        check_float_tensor("keys", torch.zeros(2, dtype=dtype))
    with pytest.raises(TypeError, match="keys must be float32, float16 or bfloat16, got torch.int32"):
        check_float_tensor("keys", torch.zeros(2, dtype=torch.int32))
    with pytest.raises(TypeError, match="keys must be a torch.Tensor, got list"):
        check_float_tensor("keys", [0.0])
    check_int("Pool", "blocks", 3, 1)
    with pytest.raises(TypeError, match="Pool.blocks must be an int"):
        check_int("Pool", "blocks", True)
    with pytest.raises(ValueError, match="Pool.blocks must be >= 1, got 0"):
        check_int("Pool", "blocks", 0, 1)
    assert resolve_backend("auto", "cpu") == "torch" and resolve_backend("auto", "cuda") == "triton"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", "cpu")
