"""Triton kernel for the gradient of a per-token loss with respect to a logits block."""
from __future__ import annotations

import triton
import triton.language as tl

from .scaled import scaled, tanh


@triton.jit
def _expm1(x):
    """exp(x) - 1 for x <= 0 to float32's precision: the Taylor series to x^8 / 8! above -0.35
    (truncation below 1e-9 relative), else exp(x) - 1, which is then below -0.29 (tl has no
    expm1; exp(x) - 1 alone keeps only float32's spacing at 1, 6e-8, of a small result)."""
    series = x * (1.0 + x * (1.0 / 2 + x * (1.0 / 6 + x * (1.0 / 24 + x * (1.0 / 120 + x * (
        1.0 / 720 + x * (1.0 / 5040 + x * (1.0 / 40320))))))))
    return tl.where(x > -0.35, series, tl.exp(x) - 1.0)


@triton.jit
def grad_logits_kernel(
    logits_ptr, targets_ptr, m_ptr, log_s_ptr, ent_ptr, g_logp_ptr, g_ent_ptr, out_ptr,
    V, col_offset, stride_logits, stride_out, inv_temp, inv_softcap, cap_scale,
    BLOCK_V: tl.constexpr, HAS_ENT: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Grid (C, cdiv(V, BLOCK_V)): program (row, j) writes columns [j * BLOCK_V, (j + 1) * BLOCK_V).

    With ``z = logits * inv_temp`` and ``log p = (z - m) - log s`` it stores
    ``inv_temp * (g_logp * (onehot(target) - p) - g_ent * p * (log p + H))`` in out's dtype; with
    ``SOFTCAP``, ``z = tanh(logits * inv_softcap) * cap_scale`` (``kernels.scaled``) and the value
    is also multiplied by ``1 - tanh(logits * inv_softcap) ** 2``.

    logits: [C, V] float32 / bfloat16 / float16, row stride ``stride_logits``, the columns of
    vocabulary ids ``col_offset .. col_offset + V - 1`` (V is the block's width: a slab of the
    vocabulary, or all of it); out: [C, V] any float dtype, row stride ``stride_out``, may alias
    logits (each program reads its tile before writing it); both have unit column stride.
    targets: [C] integer vocabulary ids, compared with column ids, never used as an address;
    m, log_s, g_logp: [C] float32 of the whole rows (the log-sum-exp is m + log s, kept apart so
    that log p near 0 keeps its own precision); entropy and g_ent: [C] float32, read only when
    ``HAS_ENT``.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    x = tl.load(logits_ptr + row * stride_logits + cols, mask=mask, other=0.0).to(tl.float32)
    z = scaled(x, inv_temp, inv_softcap, cap_scale, SOFTCAP)
    m = tl.load(m_ptr + row)
    log_s = tl.load(log_s_ptr + row)
    # a no-op on real columns (z <= m, log s >= 0); keeps exp() of padded lanes, where z = 0, finite
    logp = tl.minimum((z - m) - log_s, 0.0)
    p = tl.exp(logp)
    g_logp = tl.load(g_logp_ptr + row)
    ent_term = tl.zeros_like(p)
    if HAS_ENT:
        # p = 0 at -inf logits: their term is 0, not 0 * (-inf) (NaN)
        ent_term = tl.load(g_ent_ptr + row) * p * tl.where(p > 0.0, logp + tl.load(ent_ptr + row), 0.0)
    # g_logp * (onehot - p): at the target column 1 - p = -expm1(log p), as near p = 1 1 - p in
    # float32 keeps few of its digits. Taken once per program from the target's own logit, loaded
    # and scaled as the tile's (so its log p is bit for bit the tile's). Only the program whose
    # tile holds the target uses it, having read it before writing that tile; the others may read
    # it already overwritten (out aliasing logits), or column 0 for a target outside the block.
    target = tl.load(targets_ptr + row)
    local = target - col_offset
    x_t = tl.load(logits_ptr + row * stride_logits + tl.where((local >= 0) & (local < V), local, 0))
    z_t = scaled(x_t.to(tl.float32), inv_temp, inv_softcap, cap_scale, SOFTCAP)
    one_minus_p = -_expm1(tl.minimum((z_t - m) - log_s, 0.0))
    d = tl.where(cols + col_offset == target, g_logp * one_minus_p, -g_logp * p) - ent_term
    d *= inv_temp
    if SOFTCAP:
        t = tanh(x * inv_softcap)
        d *= 1.0 - t * t
    tl.store(out_ptr + row * stride_out + cols, d.to(out_ptr.dtype.element_ty), mask=mask)
