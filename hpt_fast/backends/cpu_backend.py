"""Row kernels in C++ (``hpt_fast._C``): vectorised, multi-threaded, one streaming pass per call.

Same functions, signatures and semantics as :mod:`hpt_fast.backends.torch_backend`; the extension
checks shapes, dtypes, strides and target ids itself and raises ``RuntimeError`` on bad input.
The kernels take float32, bfloat16 and float16 blocks (``hpt_fast.op_plan`` sends float64 to the
torch backend).
Importing this module raises ``ImportError`` when the extension is missing or does not load.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from hpt_fast.backends.gemm_trial import gemm_is_right

try:
    from hpt_fast import _C
except ImportError as err:  # not built, or built against another torch
    raise ImportError(f"hpt_fast._C (the cpu backend) could not be loaded: {err}") from err


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32).contiguous()


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
    """See :func:`hpt_fast.backends.torch_backend.row_stats`."""
    return _C.row_stats(
        logits, targets.long().contiguous(), float(inv_temp), bool(with_entropy), state, int(col_offset),
        None if softcap is None else float(softcap), bool(with_sums),
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
    """See :func:`hpt_fast.backends.torch_backend.grad_logits`."""
    return _C.grad_logits(
        logits,
        targets.long().contiguous(),
        _f32(norm[:, 0]),
        _f32(norm[:, 1]),
        None if entropy is None or g_ent is None else _f32(entropy),
        _f32(g_logp),
        None if g_ent is None else _f32(g_ent),
        float(inv_temp),
        out,
        int(col_offset),
        None if softcap is None else float(softcap),
    )


def accumulate_(acc: Tensor, x: Tensor) -> Tensor:
    """See :func:`hpt_fast.backends.torch_backend.accumulate_`."""
    return _C.accumulate_(acc, x.contiguous())


def gemm_into(out: Tensor, a: Tensor, b: Tensor, add: bool) -> bool:
    """``out = a @ b`` (``out += a @ b`` with ``add``) through oneDNN, for float32 a [M, K], b
    [K, N] (either may be a transposed view, neither empty) and a contiguous out [M, N]; returns False, having
    done nothing, for anything else or where ``onednn_float32`` is False (the caller then uses
    torch.mm).

    PyTorch sends float32 CPU GEMMs to MKL and only low-precision ones to oneDNN. On the AMD EPYC
    development machine MKL's float32 products took 1.6-2.6x oneDNN's time on the op's shapes
    (bench/results_gemm_chunking_cpu.md: 9.8 s against 4.7 s for the three products at tokens
    2048, H 1024, V 151936 in 220-token chunks), so the op takes its float32 products from oneDNN,
    through ATen's own wrapper (``_C.onednn_matmul``).
    """
    # an empty operand goes to torch.mm too: with K = 0 oneDNN leaves out as it was, not zeros
    if not (a.dtype == b.dtype == out.dtype == torch.float32 and out.is_contiguous() and a.numel() and b.numel()
            and onednn_float32()):
        return False
    _C.onednn_matmul(a, b, out, add)
    return True


@functools.lru_cache(maxsize=None)
def onednn_float32() -> bool:
    """Whether ``_C.onednn_matmul`` multiplies float32 matrices right on this machine: False
    where the torch build lacks ATen's oneDNN matmul (a symbol looked up when the module loads) or
    it raises or sums wrongly on small products against float64, tried once with contiguous and
    transposed operands, into a fresh and an accumulating out."""
    return _C.has_onednn_matmul() and gemm_is_right(_C.onednn_matmul, transpose_b=True)
