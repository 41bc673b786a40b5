"""Row kernels in Triton: the default backend on CUDA GPUs.

Same functions, signatures and semantics as ``torch_backend`` (see its docstrings), each a launch
of the kernels in ``hpt_fast.kernels``. Importing this module raises ImportError when Triton is
missing. On CPU tensors the kernels run only under the Triton interpreter (TRITON_INTERPRET=1
set before Triton is imported), which is how they are tested without a GPU.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re

import torch
import triton
from torch import Tensor

from ..kernels import grad_logits_kernel, row_stats_combine_kernel, row_stats_kernel
from . import row_state

# Interpreters before Triton 3.3 (those torch 2.4-2.6 pin) run these kernels to wrong values or
# NaN on the CPU (measured with 3.0, 3.1 and 3.2; 3.3.1 and 3.9 pass the tests): refuse, not mislead.
_MIN_INTERPRETER = (3, 3)


def _check_interpreter(version: str, interpreted: bool) -> None:
    """Raise ImportError when the kernels would run under a Triton interpreter older than
    ``_MIN_INTERPRETER``; ``version``: triton.__version__, ``interpreted``: TRITON_INTERPRET=1."""
    found = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if interpreted and found < _MIN_INTERPRETER:
        raise ImportError(
            f"the Triton interpreter (TRITON_INTERPRET=1) computes these kernels wrongly before Triton "
            f"{'.'.join(map(str, _MIN_INTERPRETER))}; found {version} (pip install 'triton>=3.3' to test "
            "the triton backend on the CPU)"
        )


_check_interpreter(triton.__version__, os.environ.get("TRITON_INTERPRET", "0") == "1")

# Tile widths and warps, from bench/row_kernel_sweep.py on an H200 (8192 bf16 rows of 21760 and
# 151936 columns, bench/results_gpu_h200_row_kernels.md): row_stats streams fastest with wide
# tiles and 4 warps (8192 columns: 187 / 856 us, against 226 / 1094 us at the earlier 4096 and
# 8 warps); grad_logits is level from 1024 to 4096 columns at 4 or 8 warps (2048 and 8: 264 /
# 1467 us, 3.4 TB/s on whole rows).
_STATS_MAX_BLOCK_V = 8192
_STATS_WARPS = 4
_GRAD_MAX_BLOCK_V = 2048
_MIN_BLOCK_V = 128
# Splitting a row over several programs pays off while there are fewer rows than this many
# programs per SM: a memory-bound stream needs several resident programs per SM to hide latency.
_PROGRAMS_PER_SM = 4
# SM count assumed off CUDA (interpreter runs), that of an H100 SXM.
_DEFAULT_SMS = 132
# Every launch passes enable_fp_fusion=False: fused into an FMA, z - m with z = x * inv_temp
# skips the product's rounding, so z - max(z) is not 0 at the maximum (a one-column row then had
# entropy 7e-9 on an H200, not 0) and z_t <= m no longer holds bit for bit.


def row_stats(
    logits: Tensor,
    targets: Tensor,
    inv_temp: float,
    with_entropy: bool,
    state: Tensor,
    col_offset: int = 0,
    softcap: float | None = None,
    with_sums: bool = False,
) -> Tensor:
    """Merge one logits block into the rows' running softmax state (see ``row_state``).

    Args:
        logits: [C, Vs] float32 / bfloat16 / float16, unit column stride, the raw logits of
            vocabulary ids ``col_offset .. col_offset + Vs - 1``.
        targets: [C] int64 in [0, V); a target outside the block's columns is never an address.
        inv_temp: 1 / temperature.
        with_entropy: whether to keep s1, which only the entropy needs.
        state: [C, 6] float64, contiguous, updated in place.
        col_offset: vocabulary id of the block's first column, >= 0.
        softcap: None, or the soft cap c > 0 (the logits become c * tanh(logits / c)).
        with_sums: whether to keep s2 and sz, which only ``row_state.logit_sums`` needs.
    Returns:
        ``state``.
    """
    n_rows, vocab = logits.shape
    block_v = _block(vocab, _STATS_MAX_BLOCK_V)
    return _row_stats(
        logits, targets, inv_temp, with_entropy, state, col_offset, block_v,
        _split_size(n_rows, vocab, block_v, logits.device), softcap=softcap, with_sums=with_sums,
    )


def grad_logits(
    logits: Tensor,
    targets: Tensor,
    norm: Tensor,
    entropy: Tensor | None,
    g_logp: Tensor,
    g_ent: Tensor | None,
    inv_temp: float,
    out: Tensor,
    col_offset: int = 0,
    softcap: float | None = None,
) -> Tensor:
    """Write d loss / d logits of one block into ``out``.

    Args:
        logits: [C, Vs] float32 / bfloat16 / float16, the raw (untempered) logits of vocabulary
            ids ``col_offset .. col_offset + Vs - 1``, unit column stride.
        targets: [C] int64 in [0, V); one outside the block's columns adds no one-hot term here.
        norm: [C, 2] float32, the whole rows' log-sum-exp as (m, log s) (``row_state.finish``);
            entropy: [C] float32 or None.
        g_logp: [C] float32; g_ent: [C] float32 or None (no entropy term).
        inv_temp: 1 / temperature.
        out: [C, Vs], any float dtype, unit column stride; may be ``logits`` itself (in place).
        col_offset: vocabulary id of the block's first column, >= 0.
        softcap: None, or the soft cap c > 0: d is also multiplied by 1 - tanh(logits / c) ** 2.
    Returns:
        ``out``.
    """
    return _grad_logits(
        logits, targets, norm, entropy, g_logp, g_ent, inv_temp, out, col_offset,
        _block(logits.shape[1], _GRAD_MAX_BLOCK_V), softcap=softcap,
    )


def accumulate_(acc: Tensor, x: Tensor) -> Tensor:
    """acc += x, with ``acc`` float32 and ``x`` any float dtype of the same shape.

    torch's in-place add already converts ``x`` inside its single elementwise kernel, reading
    each operand once, so a Triton kernel would bring nothing.
    """
    return acc.add_(x)


def _grad_logits(
    logits: Tensor, targets: Tensor, norm: Tensor, entropy: Tensor | None, g_logp: Tensor,
    g_ent: Tensor | None, inv_temp: float, out: Tensor, col_offset: int, block_v: int,
    num_warps: int | None = None, *, softcap: float | None = None,
) -> Tensor:
    """``grad_logits`` with explicit tiling: BLOCK_V ``block_v`` (a power of two) and
    ``num_warps`` warps per program (default: ``_warps(block_v)``)."""
    _check_columns(logits, "logits")
    _check_columns(out, "out")
    n_rows, vocab = logits.shape
    if n_rows == 0:
        return out
    has_ent = g_ent is not None
    targets, g_logp = targets.contiguous(), g_logp.contiguous()
    m, log_s = norm[:, 0].contiguous(), norm[:, 1].contiguous()
    # without the entropy term the kernel never reads these pointers; any float32 tensor will do
    entropy = entropy.contiguous() if has_ent else g_logp
    g_ent = g_ent.contiguous() if has_ent else g_logp
    grid = (n_rows, triton.cdiv(vocab, block_v))
    with _on_device(logits):
        grad_logits_kernel[grid](
            logits, targets, m, log_s, entropy, g_logp, g_ent, out,
            vocab, col_offset, logits.stride(0), out.stride(0), inv_temp, *_cap_args(inv_temp, softcap),
            BLOCK_V=block_v, HAS_ENT=has_ent, SOFTCAP=softcap is not None, num_warps=num_warps or _warps(block_v),
            enable_fp_fusion=False,
        )
    return out


def _row_stats(
    logits: Tensor, targets: Tensor, inv_temp: float, with_entropy: bool, state: Tensor, col_offset: int,
    block_v: int, split_v: int, num_warps: int | None = None, *, softcap: float | None = None,
    with_sums: bool = False,
) -> Tensor:
    """``row_stats`` with explicit tiling: BLOCK_V ``block_v`` (a power of two), rows split into
    pieces of ``split_v`` columns (a multiple of ``block_v``) merged by a second kernel, and
    ``num_warps`` warps per program (default: ``_STATS_WARPS``)."""
    _check_columns(logits, "logits")
    n_rows, vocab = logits.shape
    if state.shape != (n_rows, row_state.WIDTH) or state.dtype != torch.float64 or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous float64 [{n_rows}, {row_state.WIDTH}] tensor; got "
                         f"{state.dtype} {tuple(state.shape)}, strides {state.stride()}")
    if n_rows == 0:
        return state
    targets = targets.contiguous()
    n_splits = triton.cdiv(vocab, split_v)
    merge = n_splits == 1
    cap = _cap_args(inv_temp, softcap)
    # the partial sums of split rows (m, k, r, s1, s2, sz), each [C, n_splits]; unused when merging
    parts = (state,) * 6 if merge else torch.empty(6, n_rows, n_splits, dtype=torch.float32, device=logits.device)
    flags = dict(WITH_ENT=with_entropy, WITH_SUMS=with_sums, SOFTCAP=softcap is not None,
                 STATE_WIDTH=row_state.WIDTH, enable_fp_fusion=False)
    with _on_device(logits):
        row_stats_kernel[(n_rows, n_splits)](
            logits, targets, *parts, state, vocab, col_offset, logits.stride(0), n_splits, split_v, inv_temp, *cap,
            BLOCK_V=block_v, MERGE=merge, num_warps=num_warps or _STATS_WARPS, **flags,
        )
        if not merge:
            row_stats_combine_kernel[(n_rows,)](
                logits, targets, *parts, state, vocab, col_offset, logits.stride(0), n_splits, inv_temp, *cap,
                BLOCK_S=triton.next_power_of_2(n_splits), num_warps=1, **flags,
            )
    return state


def _cap_args(inv_temp: float, softcap: float | None) -> tuple[float, float]:
    """The kernels' (inv_softcap, cap_scale) for ``kernels.scaled``; unused (0, 0) without a cap."""
    return (0.0, 0.0) if softcap is None else (1.0 / softcap, softcap * inv_temp)


