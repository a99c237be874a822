import os
import sys

import torch

# The tests mirror the package (tests/backends, tests/ops, ...) and share tests/helpers.py: pytest
# puts each test's own folder on sys.path, this one puts the shared folder there too.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Triton runs kernels on CPU tensors only under its interpreter, which must be switched on
# before triton is imported; on a GPU machine the real compiler runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # The references run cuDNN's GRU, which multiplies float32 in TF32 by default on Ampere and
    # later (errors near 1e-3): the float32 parity tolerances assume float32 arithmetic.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
