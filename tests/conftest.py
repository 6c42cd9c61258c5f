"""Test session setup shared by every test file."""

import os

import torch

# Without a GPU, Triton kernels run under Triton's interpreter (numpy on the CPU), so that CPU runs still compare them
# with their PyTorch references. It must be chosen before Triton is first imported: its own helpers are bound then.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
