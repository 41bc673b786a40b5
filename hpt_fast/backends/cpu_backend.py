"""Row kernels in C++ (``hpt_fast._C``): vectorised, multi-threaded, one streaming pass per call.

Same functions, signatures and semantics as :mod:`hpt_fast.backends.torch_backend`; the extension
checks shapes, dtypes, strides and target ids itself and raises ``RuntimeError`` on bad input.
The kernels take float32, bfloat16 and float16 blocks (``hpt_fast.ops`` sends float64 to the
torch backend).
Importing this module raises ``ImportError`` when the extension is missing or does not load.
"""
from __future__ import annotations

import torch
from torch import Tensor

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
) -> Tensor:
    """See :func:`hpt_fast.backends.torch_backend.row_stats`."""
    return _C.row_stats(
        logits, targets.long().contiguous(), float(inv_temp), bool(with_entropy), state, int(col_offset)
    )


def grad_logits(
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    entropy: Tensor | None,
    g_logp: Tensor,
    g_ent: Tensor | None,
    inv_temp: float,
    out: Tensor,
    col_offset: int = 0,
) -> Tensor:
    """See :func:`hpt_fast.backends.torch_backend.grad_logits`."""
    return _C.grad_logits(
        logits,
        targets.long().contiguous(),
        _f32(lse),
        None if entropy is None or g_ent is None else _f32(entropy),
        _f32(g_logp),
        None if g_ent is None else _f32(g_ent),
        float(inv_temp),
        out,
        int(col_offset),
    )


def accumulate_(acc: Tensor, x: Tensor) -> Tensor:
    """See :func:`hpt_fast.backends.torch_backend.accumulate_`."""
    return _C.accumulate_(acc, x.contiguous())
