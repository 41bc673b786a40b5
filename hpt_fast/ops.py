"""The fused linear + log-prob / entropy op, in two modes, never materialising [tokens x vocab].

Mode A, ``fused_token_logprobs``: per-token log-probabilities (and entropies) with autograd; the
backward recomputes the logits block by block (four GEMMs in all). Its forward and backward are
torch.library custom ops, so torch.compile takes it into a graph whole.

Mode B, ``fused_linear_loss``: a scalar sum of an arbitrary per-token loss of (logp, entropy); the
gradients for hidden, weight and bias are computed during the forward pass, block by block, and
backward only scales them (three GEMMs in all, or nearly four in vocabulary order, see below).

Two kinds of pass over blocks of logits, each block a GEMM into one reused buffer, in one of two
loop orders (``_blocks``): token chunks ``[C, V]`` of whole rows, or vocabulary slabs ``[N, Vs]``
of all N tokens, the GEMM's M dimension then being every token:
- the statistics pass (``_stats_pass``): a backend's ``row_stats`` merges each block into the
  rows' running softmax state, which gives per-row logp, log-sum-exp and entropy once all of V
  has been seen (mode A's forward; mode B, which then evaluates the per-token loss);
- the gradient pass (``_GradientPass``): ``grad_logits`` turns each block into its own gradient in
  place, then two GEMMs give its share of the input gradients. In token order grad_hidden's rows
  are written once and grad_weight [V, H] is summed over the blocks; in vocabulary order
  grad_weight's rows are written once and grad_hidden [N, H] is summed.
  Mode B's token order runs it on the statistics pass's blocks (three GEMMs); mode A's backward
  and mode B's vocabulary order recompute the logits, block for block as the statistics pass
  computed them.
For any per-token loss, d loss / d logits = (1/T) * [g_logp * (onehot - p) - g_ent * p * (log p + H)],
so the backends only ever need the two per-token scalars g_logp and g_ent.
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
import operator
import os
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from hpt_fast import backends, hugepages
from hpt_fast.backends import row_state

TokenLossFn = Callable[[Tensor, Optional[Tensor], Tensor], Tensor]
# (start, end, logits [end - start, V]) of one token chunk, see _stats_pass
ChunkHook = Callable[[int, int, Tensor], None]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# dtypes whose GEMM outputs are rounded below float32, so that a sum over blocks loses precision
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_FLOAT32_MAX = torch.finfo(torch.float32).max
_INT64_MIN, _INT64_MAX = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max
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
# GEMMs' time on an H200. On CPU a block is contiguous instead (``_Plan.row_align`` 1): torch 2.6's
# CPU GEMM wrote a strided one through a float32 copy of it (tests/test_memory.py's bf16 cases
# reached 0.25-0.30x of the naive logits there).
_ROW_ALIGN = 64
# A GEMM product bound for a wider sum leaves the CPU GEMM in pieces of this size (see _matmul_into).
_PIECE_BYTES = 8 * 2**20
# torch.mm / addmm with out_dtype (low-precision inputs, a float32 output; CUDA), from torch 2.8.
# Some builds of that era refused addmm into a float32 self with bf16 / fp16 matrices
# (pytorch#154086), so a device is trusted with them only after a trial (_float32_products).
_FLOAT32_OUT_GEMM = "dtype_out" in torch.ops.aten.addmm.overloads()


# Loop orders of the gradient pass (see _auto_order); "auto" lets the plan choose.
GRAD_ORDERS = ("auto", "tokens", "vocab")
# Device types whose torch.autocast the op follows (see _compute_dtype): those of its backends.
_AUTOCAST_DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class _Plan:
    """How one call runs.

    backend: the row-kernel module. dtype: the GEMMs' dtype (the inputs', or autocast's; see
        ``_compute_dtype``). inv_temp: 1 / temperature.
    chunk: tokens per logits block [chunk, V] in token order, and per call of mode B's
        token_loss_fn there (vocabulary order calls it once, on all tokens).
    slab: vocabulary columns per logits block [N, slab] in vocabulary order, N the scored tokens:
        at most ``chunk * V // N`` (at least 1), so the block holds no more elements than a
        [chunk, V] one; see ``_slab_width``.
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


def _check_inputs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    grad_order: str,
    accum_dtype: Optional[torch.dtype],
) -> None:
    """Raise a clear error for any tensor or option the op cannot take, before any work starts
    (the numbers: ``_scalar_args``).

    The dtype checks are on the dtypes the op computes in (``_compute_dtype``): under autocast,
    a float32 weight with bf16 activations is one bf16 op, as for ``F.linear``.
    """
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor{' or None' if name == 'bias' else ''}, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
        if t.is_meta:
            raise ValueError(f"{name} is on the meta device: it has no values to compute with")
        if is_traceable_wrapper_subclass(t):
            # a DTensor's GEMM would meet the op's plain buffers deep inside it, after work started
            raise TypeError(
                f"{name} is a {type(t).__name__}, a tensor subclass (FSDP2 and tensor parallelism shard "
                "parameters as DTensor): the op takes plain tensors; pass a DTensor's full_tensor(), or call "
                "the op where the module's parameters are unsharded"
            )
    autocast = _autocast_dtype(hidden.device)
    dtype = _compute_dtype(hidden, autocast)
    # under autocast the dtypes differ only where one is float64, which autocast does not cast
    why = "" if autocast is None else f" (under {autocast} autocast, which leaves float64 as it is)"
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16, float16 or float64, got {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., H], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H], got {tuple(weight.shape)}")
    if _compute_dtype(weight, autocast) != dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}{why}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"hidden size mismatch: hidden is {tuple(hidden.shape)} (H={hidden.shape[-1]}) but "
            f"weight is {tuple(weight.shape)} (H={weight.shape[1]})"
        )
    if weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(f"weight must have V >= 1 and H >= 1, got {tuple(weight.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 (or int32), got {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal hidden's leading shape "
            f"{tuple(hidden.shape[:-1])}"
        )
    devices = {hidden.device, weight.device, targets.device}
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V]=({weight.shape[0]},), got {tuple(bias.shape)}")
        if _compute_dtype(bias, autocast) != dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from weight dtype {weight.dtype}{why}")
        devices.add(bias.device)
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if grad_order not in GRAD_ORDERS:
        raise ValueError(f"grad_order must be one of {GRAD_ORDERS}, got {grad_order!r}")
    if accum_dtype not in (None, torch.float32, dtype):
        raise ValueError(
            f"accum_dtype must be torch.float32, None or the inputs' dtype ({dtype}), got {accum_dtype!r}"
        )


