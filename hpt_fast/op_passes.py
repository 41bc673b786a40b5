"""The fused op's passes over blocks of logits, each block a GEMM into one reused buffer.

Blocks come in one of two loop orders (``blocks``, per ``op_plan.Plan.order``): token chunks
``[C, V]`` of whole rows, or vocabulary slabs ``[N, Vs]`` of all N tokens, the GEMM's M dimension
then being every token. Two kinds of pass run over them:
- the statistics pass (``stats_pass``): a backend's ``row_stats`` merges each block into the
  rows' running softmax state, which gives per-row logp, log-sum-exp and entropy once all of V
  has been seen;
- the gradient pass (``GradientPass``): ``grad_logits`` turns each block into its own gradient in
  place, then two GEMMs give its share of the input gradients. In token order grad_hidden's rows
  are written once and grad_weight [V, H] is summed over the blocks (``MatmulSum``); in
  vocabulary order grad_weight's rows are written once and grad_hidden [N, H] is summed.
Each block's products go into the gradients through ``matmul_into``: straight from the GEMM
(torch's, the backend's own, or cuBLAS's float32 output where ``float32_products`` trusts it),
else in pieces of ``PIECE_BYTES`` copied or added while still in cache.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from hpt_fast import hugepages, op_plan
from hpt_fast.backends import row_state
from hpt_fast.backends.gemm_trial import gemm_is_right

# (start, end, logits [end - start, V]) of one token chunk, see stats_pass
ChunkHook = Callable[[int, int, Tensor], None]
# A GEMM product bound for a wider sum leaves the CPU GEMM in pieces of this size (see matmul_into).
PIECE_BYTES = 8 * 2**20
# torch.mm / addmm with out_dtype (low-precision inputs, a float32 output; CUDA), from torch 2.8.
# Some builds of that era refused addmm into a float32 self with bf16 / fp16 matrices
# (pytorch#154086), so a device is trusted with them only after a trial (float32_products).
FLOAT32_OUT_GEMM = "dtype_out" in torch.ops.aten.addmm.overloads()


def logits_block(h: Tensor, weight: Tensor, bias: Optional[Tensor], out: Tensor, backend: ModuleType) -> Tensor:
    """out[C, Vs] = h @ weight.T (+ bias), in the inputs' dtype with float32 accumulation."""
    if bias is not None:
        return torch.addmm(bias, h, weight.t(), out=out)
    if not _backend_gemm(backend, out, h, weight.t(), False):
        torch.mm(h, weight.t(), out=out)
    return out


def _backend_gemm(backend: ModuleType, out: Tensor, a: Tensor, b: Tensor, add: bool) -> bool:
    """The backend's own GEMM for ``out (+)= a @ b`` where it has one that takes these tensors
    (the cpu backend's oneDNN float32 products, ``cpu_backend.gemm_into``); False: use torch's."""
    gemm = getattr(backend, "gemm_into", None)
    return gemm is not None and gemm(out, a, b, add)


