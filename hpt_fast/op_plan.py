"""How one call of the fused op runs: its backend, block sizes, loop order and sum precision.

A ``Plan`` is decided from shapes, dtypes and the memory budget before any logits block is
computed; the passes (``op_passes``) follow it, and mode A's backward rebuilds the same plan from
what the forward hands it, so both cut the logits the same way.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from hpt_fast import backends

# dtypes whose GEMM outputs are rounded below float32, so that a sum over blocks loses precision
LOW_PRECISION = (torch.bfloat16, torch.float16)
# The logits block's default budget: this share of the naive float32 logits [N, V], within
# [_MIN_BUDGET_MB, _MAX_BUDGET_MB] MiB. A share keeps the op's extra memory a fixed fraction of
# what it saves (1/12 leaves room under the 1/8 target for vocabulary order's float32
# [N, H] grad_hidden sum, H / V of the logits); the larger blocks of large calls run their GEMMs
# nearer the full rate and sum fewer partial gradients (an H200 at 8192 x 3584 x 151936 bf16,
# bench/results_gpu_h200.md: mode B 1.63x the three GEMMs at 128 MiB, 1.48-1.58x at this default's
# 396 MiB, 1.38x at 1 GiB; with a bf16 weight-gradient sum 1.49x, 1.26-1.36x and 1.15x). The
# floor keeps small calls' GEMMs large.
_BUDGET_SHARE = 1 / 12
_MIN_BUDGET_MB = 128
_MAX_BUDGET_MB = 1024
# The torch backend holds about four float32 temporaries of the block's size at once.
_TORCH_BACKEND_EXTRA_BYTES = 16
# On CUDA the elements between the starts of a logits block's rows, and vocabulary slab widths
# everywhere, are multiples of this (128 bytes in bf16): cuBLAS's fast bf16 GEMMs need 16-byte
# aligned rows, and an odd row length (slabs of 8179 columns) made vocabulary order take 6-7x its
# GEMMs' time on an H200. On CPU a block is contiguous instead (``Plan.row_align`` 1): torch 2.6's
# CPU GEMM wrote a strided one through a float32 copy of it (tests/test_memory.py's bf16 cases
# reached 0.25-0.30x of the naive logits there).
_ROW_ALIGN = 64


@dataclass(frozen=True)
class Plan:
    """How one call runs.

    backend: the row-kernel module. dtype: the GEMMs' dtype (the inputs', or autocast's; see
        ``op_inputs.compute_dtype``). inv_temp: 1 / temperature. softcap: None, or c > 0 for
        logits c * tanh(logits / c) (Gemma 2's ``final_logit_softcapping``), before the temperature.
    chunk: tokens per logits block [chunk, V] in token order, and per call of mode B's
        token_loss_fn there (vocabulary order calls it once, on all tokens).
    slab: vocabulary columns per logits block [N, slab] in vocabulary order, N the scored tokens:
        at most ``chunk * V // N`` (at least 1), so the block holds no more elements than a
        [chunk, V] one; see ``slab_width``.
    order: the loop of every pass over logits blocks, "tokens" (over token chunks) or "vocab"
        (over vocabulary slabs).
    float32_weight_sum: in token order, sum grad_weight over the chunks in a float32 buffer
        (a low-precision weight with ``accum_dtype=torch.float32``) rather than in grad_weight
        itself. (A float32 weight's gradient is itself the float32 sum, also under autocast;
        vocabulary order's grad_hidden, [N, H], is always summed in float32.)
    row_align: a logits block's rows start a multiple of this many elements apart:
        ``_ROW_ALIGN`` on CUDA, 1 (a contiguous block) elsewhere.
    """

    backend: ModuleType
    dtype: torch.dtype
    inv_temp: float
    chunk: int
    slab: int
    order: str
    float32_weight_sum: bool
    row_align: int
    softcap: Optional[float] = None


def budget_bytes(n_rows: int, vocab: int) -> float:
    """The logits block's memory budget in bytes for N = ``n_rows`` scored tokens and V =
    ``vocab``: ``HPT_FAST_MEMORY_BUDGET_MB`` MiB when set, else 1/12 of the naive float32 logits
    (N * V * 4 bytes), at least 128 MiB and at most 1 GiB.

    Raises ValueError when the variable is set to anything but a finite number > 0: a budget of
    0 or less would silently run one token per block, hundreds of times slower.
    """
    raw = os.environ.get("HPT_FAST_MEMORY_BUDGET_MB")
    if raw is None:
        share = n_rows * vocab * 4 * _BUDGET_SHARE
        return min(max(share, _MIN_BUDGET_MB * 2**20), _MAX_BUDGET_MB * 2**20)
    try:
        mib = float(raw)
    except ValueError:
        mib = math.nan
    if not (math.isfinite(mib) and mib > 0):
        raise ValueError(f"HPT_FAST_MEMORY_BUDGET_MB must be a finite number of MiB > 0, got {raw!r}")
    return mib * 2**20


def auto_order(
    mode: str, float32_weight_sum: bool, n_rows: int, vocab: int, hidden_size: int, chunk: int, budget: float
) -> str:
    """The loop order of the passes over logits blocks when the caller leaves it to the op.

    Both orders cut the logits into about the same number of blocks of the same size and run the
    same GEMMs per block; they differ in the GEMMs' shapes and in which input gradient is summed
    over the blocks. Token order multiplies a chunk of C tokens by all of W (M = C, small when V is
    large: 441 tokens at V = 151936 under a 128 MiB budget in bf16), writes each chunk's rows of
    grad_hidden once and sums grad_weight [V, H] over the chunks; vocabulary order multiplies all
    N tokens by a slab of W (M = N), writes each slab's rows of grad_weight once and sums
    grad_hidden [N, H] over the slabs. A sum over several blocks rereads and rewrites its tensor
    once per block, and in low precision it needs a float32 buffer of its size (rounded once, at
    the end), unless ``float32_weight_sum`` is off and the sum is grad_weight's.

    Mode A (``mode="A"``): its statistics pass and its backward's gradient pass are separate
    either way, so it takes the order with the smaller sum and the larger M: vocabulary order
    when N < V. Measured on the 2-core CPU (tokens 2048, H 1024, V 151936;
    bench/results_cpu_cb865ec.md): 1.01x instead of 1.12x of the four-GEMM floor in float32
    (the float32 grad_weight products alone: 1.5 s as one product over 2048 tokens, 1.8 s summed
    over 220-token chunks, bench/results_gemm_chunking_cpu.md), 1.09x instead of 1.35x in bf16;
    level at V = 32768.
    Mode B (``mode="B"``): token order runs the statistics, the loss and the gradient on one
    logits block (three GEMMs in all); vocabulary order needs the statistics of every token before
    its first gradient slab, so a statistics pass over the slabs first (four GEMMs, less one
    slab's logits GEMM, which the gradient pass takes from the statistics pass). It is taken
    only for memory: when the float32 [V, H] buffer of token order (``float32_weight_sum``,
    several chunks) exceeds what the budget allows it, and vocabulary order's [N, H] one is
    smaller. Token order holds the buffer and the block, so the buffer may take a budget of up to
    128 MiB, the default's floor (small calls: 256 MiB in all), and a quarter of a larger one (at
    most 1.25 budgets in all, about 1/10 of the naive logits under the default share, where the
    issue's target is 1/8).
    Token order saves less than the fourth GEMM, and the less the more chunks there are: summing
    grad_weight in that buffer reads and writes it once per chunk, 8 V H bytes (on CPU each
    chunk's bf16 product passes through cache in pieces, see op_passes.matmul_into; on CUDA the GEMM adds
    into the sum). On an H200 at 8192 x 3584 x 151936 (bench/results_gpu_h200.md) token order
    took 66 ms against vocabulary order's 58 ms under a 128 MiB budget (19 chunks), and 50.5
    against 52-55 ms under the default's 396 MiB (7 chunks). Measured in bf16 at H 1024,
    V 151936 on the 2-core CPU: at N = 2048 (5 chunks; bench/results_cpu_v151936.md) token order
    1.11x and vocabulary order 1.29x of three GEMMs (1.08x and 1.22x in an earlier run), at
    0.61x and 0.12x of the naive logits' memory; at N = 12288 (28 chunks;
    bench/results_cpu_n12288.md) 17.5-18.9 s against 19.3 s, at 0.10x and 0.03x.
    """
    if mode == "A":
        return "vocab" if n_rows < vocab else "tokens"
    token_buffer = vocab * hidden_size * 4 if float32_weight_sum and chunk < n_rows else 0
    allowed = budget if budget <= _MIN_BUDGET_MB * 2**20 else budget / 4
    return "vocab" if token_buffer > allowed and n_rows < vocab else "tokens"


def make_plan(
    mode: str,
    backend: str,
    hidden: Tensor,
    vocab: int,
    n_rows: int,
    chunk_size: Optional[int],
    temperature: float,
    grad_order: str,
    accum_dtype: Optional[torch.dtype],
    dtype: Optional[torch.dtype] = None,
    weight_dtype: Optional[torch.dtype] = None,
    softcap: Optional[float] = None,
) -> Plan:
    """Backend, block sizes, gradient order and sum precision for one call of mode ``mode`` ("A" or "B").

    ``hidden``: the op's input [..., H] (its dtype, device and H are read, not its values);
    ``n_rows``: N, the number of scored tokens among its positions; ``vocab``: V.
    ``dtype``: the GEMMs' dtype (default hidden's); ``weight_dtype``: the weight's own, that of
    its gradient (default ``dtype``); ``softcap``: see ``Plan``.
    """
    dtype = hidden.dtype if dtype is None else dtype
    weight_dtype = dtype if weight_dtype is None else weight_dtype
    if dtype == torch.float64:
        # float64 is the reference / gradcheck dtype: only the readable backend computes in it
        if backend not in ("auto", "torch"):
            raise TypeError(f"backend {backend!r} takes float32, bfloat16 or float16; float64 runs on 'torch'")
        backend = "torch"
    name, module = backends.resolve(backend, hidden.device)
    budget = budget_bytes(n_rows, vocab)
    if chunk_size is None:
        per_row = vocab * (dtype.itemsize + (_TORCH_BACKEND_EXTRA_BYTES if name == "torch" else 0))
        chunk_size = max(1, int(budget // per_row))
    chunk = max(1, min(chunk_size, n_rows))
    slab = slab_width(vocab, max(1, chunk * vocab // max(n_rows, 1)))
    float32_weight_sum = weight_dtype in LOW_PRECISION and accum_dtype == torch.float32
    if grad_order == "auto":
        grad_order = auto_order(mode, float32_weight_sum, n_rows, vocab, hidden.shape[-1], chunk, budget)
    return Plan(
        backend=module, dtype=dtype, inv_temp=1.0 / temperature, chunk=chunk, slab=slab, order=grad_order,
        float32_weight_sum=float32_weight_sum, row_align=_ROW_ALIGN if hidden.is_cuda else 1, softcap=softcap,
    )


def slab_width(vocab: int, widest: int) -> int:
    """Columns per vocabulary slab: as few slabs of at most ``widest`` columns as whole slabs of
    ``widest`` rounded down to a multiple of ``_ROW_ALIGN`` would take, all but the last of one
    width, a multiple of ``_ROW_ALIGN`` (unaligned only when ``widest`` is below it).

    Even slabs rather than full ones and a narrow remainder, whose GEMM would run at a worse rate.
    """
    if widest >= vocab:
        return vocab
    if widest < _ROW_ALIGN:
        return -(-vocab // -(-vocab // widest))
    widest -= widest % _ROW_ALIGN
    # the even width rounded up stays within the aligned widest, itself a multiple of the alignment
    return -(-vocab // -(-vocab // widest) // _ROW_ALIGN) * _ROW_ALIGN
