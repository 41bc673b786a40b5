"""The logits transform every Triton kernel applies to a loaded tile (one definition, so the
statistics and gradient kernels compute bit for bit the same z)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tanh(u):
    """tanh(u) of a float32 tile as 1 - 2 / (exp(2u) + 1): exactly +-1 once exp overflows to inf or
    underflows to 0, NaN for NaN; absolute error a few float32 ulps of 1 near 0 (libdevice's tanh
    is CUDA-only, and this runs under the interpreter too)."""
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def scaled(x, inv_temp, inv_softcap, cap_scale, SOFTCAP: tl.constexpr):
    """z of float32 logits x: ``x * inv_temp``, or with ``SOFTCAP`` ``tanh(x * inv_softcap) * cap_scale``
    (cap_scale = softcap * inv_temp)."""
    if SOFTCAP:
        return tanh(x * inv_softcap) * cap_scale
    else:
        return x * inv_temp