def stat_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype of the per-row statistics: float64 for float64 (reference) inputs, else float32."""
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _chunks(n: int, size: int):
    """(start, end) of consecutive ranges of ``size`` (the last one shorter) covering [0, n)."""
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _row_stride(cols: int, align: int) -> int:
    """Elements between the rows of a logits block ``cols`` wide: ``cols`` rounded up to a
    multiple of ``align`` (``op_plan.Plan.row_align``)."""
    return -(-cols // align) * align


def block_buffer(plan: op_plan.Plan, hidden: Tensor, vocab: int) -> Tensor:
    """The flat logits buffer every block of one call is a view of: [chunk, V] or [N, slab],
    rows ``_row_stride`` apart."""
    align = plan.row_align
    numel = max(plan.chunk * _row_stride(vocab, align), hidden.shape[0] * _row_stride(plan.slab, align))
    return hugepages.empty((numel,), hidden.dtype, hidden.device)


def _block_view(buffer: Tensor, rows: int, cols: int, row_stride: int) -> Tensor:
    """A [rows, cols] view of the start of ``buffer``, rows ``row_stride`` >= cols apart."""
    return buffer[: rows * row_stride].view(rows, row_stride)[:, :cols]


@dataclass
class RowData:
    """Per-token tensors of the N scored tokens, all [N], float32 (float64 for float64 inputs).

    logp, entropy (None when not computed): the row statistics of the logits; norm [N, 2]: their
    log-sum-exp as (m, log s) (``row_state.finish``).
    g_logp, g_ent (None: no entropy term): d loss / d logp and d loss / d entropy, what the
    gradient pass turns into d loss / d logits.
    top1 (None when not computed): bool, whether the target's logit is the row's largest.
    sums (None when not computed): [N, 2], each row's mean scaled logit over the ``vocab``
    columns and log sum_v p_v^2 (``row_state.logit_sums``).
    """

    logp: Optional[Tensor]
    norm: Tensor
    entropy: Optional[Tensor]
    g_logp: Optional[Tensor] = None
    g_ent: Optional[Tensor] = None
    top1: Optional[Tensor] = None
    sums: Optional[Tensor] = None
    vocab: int = 0

    @classmethod
    def empty(cls, hidden: Tensor, with_entropy: bool, with_top1: bool = False, vocab: int = 0) -> "RowData":
        """Uninitialised statistics for the rows of ``hidden`` [N, H]; no gradients yet. ``vocab``
        > 0: with the logit sums over that many columns."""
        logp = torch.empty(hidden.shape[0], dtype=stat_dtype(hidden), device=hidden.device)
        top1 = torch.empty(hidden.shape[0], dtype=torch.bool, device=hidden.device) if with_top1 else None
        sums = logp.new_empty(hidden.shape[0], 2) if vocab else None
        entropy = torch.empty_like(logp) if with_entropy else None
        return cls(logp, logp.new_empty(hidden.shape[0], 2), entropy, top1=top1, sums=sums, vocab=vocab)

    def finish(self, r: slice, state: Tensor) -> None:
        """Set the statistics of rows ``r`` from their complete running state [len(r), 6]."""
        self.logp[r], self.norm[r], entropy = row_state.finish(state, self.entropy is not None, self.norm.dtype)
        if entropy is not None:
            self.entropy[r] = entropy
        if self.top1 is not None:
            self.top1[r] = row_state.is_top1(state)
        if self.sums is not None:
            self.sums[r] = torch.stack(row_state.logit_sums(state, self.vocab, self.sums.dtype), dim=1)


def blocks(
    plan: op_plan.Plan, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], buffer: Tensor,
    after_stats: bool = False,
) -> Iterator[tuple[Tensor, slice, slice]]:
    """The logits blocks of one pass in ``plan.order``: yields (logits, rows, cols), the block
    [rows, cols] of ``hidden @ weight.T (+ bias)`` computed by one GEMM into ``buffer``.

    Every pass of a call cuts the logits the same way, so a recomputed block holds bit for bit
    the logits the statistics pass saw. Vocabulary order runs the slabs last to first, ending on
    slab 0, the one slab always of full width. ``after_stats``: this pass follows such a
    statistics pass into the same ``buffer`` (mode B), so it runs them first to last and takes
    slab 0 as the buffer still holds it, without its GEMM: of the S slabs' logits GEMMs the two
    passes run 2 S - 1, not 2 S.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    if plan.order == "tokens":
        stride = _row_stride(vocab, plan.row_align)
        for s, e in _chunks(n, plan.chunk):
            out = _block_view(buffer, e - s, vocab, stride)
            yield logits_block(hidden[s:e], weight, bias, out, plan.backend), slice(s, e), slice(0, vocab)
    else:
        slabs = list(_chunks(vocab, plan.slab))
        if not after_stats:
            slabs.reverse()
        for k, (v0, v1) in enumerate(slabs):
            out = _block_view(buffer, n, v1 - v0, _row_stride(v1 - v0, plan.row_align))
            if not (after_stats and k == 0):
                b = None if bias is None else bias[v0:v1]
                logits_block(hidden, weight[v0:v1], b, out, plan.backend)
            yield out, slice(0, n), slice(v0, v1)


def stats_pass(
    plan: op_plan.Plan,
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    rows: RowData,
    buffer: Tensor,
    on_chunk: Optional[ChunkHook] = None,
) -> None:
    """Fill rows.logp / norm / entropy: one GEMM and one ``row_stats`` per block, in ``plan.order``.

    In token order each chunk's statistics are final after its block, and ``on_chunk(start, end,
    logits)``, when given, runs then, while the block still holds their logits [end - start, V]
    (mode B's token order turns the block into its gradient there). In vocabulary order the
    statistics are final after the last slab; ``on_chunk`` needs token order.
    """
    if on_chunk is not None and plan.order != "tokens":
        raise ValueError("on_chunk needs the statistics pass in token order")
    with_entropy = rows.entropy is not None
    state = row_state.empty(hidden.shape[0], hidden.device)
    for logits, r, c in blocks(plan, hidden, weight, bias, buffer):
        plan.backend.row_stats(
            logits, targets[r], plan.inv_temp, with_entropy, state[r], col_offset=c.start, softcap=plan.softcap,
            with_sums=rows.sums is not None,
        )
        if plan.order == "tokens":
            rows.finish(r, state[r])
            if on_chunk is not None:
                on_chunk(r.start, r.stop, logits)
    if plan.order != "tokens":
        rows.finish(slice(0, hidden.shape[0]), state)