def _split_size(n_rows: int, vocab: int, block_v: int, device: torch.device) -> int:
    """Columns per program for the stats kernel: whole rows when there are enough rows to fill
    the GPU, otherwise the fewest equal pieces (whole tiles) that give about
    ``_PROGRAMS_PER_SM`` programs per SM."""
    tiles = triton.cdiv(vocab, block_v)
    wanted = triton.cdiv(_PROGRAMS_PER_SM * _sm_count(device), max(n_rows, 1))
    n_splits = max(1, min(tiles, wanted))
    return triton.cdiv(tiles, n_splits) * block_v


def _block(vocab: int, max_block: int) -> int:
    return min(max_block, max(_MIN_BLOCK_V, triton.next_power_of_2(vocab)))


def _warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


@functools.lru_cache(maxsize=None)
def _sm_count_cuda(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _DEFAULT_SMS
    return _sm_count_cuda(device.index if device.index is not None else torch.cuda.current_device())


def _on_device(t: Tensor):
    """Make ``t``'s GPU the current one, where Triton launches, for tensors off the default GPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_columns(t: Tensor, name: str) -> None:
    if t.dim() != 2 or (t.stride(1) != 1 and t.shape[1] > 1):
        raise ValueError(f"{name} must be a [C, V] tensor with unit column stride; got shape "
                         f"{tuple(t.shape)}, strides {t.stride()}")
