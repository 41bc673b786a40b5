"""Test setup: Triton kernels run on the CPU through the interpreter when no GPU is present, and
Inductor compiles into a directory of this session's own."""
import atexit
import os
import shutil
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist

if not torch.cuda.is_available():
    # must be set before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Inductor's on-disk caches key a compiled graph without the custom ops' fake functions
# (pytorch#160472): a cache written under an earlier hpt_fast would hand mode A's compiled calls
# that version's output shapes
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="hpt_fast_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)


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