def matmul_into(
    out: Tensor, a: Tensor, b: Tensor, add: bool, backend: ModuleType, scratch: Optional[Tensor] = None
) -> None:
    """``out = a @ b``, or ``out += a @ b`` with ``add``: a [M, K] and b [K, N] in the op's dtype,
    out [M, N] contiguous, in the same dtype or float32 / float64 (a float32 gradient under
    autocast, a float32 sum), float32 accumulation inside the GEMM either way.

    All float32 (on CPU with the cpu backend): the backend's oneDNN GEMM
    (``cpu_backend.gemm_into``). A wider float32 out on CUDA takes the product straight from cuBLAS (bf16 / fp16 inputs,
    float32 output; ``float32_products``). Elsewhere (PyTorch's CPU GEMMs have no such output,
    nor has torch before 2.8) the product leaves the GEMM in a's dtype, ``piece_rows`` rows of a
    at a time, into ``scratch`` (at least that many rows of N; allocated when not given), and is
    copied, or added by the backend's ``accumulate_`` (float32 out), while it is still in cache:
    one token chunk's [V, H] weight gradient at V 151936, H 1024 took 172 ms that way on the
    2-core CPU, against 198 ms as one whole [V, H] product, which also needed a [V, H] scratch
    (bench/product_pieces.py, bench/results_cpu_product_pieces.md).
    """
    if _backend_gemm(backend, out, a, b, add):
        return
    if out.dtype == a.dtype:
        if add:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif out.dtype == torch.float32 and float32_products(out.device, a.dtype):
        _float32_out_product(a, b, out, add)
    else:
        rows = piece_rows(b.shape[1], a.dtype)
        if scratch is None:
            scratch = hugepages.empty((min(rows, a.shape[0]), b.shape[1]), a.dtype, a.device)
        for r0, r1 in _chunks(a.shape[0], rows):
            piece, target = torch.mm(a[r0:r1], b, out=scratch[: r1 - r0]), out[r0:r1]
            if not add:
                target.copy_(piece)
            elif out.dtype == torch.float32:
                backend.accumulate_(target, piece)
            else:
                target.add_(piece)


