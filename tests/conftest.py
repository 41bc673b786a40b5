"""Test setup: Triton kernels run on the CPU through the interpreter when no GPU is present."""
import os

import torch

if not torch.cuda.is_available():
    # must be set before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
