"""pytest-benchmark of the fused op and its comparison set on a shape that runs quickly on CPU.

Run from the repository root: ``pytest bench/ --benchmark-only``. One benchmark per implementation
(see ``bench/implementations.py``), grouped by dtype so each comparison table is side by side.
``python -m bench.fused_op_table`` measures the same implementations at LLM shapes, with ratios
to the GEMM floor and peak memory.
"""
from __future__ import annotations

import pytest
import torch

from bench.implementations import Impl, Problem, implementations, make_problem, synchronize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOKENS, HIDDEN, VOCAB = 512, 512, 32768
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ROUNDS = 5
IMPLS = implementations(DEVICE)
# CCE's torch.compile on CPU imports torch.utils.mkldnn, which trips torch's own deprecation of
# torch.jit.script_method: not ours to fix, and it would bury the benchmark tables.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module", params=list(DTYPES))
def problem(request) -> Problem:
    """One problem per dtype, shared by every implementation's benchmark."""
    return make_problem(TOKENS, HIDDEN, VOCAB, DTYPES[request.param], DEVICE)


@pytest.mark.parametrize("impl", IMPLS, ids=[impl.name for impl in IMPLS])
def test_forward_backward(benchmark, impl: Impl, problem: Problem) -> None:
    reason = impl.missing(DEVICE)
    if reason:
        pytest.skip(reason)
    if impl.mixed and problem.hidden.dtype == torch.float32:
        pytest.skip("mixed precision runs a low-precision problem's forward from float32 leaves")
    dtype = str(problem.hidden.dtype).removeprefix("torch.")
    benchmark.group = f"{dtype} T{TOKENS} H{HIDDEN} V{VOCAB} on {DEVICE}"
    benchmark.extra_info["gemm_floor"] = impl.floor
    step = impl.build(problem)

    def run() -> None:
        step()
        synchronize(problem.device)

    # setup runs outside the timed call: each round allocates fresh gradients, as in the table
    benchmark.pedantic(run, setup=problem.zero_grads, rounds=ROUNDS, warmup_rounds=1)