@functools.lru_cache(maxsize=None)
def float32_products(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch on ``device`` multiplies ``dtype`` matrices into a float32 output itself
    (``torch.mm`` / ``torch.addmm`` with ``out_dtype``, as ``matmul_into`` calls them), tried
    once per device and dtype on a small product checked against float64. False where the
    overloads are missing (torch before 2.8), not implemented (CPU), raise or sum wrongly; the
    op then takes its products in ``dtype`` pieces, each rounded to ``dtype`` before it is added,
    as on CPU. Tried with ``a`` contiguous and transposed, as the gradient pass passes it."""
    if not FLOAT32_OUT_GEMM or dtype not in op_plan.LOW_PRECISION:
        return False
    # a missing CPU kernel raises a RuntimeError subclass; a build without the keyword, TypeError
    return gemm_is_right(_float32_out_product, dtype, device, errors=(RuntimeError, TypeError))


def _float32_out_product(a: Tensor, b: Tensor, out: Tensor, add: bool) -> None:
    """out (+)= a @ b into a float32 ``out`` straight from the GEMM (torch 2.8's ``out_dtype``)."""
    if add:
        torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    else:
        torch.mm(a, b, out_dtype=torch.float32, out=out)


def piece_rows(cols: int, dtype: torch.dtype) -> int:
    """Rows of a product piece of ``cols`` columns in ``dtype`` that fill ``PIECE_BYTES``."""
    return max(1, PIECE_BYTES // (cols * dtype.itemsize))


class MatmulSum:
    """out = the sum over blocks k of a_k @ b_k, into ``out`` (its dtype and shape), a_k and b_k
    in the op's dtype ``dtype``.

    The sum runs in ``out`` itself (beta = 1, float32 accumulation inside each GEMM) when out is
    float32 / float64, or low precision without ``float32``: then one rounding of the running
    sum to out's dtype per block. Low precision with ``float32`` and several blocks: the sum is
    kept in a float32 buffer of out's shape, rounded once at the end. Each block's product goes
    in through ``matmul_into``, on CPU a piece at a time through one small scratch.
    """

    def __init__(self, out: Tensor, n_blocks: int, backend: ModuleType, float32: bool, dtype: torch.dtype) -> None:
        self.out, self.backend = out, backend
        buffered = float32 and out.dtype in op_plan.LOW_PRECISION and n_blocks > 1
        self.acc = hugepages.empty(out.shape, torch.float32, out.device) if buffered else out
        self.scratch = None
        if self.acc.dtype != dtype and not (
            self.acc.dtype == torch.float32 and float32_products(self.acc.device, dtype)
        ):
            rows = min(piece_rows(out.shape[1], dtype), out.shape[0])
            self.scratch = hugepages.empty((rows, out.shape[1]), dtype, out.device)
        self.first = True

    def add(self, a: Tensor, b: Tensor) -> None:
        """Add one block's a @ b, a [M, K] and b [K, N] in ``dtype``, to the sum."""
        matmul_into(self.acc, a, b, not self.first, self.backend, self.scratch)
        self.first = False

    def result(self) -> Tensor:
        """``out`` holding the sum: zeros when no block was added, copied from the float32 buffer when
        there is one."""
        if self.first:  # no block at all
            self.out.zero_()
        elif self.acc is not self.out:
            self.out.copy_(self.acc)
        return self.out


class GradientPass:
    """The input gradients of hidden [N, H], weight [V, H] and bias [V], built block by block.

    For each logits block (token rows ``r``, vocabulary columns ``c``) the backend turns the block
    into d loss / d logits in place, from the rows' norm, entropy, g_logp and g_ent (``rows``,
    complete for the block's tokens before ``step`` sees it); then two GEMMs:
    grad_hidden[r] (+)= block @ weight[c] and grad_weight[c] (+)= block.T @ hidden[r]. In token
    order (``plan.order == "tokens"``, c = all of V) grad_hidden's rows are written once and
    grad_weight is summed over the blocks; in vocabulary order (r = all N tokens) grad_weight's
    rows are written once and grad_hidden is summed. See ``op_plan.auto_order``.

    hidden, weight: in the op's dtype; each gradient comes out in its input's own dtype,
    ``dtypes`` = (hidden's, weight's, bias's or None for no bias gradient).
    """

    def __init__(
        self, plan: op_plan.Plan, hidden: Tensor, weight: Tensor, targets: Tensor, rows: RowData,
        dtypes: tuple[torch.dtype, torch.dtype, Optional[torch.dtype]], want_h: bool, want_w: bool,
    ) -> None:
        self.plan, self.hidden, self.weight, self.targets, self.rows = plan, hidden, weight, targets, rows
        n, vocab = hidden.shape[0], weight.shape[0]
        self.grad_h = hugepages.empty(hidden.shape, dtypes[0], hidden.device) if want_h else None
        self.grad_w = hugepages.empty(weight.shape, dtypes[1], weight.device) if want_w else None
        self.bias_dtype = dtypes[2]
        want_b = dtypes[2] is not None
        self.sum_b = torch.zeros(vocab, dtype=stat_dtype(hidden), device=hidden.device) if want_b else None
        if plan.order == "tokens":
            summed, n_blocks, float32 = self.grad_w, math.ceil(n / plan.chunk), plan.float32_weight_sum
        else:
            # grad_hidden's float32 buffer is only [N, H]; summed in bf16 over the slabs, its mean
            # error doubled in a trial of bench/accum_precision.py (6.2e-3 against 2.9e-3 over 19
            # slabs at 8192 tokens, H 1024, V 151936)
            summed, n_blocks, float32 = self.grad_h, math.ceil(vocab / plan.slab), True
        self.sum = None if summed is None else MatmulSum(summed, n_blocks, plan.backend, float32, plan.dtype)

    def step(self, logits: Tensor, r: slice, c: slice) -> None:
        """Turn logits [r, c] into their gradient in place and add its share to the results."""
        rows, g_ent = self.rows, self.rows.g_ent
        self.plan.backend.grad_logits(
            logits, self.targets[r], rows.norm[r], None if g_ent is None else rows.entropy[r],
            rows.g_logp[r], None if g_ent is None else g_ent[r], self.plan.inv_temp, logits,
            col_offset=c.start, softcap=self.plan.softcap,
        )
        h, w = self.hidden[r], self.weight[c]
        if self.plan.order == "tokens":
            if self.grad_h is not None:
                matmul_into(self.grad_h[r], logits, w, False, self.plan.backend)
            if self.sum is not None:
                self.sum.add(logits.t(), h)
        else:
            if self.grad_w is not None:
                matmul_into(self.grad_w[c], logits.t(), h, False, self.plan.backend)
            if self.sum is not None:
                self.sum.add(logits, w)
        if self.sum_b is not None:
            self.sum_b[c] += torch.sum(logits, dim=0, dtype=self.sum_b.dtype)

    def recompute(self, bias: Optional[Tensor], buffer: Tensor, after_stats: bool = False) -> None:
        """The whole pass in ``plan.order``: recompute each logits block (one GEMM), then ``step``.
        ``after_stats``: ``buffer`` holds the last block of a statistics pass (see ``blocks``)."""
        for logits, r, c in blocks(self.plan, self.hidden, self.weight, bias, buffer, after_stats):
            self.step(logits, r, c)

    def result(self) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """(grad_hidden, grad_weight, grad_bias), None where not wanted."""
        if self.sum is not None:
            self.sum.result()
        grad_b = None if self.sum_b is None else self.sum_b.to(self.bias_dtype)
        return self.grad_h, self.grad_w, grad_b
