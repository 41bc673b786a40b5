"""Row kernels in C++ (``hpt_fast._C``): vectorised, multi-threaded, one streaming pass per call.

Same functions, signatures and semantics as :mod:`hpt_fast.backends.torch_backend`; the extension
checks shapes, dtypes, strides and target ids itself and raises ``RuntimeError`` on bad input.
float64 blocks, which the kernels do not take, go to the torch backend.
Importing this module raises ``ImportError`` when the extension is missing or does not load.
"""
from __future__ import annotations

import torch
from torch import Tensor

from hpt_fast.backends import torch_backend

try:
    from hpt_fast import _C
except ImportError as err:  # not built, or built against another torch
    raise ImportError(f"hpt_fast._C (the cpu backend) could not be loaded: {err}") from err


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32).contiguous()


def row_stats(
    logits: Tensor, targets: Tensor, inv_temp: float, with_entropy: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """See :func:`hpt_fast.backends.torch_backend.row_stats`."""
    if logits.dtype not in _KERNEL_DTYPES:
        return torch_backend.row_stats(logits, targets, inv_temp, with_entropy)
    return _C.row_stats(logits, targets.long().contiguous(), float(inv_temp), bool(with_entropy))


def grad_logits(
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    entropy: Tensor | None,
    g_logp: Tensor,
    g_ent: Tensor | None,
    inv_temp: float,
    out: Tensor,
) -> Tensor:
    """See :func:`hpt_fast.backends.torch_backend.grad_logits`."""
    if logits.dtype not in _KERNEL_DTYPES or out.dtype not in _KERNEL_DTYPES:
        return torch_backend.grad_logits(logits, targets, lse, entropy, g_logp, g_ent, inv_temp, out)
    return _C.grad_logits(
        logits,
        targets.long().contiguous(),
        _f32(lse),
        None if entropy is None or g_ent is None else _f32(entropy),
        _f32(g_logp),
        None if g_ent is None else _f32(g_ent),
        float(inv_temp),
        out,
    )


def accumulate_(acc: Tensor, x: Tensor) -> Tensor:
    """See :func:`hpt_fast.backends.torch_backend.accumulate_`."""
    if acc.dtype != torch.float32 or x.dtype not in _KERNEL_DTYPES:
        return torch_backend.accumulate_(acc, x)
    return _C.accumulate_(acc, x.contiguous())
