"""A GEMM tried on small products against float64 before the op trusts it.

Some GEMMs the op would rather use exist in a torch build but fail in it: ATen's oneDNN matmul on
float32 (the cpu backend's ``gemm_into``), or torch's float32-output products of bf16 / fp16
matrices, which some builds refuse for addmm into a float32 self (pytorch#154086). Each is tried
once with this, and torch's plain GEMM is used where it fails.
"""
from __future__ import annotations

from typing import Callable, Union

import torch
from torch import Tensor

# gemm(a [M, K], b [K, N], out [M, N] float32, add): out = a @ b, or out += a @ b with add
Gemm = Callable[[Tensor, Tensor, Tensor, bool], object]


def gemm_is_right(
    gemm: Gemm,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    transpose_b: bool = False,
    errors: tuple[type[BaseException], ...] = (RuntimeError,),
) -> bool:
    """Whether ``gemm`` gives float64's product, to 1e-5, on small ``dtype`` matrices on ``device``
    into a float32 out, fresh and accumulating, with ``a`` contiguous and transposed (``b`` too
    with ``transpose_b``), as the op passes them. False where it raises one of ``errors``; the out
    starts non-zero, so a GEMM that adds when told to overwrite fails too."""
    gen = torch.Generator().manual_seed(0)
    a, b, start = (torch.randn(shape, generator=gen) for shape in ((24, 40), (40, 16), (24, 16)))
    a, b, start = a.to(device, dtype), b.to(device, dtype), start.to(device)
    product = a.double() @ b.double()
    transposed = (a.t().contiguous().t(), b.t().contiguous().t() if transpose_b else b)
    try:
        for lhs, rhs in ((a, b), transposed):
            for add in (False, True):
                out = start.clone()
                gemm(lhs, rhs, out, add)
                want = start.double() + product if add else product
                if not torch.allclose(out.double(), want, rtol=1e-5, atol=1e-5):
                    return False
    except errors:
        return False
    return True
