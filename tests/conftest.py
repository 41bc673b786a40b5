"""Test setup: Triton kernels run on the CPU through the interpreter when no GPU is present."""
import os
import socket

import pytest
import torch
import torch.distributed as dist

if not torch.cuda.is_available():
    # must be set before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_rank_group():
    """This process as a one-rank gloo group for the test (for DTensors, tensor-parallel groups)."""
    if dist.is_initialized():
        pytest.skip("this process already belongs to a process group")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
