import os

import pytest
import torch

# Triton kernels run on CPU tensors only under the interpreter, which must be chosen
# before triton is imported. On a CUDA machine they compile for the GPU instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
