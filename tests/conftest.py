import os

import torch

# Triton runs kernels on CPU tensors only under its interpreter, which must be switched on
# before triton is imported; on a GPU machine the real compiler runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
