import os

import torch

# Triton kernels run under the interpreter when no GPU is present; this must be set before
# triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