def _integer(value: object) -> Optional[int]:
    """``value`` as a Python int when it is an integer (a numpy one too), else None; never a bool
    or a tensor (whose reading would wait for its device)."""
    if isinstance(value, (bool, Tensor)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _scalar_args(
    temperature: float, ignore_index: int, chunk_size: Optional[int]
) -> tuple[float, int, Optional[int]]:
    """(temperature, ignore_index, chunk_size) as float, int and int or None, or a clear error.

    Any real number / integer is taken (numpy scalars included); tensors are not, since reading
    one on the host would wait for its device.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        # torch.compile traces a numpy scalar as a 0-d ndarray, which is no numbers.Real there
        hint = " (torch.compile traces numpy scalars as arrays: pass float(temperature))" if (
            type(temperature).__module__ == "numpy") else ""
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}{hint}")
    temperature = float(temperature)
    if not 0 < temperature < math.inf:  # NaN fails it too (comparisons, as torch.compile traces them)
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if 1.0 / temperature > _FLOAT32_MAX:
        # the kernels scale by 1 / T in float32: inf would turn every logit into inf or NaN
        raise ValueError(f"temperature must be at least 1 / {_FLOAT32_MAX:.4g} (its inverse is a float32), got {temperature}")
    index = _integer(ignore_index)
    if index is None:
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not _INT64_MIN <= index <= _INT64_MAX:
        raise ValueError(f"ignore_index must fit in int64, got {index}")
    if chunk_size is not None:
        size = _integer(chunk_size)
        if size is None or size < 1:
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        chunk_size = size
    return temperature, index, chunk_size


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """torch.autocast's dtype on ``device`` when autocast is on there (cpu, cuda), else None."""
    if device.type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _compute_dtype(t: Tensor, autocast: Optional[torch.dtype]) -> torch.dtype:
    """The dtype the op's GEMMs take ``t`` in: ``autocast`` (see ``_autocast_dtype``) for a
    floating-point tensor other than float64, as autocast casts ``F.linear``'s inputs (the usual
    mixed precision case: bf16 activations, float32 lm_head weight), else t's own.

    The op casts its inputs to it itself and gives each input its gradient in the input's own
    dtype: a float32 weight's gradient is summed over the logits blocks in float32 straight into
    it, with no rounding to bf16 in between (on CUDA; see ``_matmul_into``) and no bf16 gradient
    or float32 buffer beside it.
    """
    if autocast is not None and t.is_floating_point() and t.dtype != torch.float64:
        return autocast
    return t.dtype


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast disabled on ``device``: the op's GEMMs already run in the inputs' dtype, and its
    per-token math (row statistics, ``token_loss_fn``) is float32 by contract."""
    if device.type not in _AUTOCAST_DEVICES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def _valid_rows(targets: Tensor, ignore_index: int, vocab: int) -> Optional[Tensor]:
    """Flat indices of the non-ignored targets, or None when every position is valid.

    Raises for ids outside [0, V): the kernels index by them and must never read out of bounds.
    """
    # compared as int64: against int32 targets torch would wrap an ignore_index outside int32's
    # range onto a real id, dropping its positions without a word
    flat = targets.reshape(-1).long()
    valid = flat != ignore_index
    bad = valid & ((flat < 0) | (flat >= vocab))
    # both answers in one device-to-host read: each read waits for the device (a GPU profile
    # showed 50-150 us gaps around each of these checks before the first GEMM)
    any_bad, all_valid = torch.stack((bad.any(), valid.all())).tolist()
    if any_bad:
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"target id {int(flat[pos])} at flat position {pos} is outside [0, {vocab}) and is not "
            f"ignore_index ({ignore_index})"
        )
    if all_valid:
        return None
    return valid.nonzero().squeeze(1)


def _budget_bytes(n_rows: int, vocab: int) -> float:
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


def _auto_order(
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
    chunk's bf16 product passes through cache in pieces, see _matmul_into; on CUDA the GEMM adds
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


def _plan(
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
) -> _Plan:
    """Backend, block sizes, gradient order and sum precision for one call of mode ``mode`` ("A" or "B").

    ``dtype``: the GEMMs' dtype (default hidden's); ``weight_dtype``: the weight's own, that of
    its gradient (default ``dtype``).
    """
    dtype = hidden.dtype if dtype is None else dtype
    weight_dtype = dtype if weight_dtype is None else weight_dtype
    if dtype == torch.float64:
        # float64 is the reference / gradcheck dtype: only the readable backend computes in it
        if backend not in ("auto", "torch"):
            raise TypeError(f"backend {backend!r} takes float32, bfloat16 or float16; float64 runs on 'torch'")
        backend = "torch"
    name, module = backends.resolve(backend, hidden.device)
    budget = _budget_bytes(n_rows, vocab)
    if chunk_size is None:
        per_row = vocab * (dtype.itemsize + (_TORCH_BACKEND_EXTRA_BYTES if name == "torch" else 0))
        chunk_size = max(1, int(budget // per_row))
    chunk = max(1, min(chunk_size, n_rows))
    slab = _slab_width(vocab, max(1, chunk * vocab // max(n_rows, 1)))
    float32_weight_sum = weight_dtype in _LOW_PRECISION and accum_dtype == torch.float32
    if grad_order == "auto":
        grad_order = _auto_order(mode, float32_weight_sum, n_rows, vocab, hidden.shape[-1], chunk, budget)
    return _Plan(
        backend=module, dtype=dtype, inv_temp=1.0 / temperature, chunk=chunk, slab=slab, order=grad_order,
        float32_weight_sum=float32_weight_sum, row_align=_ROW_ALIGN if hidden.is_cuda else 1,
    )


def _slab_width(vocab: int, widest: int) -> int:
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


def _logits_block(h: Tensor, weight: Tensor, bias: Optional[Tensor], out: Tensor, backend: ModuleType) -> Tensor:
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


def _stat_dtype(hidden: Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _chunks(n: int, size: int):
    """(start, end) of consecutive ranges of ``size`` (the last one shorter) covering [0, n)."""
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _row_stride(cols: int, align: int) -> int:
    """Elements between the rows of a logits block ``cols`` wide: ``cols`` rounded up to a
    multiple of ``align`` (``_Plan.row_align``)."""
    return -(-cols // align) * align


def _block_buffer(plan: _Plan, hidden: Tensor, vocab: int) -> Tensor:
    """The flat logits buffer every block of one call is a view of: [chunk, V] or [N, slab],
    rows ``_row_stride`` apart."""
    align = plan.row_align
    numel = max(plan.chunk * _row_stride(vocab, align), hidden.shape[0] * _row_stride(plan.slab, align))
    return hugepages.empty((numel,), hidden.dtype, hidden.device)


def _block_view(buffer: Tensor, rows: int, cols: int, row_stride: int) -> Tensor:
    """A [rows, cols] view of the start of ``buffer``, rows ``row_stride`` >= cols apart."""
    return buffer[: rows * row_stride].view(rows, row_stride)[:, :cols]


@dataclass
class _RowData:
    """Per-token tensors of the N scored tokens, all [N], float32 (float64 for float64 inputs).

    logp, lse, entropy (None when not computed): the row statistics of the logits.
    g_logp, g_ent (None: no entropy term): d loss / d logp and d loss / d entropy, what the
    gradient pass turns into d loss / d logits.
    """

    logp: Optional[Tensor]
    lse: Tensor
    entropy: Optional[Tensor]
    g_logp: Optional[Tensor] = None
    g_ent: Optional[Tensor] = None

    @classmethod
    def empty(cls, hidden: Tensor, with_entropy: bool) -> "_RowData":
        """Uninitialised statistics for the rows of ``hidden`` [N, H]; no gradients yet."""
        logp = torch.empty(hidden.shape[0], dtype=_stat_dtype(hidden), device=hidden.device)
        return cls(logp, torch.empty_like(logp), torch.empty_like(logp) if with_entropy else None)

    def finish(self, r: slice, state: Tensor) -> None:
        """Set the statistics of rows ``r`` from their complete running state [len(r), 4]."""
        self.logp[r], self.lse[r], entropy = row_state.finish(state, self.entropy is not None, self.lse.dtype)
        if entropy is not None:
            self.entropy[r] = entropy


def _blocks(
    plan: _Plan, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], buffer: Tensor,
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
            yield _logits_block(hidden[s:e], weight, bias, out, plan.backend), slice(s, e), slice(0, vocab)
    else:
        slabs = list(_chunks(vocab, plan.slab))
        if not after_stats:
            slabs.reverse()
        for k, (v0, v1) in enumerate(slabs):
            out = _block_view(buffer, n, v1 - v0, _row_stride(v1 - v0, plan.row_align))
            if not (after_stats and k == 0):
                b = None if bias is None else bias[v0:v1]
                _logits_block(hidden, weight[v0:v1], b, out, plan.backend)
            yield out, slice(0, n), slice(v0, v1)


def _stats_pass(
    plan: _Plan,
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    rows: _RowData,
    buffer: Tensor,
    on_chunk: Optional[ChunkHook] = None,
) -> None:
    """Fill rows.logp / lse / entropy: one GEMM and one ``row_stats`` per block, in ``plan.order``.

    In token order each chunk's statistics are final after its block, and ``on_chunk(start, end,
    logits)``, when given, runs then, while the block still holds their logits [end - start, V]
    (mode B's token order turns the block into its gradient there). In vocabulary order the
    statistics are final after the last slab; ``on_chunk`` needs token order.
    """
    if on_chunk is not None and plan.order != "tokens":
        raise ValueError("on_chunk needs the statistics pass in token order")
    with_entropy = rows.entropy is not None
    state = row_state.empty(hidden.shape[0], hidden.device)
    for logits, r, c in _blocks(plan, hidden, weight, bias, buffer):
        plan.backend.row_stats(logits, targets[r], plan.inv_temp, with_entropy, state[r], col_offset=c.start)
        if plan.order == "tokens":
            rows.finish(r, state[r])
            if on_chunk is not None:
                on_chunk(r.start, r.stop, logits)
    if plan.order != "tokens":
        rows.finish(slice(0, hidden.shape[0]), state)


def _matmul_into(
    out: Tensor, a: Tensor, b: Tensor, add: bool, backend: ModuleType, scratch: Optional[Tensor] = None
) -> None:
    """``out = a @ b``, or ``out += a @ b`` with ``add``: a [M, K] and b [K, N] in the op's dtype,
    out [M, N] contiguous, in the same dtype or float32 / float64 (a float32 gradient under
    autocast, a float32 sum), float32 accumulation inside the GEMM either way.

    All float32 (on CPU with the cpu backend): the backend's oneDNN GEMM
    (``cpu_backend.gemm_into``). A wider float32 out on CUDA takes the product straight from cuBLAS (bf16 / fp16 inputs,
    float32 output; ``_float32_products``). Elsewhere (PyTorch's CPU GEMMs have no such output,
    nor has torch before 2.8) the product leaves the GEMM in a's dtype, ``_piece_rows`` rows of a
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
    elif out.dtype == torch.float32 and _float32_products(out.device, a.dtype):
        if add:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:
        rows = _piece_rows(b.shape[1], a.dtype)
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
def _float32_products(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch on ``device`` multiplies ``dtype`` matrices into a float32 output itself
    (``torch.mm`` / ``torch.addmm`` with ``out_dtype``, as ``_matmul_into`` calls them), tried
    once per device and dtype on a small product checked against float64. False where the
    overloads are missing (torch before 2.8), not implemented (CPU), raise or sum wrongly; the
    op then takes its products in ``dtype`` pieces, each rounded to ``dtype`` before it is added,
    as on CPU. Tried with ``a`` contiguous and transposed, as the gradient pass passes it."""
    if not _FLOAT32_OUT_GEMM or dtype not in _LOW_PRECISION:
        return False
    gen = torch.Generator().manual_seed(0)
    a, b, start = (torch.randn(shape, generator=gen) for shape in ((24, 40), (40, 16), (24, 16)))
    a, b, start = a.to(device, dtype), b.to(device, dtype), start.to(device)
    product = a.double() @ b.double()
    try:
        for lhs in (a, a.t().contiguous().t()):
            out = start.clone()
            torch.mm(lhs, b, out_dtype=torch.float32, out=out)
            if not torch.allclose(out.double(), product, rtol=1e-5, atol=1e-5):
                return False
            out.copy_(start)
            torch.addmm(out, lhs, b, out_dtype=torch.float32, out=out)
            if not torch.allclose(out.double(), start.double() + product, rtol=1e-5, atol=1e-5):
                return False
    except (RuntimeError, TypeError):  # a missing CPU kernel raises a RuntimeError subclass
        return False
    return True


def _piece_rows(cols: int, dtype: torch.dtype) -> int:
    """Rows of a product piece of ``cols`` columns in ``dtype`` that fill ``_PIECE_BYTES``."""
    return max(1, _PIECE_BYTES // (cols * dtype.itemsize))


class _MatmulSum:
    """out = the sum over blocks k of a_k @ b_k, into ``out`` (its dtype and shape), a_k and b_k
    in the op's dtype ``dtype``.

    The sum runs in ``out`` itself (beta = 1, float32 accumulation inside each GEMM) when out is
    float32 / float64, or low precision without ``float32``: then one rounding of the running
    sum to out's dtype per block. Low precision with ``float32`` and several blocks: the sum is
    kept in a float32 buffer of out's shape, rounded once at the end. Each block's product goes
    in through ``_matmul_into``, on CPU a piece at a time through one small scratch.
    """

    def __init__(self, out: Tensor, n_blocks: int, backend: ModuleType, float32: bool, dtype: torch.dtype) -> None:
        self.out, self.backend = out, backend
        buffered = float32 and out.dtype in _LOW_PRECISION and n_blocks > 1
        self.acc = hugepages.empty(out.shape, torch.float32, out.device) if buffered else out
        self.scratch = None
        if self.acc.dtype != dtype and not (
            self.acc.dtype == torch.float32 and _float32_products(self.acc.device, dtype)
        ):
            rows = min(_piece_rows(out.shape[1], dtype), out.shape[0])
            self.scratch = hugepages.empty((rows, out.shape[1]), dtype, out.device)
        self.first = True

    def add(self, a: Tensor, b: Tensor) -> None:
        _matmul_into(self.acc, a, b, not self.first, self.backend, self.scratch)
        self.first = False

    def result(self) -> Tensor:
        if self.first:  # no block at all
            self.out.zero_()
        elif self.acc is not self.out:
            self.out.copy_(self.acc)
        return self.out


class _GradientPass:
    """The input gradients of hidden [N, H], weight [V, H] and bias [V], built block by block.

    For each logits block (token rows ``r``, vocabulary columns ``c``) the backend turns the block
    into d loss / d logits in place, from the rows' lse, entropy, g_logp and g_ent (``rows``,
    complete for the block's tokens before ``step`` sees it); then two GEMMs:
    grad_hidden[r] (+)= block @ weight[c] and grad_weight[c] (+)= block.T @ hidden[r]. In token
    order (``plan.order == "tokens"``, c = all of V) grad_hidden's rows are written once and
    grad_weight is summed over the blocks; in vocabulary order (r = all N tokens) grad_weight's
    rows are written once and grad_hidden is summed. See ``_auto_order``.

    hidden, weight: in the op's dtype; each gradient comes out in its input's own dtype,
    ``dtypes`` = (hidden's, weight's, bias's or None for no bias gradient).
    """

    def __init__(
        self, plan: _Plan, hidden: Tensor, weight: Tensor, targets: Tensor, rows: _RowData,
        dtypes: tuple[torch.dtype, torch.dtype, Optional[torch.dtype]], want_h: bool, want_w: bool,
    ) -> None:
        self.plan, self.hidden, self.weight, self.targets, self.rows = plan, hidden, weight, targets, rows
        n, vocab = hidden.shape[0], weight.shape[0]
        self.grad_h = hugepages.empty(hidden.shape, dtypes[0], hidden.device) if want_h else None
        self.grad_w = hugepages.empty(weight.shape, dtypes[1], weight.device) if want_w else None
        self.bias_dtype = dtypes[2]
        want_b = dtypes[2] is not None
        self.sum_b = torch.zeros(vocab, dtype=_stat_dtype(hidden), device=hidden.device) if want_b else None
        if plan.order == "tokens":
            summed, n_blocks, float32 = self.grad_w, math.ceil(n / plan.chunk), plan.float32_weight_sum
        else:
            # grad_hidden's float32 buffer is only [N, H]; summed in bf16 over the slabs, its mean
            # error doubled in a trial of bench/accum_precision.py (6.2e-3 against 2.9e-3 over 19
            # slabs at 8192 tokens, H 1024, V 151936)
            summed, n_blocks, float32 = self.grad_h, math.ceil(vocab / plan.slab), True
        self.sum = None if summed is None else _MatmulSum(summed, n_blocks, plan.backend, float32, plan.dtype)

    def step(self, logits: Tensor, r: slice, c: slice) -> None:
        """Turn logits [r, c] into their gradient in place and add its share to the results."""
        rows, g_ent = self.rows, self.rows.g_ent
        self.plan.backend.grad_logits(
            logits, self.targets[r], rows.lse[r], None if g_ent is None else rows.entropy[r],
            rows.g_logp[r], None if g_ent is None else g_ent[r], self.plan.inv_temp, logits,
            col_offset=c.start,
        )
        h, w = self.hidden[r], self.weight[c]
        if self.plan.order == "tokens":
            if self.grad_h is not None:
                _matmul_into(self.grad_h[r], logits, w, False, self.plan.backend)
            if self.sum is not None:
                self.sum.add(logits.t(), h)
        else:
            if self.grad_w is not None:
                _matmul_into(self.grad_w[c], logits.t(), h, False, self.plan.backend)
            if self.sum is not None:
                self.sum.add(logits, w)
        if self.sum_b is not None:
            self.sum_b[c] += torch.sum(logits, dim=0, dtype=self.sum_b.dtype)

    def recompute(self, bias: Optional[Tensor], buffer: Tensor, after_stats: bool = False) -> None:
        """The whole pass in ``plan.order``: recompute each logits block (one GEMM), then ``step``.
        ``after_stats``: ``buffer`` holds the last block of a statistics pass (see ``_blocks``)."""
        for logits, r, c in _blocks(self.plan, self.hidden, self.weight, bias, buffer, after_stats):
            self.step(logits, r, c)

    def result(self) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """(grad_hidden, grad_weight, grad_bias), None where not wanted."""
        if self.sum is not None:
            self.sum.result()
        grad_b = None if self.sum_b is None else self.sum_b.to(self.bias_dtype)
        return self.grad_h, self.grad_w, grad_b


def _dtypes(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor]
) -> tuple[torch.dtype, torch.dtype, Optional[torch.dtype]]:
    """The inputs' own dtypes, those of their gradients (None: no bias)."""
    return hidden.dtype, weight.dtype, None if bias is None else bias.dtype


def _cast(dtype: torch.dtype, *tensors: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """The tensors in ``dtype``, contiguous: themselves when they already are (None stays None)."""
    return tuple(None if t is None else t.to(dtype).contiguous() for t in tensors)


def _refuse_double_backward() -> None:
    """Raise in a backward run with ``create_graph=True``: the op's gradients are computed by
    GEMMs into preallocated outputs, not by differentiable operations, so a second-order term
    would be silently missing."""
    if torch.is_grad_enabled():
        raise RuntimeError("the fused op is differentiable once: a backward with create_graph=True "
                           "(double backward, e.g. a gradient penalty) is not supported")


# Mode A is a pair of torch.library custom ops, its forward and its backward, joined by a
# registered autograd formula: torch.compile puts each in its graph as one node (fullgraph=True
# takes them), where an autograd.Function calling C++ / Triton could only break the graph. The
# forward takes the whole [..., H] batch and keeps its scored rows itself; it hands the backward
# their indices and statistics in tensors of the batch's size (no shape in a graph depends on
# the targets' values) and their count on the CPU, so the backward reads nothing from the device.
_MODE_A = "hpt_fast::token_logprobs"


@torch.library.custom_op(_MODE_A, mutates_args=())
def _token_logprobs(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, temperature: float,
    ignore_index: int, with_entropy: bool, backend: str, chunk_size: Optional[int], grad_order: str,
    accum_dtype: Optional[torch.dtype], dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Mode A's forward on checked arguments (``_checked_args``), ``dtype`` the GEMMs' dtype.

    Returns logp [...] and entropy [...] (or [0] without ``with_entropy``) at targets' shape, 0
    at ignored positions, float32 (float64 for float64 inputs); and for the backward, of the Nv
    scored positions among the n = targets.numel(): their statistics [1 or 2, n] (lse, then
    entropy, in the first Nv columns: the returned entropy may be edited by the caller), their
    flat indices int64 [n] (the first Nv entries), and int64 [3] on the CPU: (tokens per chunk,
    1 for vocabulary order, Nv), so that the backward recomputes the forward's blocks bit for bit.
    """
    h, t, index, plan = _prepare(
        hidden, weight, targets, bias, temperature, ignore_index, backend, chunk_size, "A", grad_order,
        accum_dtype, dtype,
    )
    with _autocast_off(h.device):
        h, w, b = _cast(plan.dtype, h, weight, bias)
        rows = _RowData.empty(h, with_entropy)
        _stats_pass(plan, h, w, b, t, rows, _block_buffer(plan, h, w.shape[0]))
    shape, n, n_scored = tuple(targets.shape), targets.numel(), h.shape[0]
    kept = [rows.lse] if rows.entropy is None else [rows.lse, rows.entropy]
    stats = rows.lse.new_zeros((len(kept), n))
    stats[:, :n_scored] = torch.stack(kept)
    scored = t.new_zeros(n)
    scored[:n_scored] = torch.arange(n, device=t.device) if index is None else index
    # outputs of their own: autograd forbids editing a custom op's output that is a view in place
    logp = _scatter_rows(rows.logp, index, n, shape).clone()
    entropy = _scatter_rows(rows.entropy, index, n, shape).clone() if with_entropy else logp.new_zeros(0)
    cut = torch.tensor([plan.chunk, plan.order == "vocab", n_scored], dtype=torch.int64)
    return logp, entropy, stats, scored, cut


@_token_logprobs.register_fake
def _token_logprobs_fake(hidden, weight, bias, targets, temperature, ignore_index, with_entropy, backend,
                         chunk_size, grad_order, accum_dtype, dtype):
    stat = _stat_dtype(hidden)
    logp = targets.new_empty(targets.shape, dtype=stat)
    entropy = targets.new_empty(targets.shape if with_entropy else (0,), dtype=stat)
    stats = targets.new_empty((2 if with_entropy else 1, targets.numel()), dtype=stat)
    scored = targets.new_empty((targets.numel(),), dtype=torch.int64)
    return logp, entropy, stats, scored, torch.empty(3, dtype=torch.int64, device="cpu")


@torch.library.custom_op(f"{_MODE_A}_backward", mutates_args=())
def _token_logprobs_backward(
    g_logp: Tensor, g_ent: Optional[Tensor], hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
    targets: Tensor, stats: Tensor, scored: Tensor, cut: Tensor, temperature: float, backend: str,
    accum_dtype: Optional[torch.dtype], dtype: torch.dtype, want: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """Mode A's backward: the gradients of hidden, weight and bias (``want``: which), each in its
    input's dtype, [0] where not wanted; g_logp [...] and g_ent [...] or None (no entropy term)
    at targets' shape, stats, scored and cut from the forward."""
    chunk, vocab_order, n_scored = cut.tolist()
    index = None if n_scored == targets.numel() else scored[:n_scored]
    h, t = _gather_valid(hidden, targets, index)
    order = "vocab" if vocab_order else "tokens"
    plan = _plan("A", backend, hidden, weight.shape[0], h.shape[0], chunk, temperature, order, accum_dtype, dtype,
                 weight.dtype)
    lse, entropy = stats[0, :n_scored], (stats[1, :n_scored] if stats.shape[0] > 1 else None)
    g_logp = _gather_rows(g_logp.reshape(-1).to(lse.dtype), index)
    g_ent = None if g_ent is None or entropy is None else _gather_rows(g_ent.reshape(-1).to(lse.dtype), index)
    want_h, want_w, want_b = want
    dtypes = _dtypes(hidden, weight, bias if want_b else None)
    with _autocast_off(h.device):
        h, w, b = _cast(plan.dtype, h, weight, bias)
        grads = _GradientPass(plan, h, w, t, _RowData(None, lse, entropy, g_logp, g_ent), dtypes, want_h, want_w)
        grads.recompute(b, _block_buffer(plan, h, w.shape[0]))
    grad_h, grad_w, grad_b = grads.result()
    if grad_h is not None:
        grad_h = _scatter_rows(grad_h, index, targets.numel(), tuple(hidden.shape))
    likes = _gradient_likes(hidden, weight, bias, stats)
    return tuple(x.new_empty(0) if g is None else g for g, x in zip((grad_h, grad_w, grad_b), likes))


def _gradient_likes(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], stats: Tensor) -> tuple[Tensor, ...]:
    """The tensors whose shape, dtype and device mode A's three gradients take (an empty one of
    that dtype where not wanted): hidden, weight and bias, or stats when there is no bias."""
    return hidden, weight, stats if bias is None else bias


@_token_logprobs_backward.register_fake
def _token_logprobs_backward_fake(g_logp, g_ent, hidden, weight, bias, targets, stats, scored, cut, temperature,
                                  backend, accum_dtype, dtype, want):
    likes = _gradient_likes(hidden, weight, bias, stats)
    return tuple(x.new_empty(x.shape if w else (0,)) for x, w in zip(likes, want))


def _token_logprobs_setup(ctx, inputs, output) -> None:
    hidden, weight, bias, targets, temperature, _, _, backend, _, _, accum_dtype, dtype = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, *output[2:])
    ctx.args = (temperature, backend, accum_dtype, dtype)
    # an output that no loss uses gets None, not zeros: an unused entropy adds no term
    ctx.set_materialize_grads(False)


def _token_logprobs_grad(ctx, g_logp, g_ent, *_g_saved):
    _refuse_double_backward()
    hidden, weight, bias, targets, stats, scored, cut = ctx.saved_tensors
    want = [bool(w) for w in ctx.needs_input_grad[:3]]
    want[2] = want[2] and bias is not None
    if g_logp is None:
        g_logp = stats.new_zeros(targets.shape)
    grads = _token_logprobs_backward(g_logp, g_ent, hidden, weight, bias, targets, stats, scored, cut, *ctx.args, want)
    return (*(g if w else None for g, w in zip(grads, want)), *([None] * 9))


_token_logprobs.register_autograd(_token_logprobs_grad, setup_context=_token_logprobs_setup)


_DETACHED_LOSS_WARNING = (
    "token_loss_fn returned losses with no autograd graph back to its logp / entropy arguments "
    "(detached, or computed outside torch): they are constant, so the input gradients are zero"
)


def _pack_saved(t: Tensor) -> tuple[Tensor, int]:
    return t, t._version


def _unpack_saved(packed: tuple[Tensor, int]) -> Tensor:
    t, version = packed
    if t._version != version:
        # what autograd itself reports when no hook is installed
        raise RuntimeError("token_loss_fn modified in place a tensor that its loss's gradient needs")
    return t


def _own_saved_tensors() -> contextlib.AbstractContextManager:
    """Saved-tensor hooks that keep token_loss_fn's tensors as they are. The caller's hooks are for
    its own graph; this one is built and differentiated here, chunk by chunk, so under a
    non-reentrant ``torch.utils.checkpoint`` each of its unpacks would rerun the whole checkpointed
    region (once per chunk, in the forward), and ``save_on_cpu`` would copy every chunk's tensors."""
    return torch.autograd.graph.saved_tensors_hooks(_pack_saved, _unpack_saved)


# per-token status codes of _token_loss_grads
_LOGITS_NOT_FINITE = 1
_LOSS_NOT_FINITE = 2


def _token_loss_grads(
    token_loss_fn: TokenLossFn, logp: Tensor, entropy: Optional[Tensor], rows: Tensor, differentiate: bool
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Tensor]:
    """Evaluate the per-token loss on one chunk and, with ``differentiate``, differentiate it
    w.r.t. logp and entropy.

    Returns (losses [C], g_logp [C] or None, g_ent [C] or None) in logp's dtype, and status [C]
    uint8: ``_LOGITS_NOT_FINITE`` where logp or entropy already was (NaN / inf logits), else
    ``_LOSS_NOT_FINITE`` where the loss or a gradient is, else 0. The caller checks it once per
    call of the op, not per chunk: reading it on the host waits for the device. Without
    ``differentiate`` (no input gradient wanted) there is no gradient to compute or check.
    """
    with torch.enable_grad() if differentiate else contextlib.nullcontext(), _own_saved_tensors():
        lp = logp.detach().requires_grad_(differentiate)
        ent = None if entropy is None else entropy.detach().requires_grad_(differentiate)
        # copies, not the leaves: the function may work on its inputs in place, as on any tensor
        try:
            losses = token_loss_fn(lp.clone(), None if ent is None else ent.clone(), rows)
        except (TypeError, AttributeError) as exc:
            if ent is not None or "NoneType" not in str(exc):
                raise
            raise type(exc)(f"token_loss_fn raised {type(exc).__name__}: {exc} (its entropy argument is "
                            "None: pass with_entropy=True for a loss that uses it)") from exc
        if not isinstance(losses, Tensor):
            raise TypeError(f"token_loss_fn must return a Tensor, got {type(losses).__name__}")
        if tuple(losses.shape) != tuple(lp.shape):
            raise ValueError(
                f"token_loss_fn must return per-token losses of shape {tuple(lp.shape)}, "
                f"got {tuple(losses.shape)}"
            )
        if not losses.is_floating_point():
            raise TypeError(f"token_loss_fn must return a float tensor, got {losses.dtype}")
        inputs = [lp] if ent is None else [lp, ent]
        grads = (None, None)
        losses = losses.to(lp.dtype)
        if differentiate and losses.requires_grad:
            grads = torch.autograd.grad(losses.sum(), inputs, allow_unused=True)
        if differentiate and all(g is None for g in grads):
            # e.g. built from .item() / .tolist() / numpy, or detached (a graph through other
            # tensors only): constant in logp / entropy, so zero gradients, which is legitimate
            # but more often a mistake than meant
            warnings.warn(_DETACHED_LOSS_WARNING, stacklevel=2)
    g_logp = None
    if differentiate:
        g_logp = torch.zeros_like(logp) if grads[0] is None else grads[0]
    g_ent = grads[1] if len(grads) > 1 else None
    loss_ok = torch.isfinite(losses)
    for g in (g_logp, g_ent):
        if g is not None:
            loss_ok &= torch.isfinite(g)
    logits_ok = torch.isfinite(logp) if entropy is None else torch.isfinite(logp) & torch.isfinite(entropy)
    status = torch.where(logits_ok, torch.where(loss_ok, 0, _LOSS_NOT_FINITE), _LOGITS_NOT_FINITE)
    return losses.detach(), g_logp, g_ent, status.to(torch.uint8)


def _check_finite(status: Tensor, rows: Tensor) -> None:
    """Raise FloatingPointError naming the first rows (indices into the flat targets) whose logits
    or token_loss_fn value or gradient were not finite; status: [N] uint8 from _token_loss_grads,
    rows: [N] int64. Non-finite logits are named as the cause first: the loss of a NaN logp is
    NaN whatever token_loss_fn does."""
    if not bool(status.any()):
        return
    for code, what in (
        (_LOGITS_NOT_FINITE, "the logits are not finite (NaN / inf in hidden, weight or bias, or a "
                             "float16 overflow), so logp / entropy are not,"),
        (_LOSS_NOT_FINITE, "token_loss_fn returned a non-finite loss or gradient"),
    ):
        bad = rows[status == code]
        if bad.numel():
            raise FloatingPointError(
                f"{what} for token rows {bad[:8].tolist()}{'...' if bad.numel() > 8 else ''}"
            )


class _LinearLoss(torch.autograd.Function):
    """Mode B on valid rows only: the loss and its input gradients in one pass over token chunks
    (token order), or a statistics pass, the loss, then a gradient pass, both over vocabulary
    slabs (vocabulary order; see ``_auto_order``)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, index, token_loss_fn, plan: _Plan, with_entropy: bool):
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        dtypes = _dtypes(hidden, weight, bias if want_b else None)
        hidden, weight, bias = _cast(plan.dtype, hidden, weight, bias)  # the GEMMs' dtype
        rows = _RowData.empty(hidden, with_entropy)
        rows.g_logp = torch.empty_like(rows.lse)
        rows.g_ent = torch.empty_like(rows.lse) if with_entropy else None
        total = rows.lse.new_zeros(())
        status = torch.empty(hidden.shape[0], dtype=torch.uint8, device=hidden.device)
        buffer = _block_buffer(plan, hidden, weight.shape[0])
        grads = None
        if want_h or want_w or dtypes[2] is not None:
            grads = _GradientPass(plan, hidden, weight, targets, rows, dtypes, want_h, want_w)

        def chunk_loss(s: int, e: int) -> None:
            ent = None if rows.entropy is None else rows.entropy[s:e]
            losses, g_logp, g_ent, status[s:e] = _token_loss_grads(
                token_loss_fn, rows.logp[s:e], ent, index[s:e], grads is not None
            )
            total.add_(losses.sum())
            if grads is None:
                return
            rows.g_logp[s:e] = g_logp
            if rows.g_ent is not None:
                # a loss that ignores the entropy has no gradient for it
                rows.g_ent[s:e] = 0.0 if g_ent is None else g_ent

        if plan.order == "tokens":
            def on_chunk(s: int, e: int, logits: Tensor) -> None:
                chunk_loss(s, e)
                if grads is not None:
                    grads.step(logits, slice(s, e), slice(0, logits.shape[1]))

            _stats_pass(plan, hidden, weight, bias, targets, rows, buffer, on_chunk)
        else:
            _stats_pass(plan, hidden, weight, bias, targets, rows, buffer)
            # every token's statistics are ready: one call on all of them (per-token tensors
            # only), where chunk-sized calls cost the GPU an idle launch gap each; none on no
            # token at all, as in token order
            if hidden.shape[0]:
                chunk_loss(0, hidden.shape[0])
            if grads is not None:
                grads.recompute(bias, buffer, after_stats=True)
        saved = (None, None, None) if grads is None else grads.result()
        # one host sync per call, after all the work (the gradients' final rounding included) is
        # queued, so the device does not wait on the host for it; nothing is returned before it
        _check_finite(status, index)
        ctx.save_for_backward(*saved)
        ent_out = rows.logp.new_zeros(0) if rows.entropy is None else rows.entropy
        ctx.mark_non_differentiable(rows.logp, ent_out)
        return total, rows.logp, ent_out

    @staticmethod
    @torch.compiler.disable
    def backward(ctx, grad_loss, _g_logp, _g_ent):
        _refuse_double_backward()
        # Saved tensors, so autograd frees the [V, H] gradient right after backward. They are
        # handed out, not copied (a copy would cost the memory the op saves), and autograd may
        # make one a parameter's .grad through a view without copying it: adding into that .grad
        # in place (a later backward, zero_grad without set_to_none) changes the saved tensor,
        # which autograd's version check then reports here.
        if hasattr(ctx, "private"):
            grads = ctx.private
        else:
            try:
                grads = ctx.saved_tensors
            except RuntimeError as err:
                raise RuntimeError(
                    "fused_linear_loss: backward through a retained graph after the gradient it handed "
                    "out was changed in place (accumulated into or zeroed as .grad, or edited by the "
                    f"caller); call the op again for another backward ({err})"
                ) from None
            if getattr(ctx, "handed_out", False):
                # a backward through a retained graph after the saved tensors were handed out:
                # they are .grad now and will be added into, so the gradients come from a private
                # copy from here on, taken while the check above vouches for them (one gradient's
                # memory, for repeated backwards only)
                ctx.private = tuple(None if g is None else g.clone() for g in grads)
                grads = ctx.private
        scale = float(grad_loss) != 1.0
        if scale or hasattr(ctx, "private"):
            # new tensors, never the saved or private ones (a 0-d float32 factor: bf16 / fp16
            # gradients are scaled in float32, then rounded)
            grads = tuple(None if g is None else (g * grad_loss if scale else g.clone()) for g in grads)
        else:
            ctx.handed_out = True
        return (*grads, None, None, None, None, None)


def _scatter_rows(values: Tensor, index: Optional[Tensor], n_total: int, shape: tuple) -> Tensor:
    """Place per-valid-row values [Nv, ...] back at their rows of [n_total, ...], reshaped to
    ``shape`` (0 elsewhere)."""
    if index is None:
        return values.reshape(shape)
    full = values.new_zeros((n_total, *values.shape[1:]))
    return full.index_copy(0, index, values).reshape(shape)


def _gather_rows(values: Tensor, index: Optional[Tensor]) -> Tensor:
    """The rows ``index`` of values [n, ...] (all of them, contiguous, when index is None)."""
    return values.contiguous() if index is None else values.index_select(0, index)


def _gather_valid(hidden: Tensor, targets: Tensor, index: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """hidden [..., H] -> [Nv, H] and targets [...] -> int64 [Nv] of the scored positions ``index``
    (differentiable: autograd scatters mode B's grad_hidden back)."""
    return _gather_rows(hidden.reshape(-1, hidden.shape[-1]), index), _gather_rows(targets.reshape(-1).long(), index)


def _checked_args(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    temperature: float,
    ignore_index: int,
    backend: str,
    chunk_size: Optional[int],
    grad_order: str,
    accum_dtype: Optional[torch.dtype],
) -> tuple[float, int, Optional[int], torch.dtype]:
    """Check every argument that can be checked without reading a tensor's values (which would
    wait for its device; the target ids are checked by ``_prepare``), before any work starts.

    Returns (temperature, ignore_index, chunk_size) as float, int and int or None, and the GEMMs'
    dtype, the one autocast would give ``F.linear`` (see ``_compute_dtype``). Runs under
    torch.compile's tracing too: everything here is decided by shapes, dtypes and devices.
    """
    temperature, ignore_index, chunk_size = _scalar_args(temperature, ignore_index, chunk_size)
    _check_inputs(hidden, weight, targets, bias, grad_order, accum_dtype)
    backends.check_name(backend)
    return temperature, ignore_index, chunk_size, _compute_dtype(hidden, _autocast_dtype(hidden.device))


def _prepare(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    temperature: float,
    ignore_index: int,
    backend: str,
    chunk_size: Optional[int],
    mode: str,
    grad_order: str,
    accum_dtype: Optional[torch.dtype],
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Optional[Tensor], _Plan]:
    """Check the target ids, keep the scored rows and plan the blocks for mode ``mode`` ("A" /
    "B"), the GEMMs in ``dtype``; the other arguments as ``_checked_args`` returned them.

    Returns (hidden [N, H] in its own dtype (the callers cast it) and targets [N] int64 of the N
    non-ignored positions, their flat indices or None when none is ignored, the plan).
    """
    index = _valid_rows(targets, ignore_index, weight.shape[0])
    h, t = _gather_valid(hidden, targets, index)
    plan = _plan(
        mode, backend, hidden, weight.shape[0], h.shape[0], chunk_size, temperature, grad_order, accum_dtype,
        dtype, weight.dtype,
    )
    return h, t, index, plan


def fused_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    grad_order: str = "auto",
    accum_dtype: Optional[torch.dtype] = torch.float32,
) -> tuple[Tensor, Optional[Tensor]]:
    """Per-token log-probabilities (and entropies) of ``targets`` under softmax(logits / T).

    Args:
        hidden: [..., H] float32 / bfloat16 / float16 (float64 for reference checks: torch backend).
        weight: [V, H], the same dtype and device as ``hidden``. Under ``torch.autocast`` for
            hidden's device type (cpu, cuda), the GEMMs take hidden, weight and bias in the
            autocast dtype, as ``F.linear`` would (float64 excepted), so float32 weights with
            bf16 activations work; each gradient comes back in its input's own dtype, a float32
            weight's summed over the logits blocks in float32 straight into it (on CUDA no
            block's product is rounded to bf16; on CPU each is, as any CPU bf16 GEMM's output),
            so mode B needs no float32 buffer and keeps token order. Inside, the op runs with
            autocast off.
        targets: [...] int64, the leading shape of ``hidden``; ids in [0, V) or ``ignore_index``.
        bias: [V] or None. Logits are ``(hidden @ weight.T + bias) / temperature``.
        temperature: finite, > 0, with 1 / temperature a finite float32 (T >= about 2.9e-39).
        ignore_index: positions with this target give logp = 0, entropy = 0 and no gradient.
        return_entropy: also return the entropy of each position's distribution.
        backend: "auto" (triton on CUDA, cpu elsewhere, torch as fallback), "torch", "cpu", "triton".
        chunk_size: tokens per logits block [chunk_size, V]; by default chosen from a memory
            budget for the block: ``HPT_FAST_MEMORY_BUDGET_MB`` MiB when set, else 1/12 of the
            naive float32 logits of the N scored tokens, within 128 MiB - 1 GiB. Vocabulary
            order uses blocks [N, slab] of the N scored tokens instead, slab at most
            ``chunk_size * V // N`` (at least one column): no more elements.
        grad_order: loop order of the forward's statistics pass and the backward's gradient
            pass alike: "tokens" (over token chunks, summing grad_weight over them), "vocab"
            (over vocabulary slabs of all tokens, summing grad_hidden) or "auto": "vocab" when
            there are fewer scored tokens than V (the smaller sum, the larger GEMMs). Both run
            four GEMMs; the choice changes speed and memory, not the result beyond rounding.
        accum_dtype: how grad_weight is summed over token chunks (token order, more than one
            chunk) when the inputs are bfloat16 / float16. ``torch.float32`` (default): in a
            float32 [V, H] buffer, rounded once at the end. ``None`` or the inputs' dtype: each
            chunk's GEMM adds into grad_weight itself (float32 inside the GEMM), rounding the
            running sum once per chunk, as Liger's fused linear cross-entropy (its default
            ``accum_dtype=None``) and cut-cross-entropy's CUDA kernel do: no buffer, and no pass
            over it. On CPU each chunk's product leaves the GEMM in bf16 either way, and that
            rounding dominates: measured at H 1024, V 151936, the mean error of grad_weight is
            the same at 2048 tokens (5 chunks) and about 1% larger at 8192 (7 chunks; 5% at 19
            chunks under an earlier budget)
            (``bench/results_accum_precision_cpu.md``). On CUDA the float32 sum takes each
            chunk's product in float32 (cuBLAS, bf16 inputs, float32 output), so no chunk is
            rounded to bf16 before the end. Vocabulary order's grad_hidden sum is
            always float32 (its buffer is [N, H]); float32 / float64 inputs always sum in their
            own dtype.
    Returns:
        logp: float32 [...] (<= 0), entropy: float32 [...] or None. Both differentiable w.r.t.
        hidden, weight and bias; the backward recomputes the logits block by block. Under
        torch.compile the forward and the backward are one graph node each (custom ops
        ``hpt_fast::token_logprobs`` and ``hpt_fast::token_logprobs_backward``), so
        ``fullgraph=True`` takes the op.
    """
    temperature, ignore_index, chunk_size, dtype = _checked_args(
        hidden, weight, targets, bias, temperature, ignore_index, backend, chunk_size, grad_order, accum_dtype
    )
    logp, entropy, *_ = _token_logprobs(
        hidden, weight, bias, targets, temperature, ignore_index, bool(return_entropy), backend, chunk_size,
        grad_order, accum_dtype, dtype,
    )
    return logp, (entropy if return_entropy else None)


@torch.compiler.disable
def fused_linear_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    token_loss_fn: TokenLossFn,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    grad_order: str = "auto",
    accum_dtype: Optional[torch.dtype] = torch.float32,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Sum over tokens of ``token_loss_fn(logp, entropy, rows)``, gradients computed in the forward.

    Args:
        hidden, weight, targets, bias, temperature, ignore_index, backend, chunk_size: as in
            ``fused_token_logprobs``.
        token_loss_fn: ``(logp [C] float32, entropy [C] float32 or None, rows [C] int64) ->
            losses [C]``, called on the non-ignored tokens only, chunk by chunk in token order
            and once on all of them in vocabulary order (never on zero tokens); ``rows`` are
            their indices into ``targets.reshape(-1)``. It is differentiated w.r.t. logp and
            entropy only, and only when an input gradient is wanted: any other tensor it uses is
            treated as a constant, and losses with no autograd graph back to logp / entropy
            give zero gradients with a warning. A non-finite loss or gradient raises
            FloatingPointError naming the rows, before the op returns; so do non-finite logits
            (NaN / inf inputs, a float16 overflow), named as the cause.
        with_entropy: compute the entropy and pass it to ``token_loss_fn``.
        grad_order: "tokens": one pass over token chunks computes the loss and the gradients
            (three GEMMs); "vocab": a statistics pass, then a gradient pass, both over
            vocabulary slabs of all tokens (four GEMMs less one slab's logits GEMM, which the
            gradient pass takes from the statistics pass), whose grad_weight needs no float32
            [V, H] buffer in bfloat16 / float16; "auto": "vocab" only when that buffer (low
            precision with ``accum_dtype=torch.float32``, several chunks) would exceed the block
            budget (see ``fused_token_logprobs``' chunk_size) if that is at most 128 MiB, or a
            quarter of a larger one, and there are fewer scored tokens than V, else "tokens".
        accum_dtype: as in ``fused_token_logprobs``. ``None`` keeps bfloat16 / float16 mode B in
            token order (three GEMMs) at the memory of one logits block.
    Returns:
        loss: float32 scalar, differentiable w.r.t. hidden, weight and bias (under
        ``torch.no_grad`` / ``inference_mode`` the op computes the loss only, no gradients);
        logp: float32 [...] detached (0 at ignored positions); entropy: float32 [...] detached, or None.
    """
    if not callable(token_loss_fn):
        raise TypeError(f"token_loss_fn must be callable, got {type(token_loss_fn).__name__}")
    temperature, ignore_index, chunk_size, dtype = _checked_args(
        hidden, weight, targets, bias, temperature, ignore_index, backend, chunk_size, grad_order, accum_dtype
    )
    h, t, index, plan = _prepare(
        hidden, weight, targets, bias, temperature, ignore_index, backend, chunk_size, "B", grad_order,
        accum_dtype, dtype,
    )
    w, b = weight, bias
    if not torch.is_grad_enabled():
        # autograd records nothing (no_grad, inference_mode), yet needs_input_grad follows
        # requires_grad: detached, the forward skips the gradient pass (an evaluation loss)
        h, w, b = h.detach(), w.detach(), None if b is None else b.detach()
    shape, n_total = tuple(targets.shape), targets.numel()
    rows = index if index is not None else torch.arange(n_total, device=hidden.device)
    with _autocast_off(h.device):
        loss, logp, entropy = _LinearLoss.apply(h, w, b, t, rows, token_loss_fn, plan, with_entropy)
    logp = _scatter_rows(logp, index, n_total, shape)
    return loss, logp, (_scatter_rows(entropy, index, n_total, shape) if with_entropy else None)
