"""Triton kernels for per-row log-softmax statistics of a logits block.

For each row of ``z = logits * inv_temp``, or ``z = softcap * tanh(logits / softcap) * inv_temp``
with a soft cap (``kernels.scaled``; float32 arithmetic whatever the input dtype), they
compute, in one read of the row, the running maximum ``m``, ``s = sum(exp(z - m))``, for the
entropy ``s1 = sum(exp(z - m) * (z - m))``, and for the logit sums ``s2 = sum(exp(2 (z - m)))``
and ``sz = sum(z)``. ``s`` is kept in two parts, ``k`` the number of z equal to ``m`` (each
contributing exp(0) = 1) and ``r`` the sum over the others, added in float64 only when merged
into the state: in one float32 sum with the 1, a near-deterministic row's other terms (1 - p of
1e-7) would keep only float32's spacing at 1. ``s2`` likewise leaves out its k ones. A row may
be split over several programs, each covering ``split_v`` columns and writing partial sums; a
second kernel then merges the partials of each row. Either way the row's sums over the block
are merged into its running state (``hpt_fast.backends.row_state``), the block being all of the
row's columns or one slab of them; ``row_state.finish`` turns the complete state into logp, the
log-sum-exp as (m, log s) and entropy, ``row_state.logit_sums`` into the logit sums.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .scaled import scaled


@triton.jit
def _merge_into_state(
    logits_ptr, targets_ptr, state_ptr, row, V, col_offset, stride_row, inv_temp, inv_softcap, cap_scale,
    m, k, r, s1, s2, sz, WITH_ENT: tl.constexpr, WITH_SUMS: tl.constexpr, SOFTCAP: tl.constexpr,
    STATE_WIDTH: tl.constexpr,
):
    """Merge ``(m, k, r, s1, s2, sz)`` of ``row``'s columns in this block (s = k + r, s2 without
    its k ones) into its running state (``row_state``, STATE_WIDTH float64 per row), and write its
    z_t when the target lies in the block."""
    st = state_ptr + row * STATE_WIDTH
    # the state is float64: the block's float32 sums are merged into it without rounding
    m = m.to(tl.float64)
    k = k.to(tl.float64)
    s = k + r.to(tl.float64)
    m_old = tl.load(st)
    s_old = tl.load(st + 1)
    m_new = tl.maximum(m_old, m)
    m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
    # the rescaling factors in float32 (exp of a float64 would need libdevice), applied in float64
    a_old = tl.exp((m_old - m_ref).to(tl.float32)).to(tl.float64)
    a_blk = tl.exp((m - m_ref).to(tl.float32)).to(tl.float64)
    tl.store(st, m_new)
    tl.store(st + 1, a_old * s_old + a_blk * s)
    if WITH_ENT:
        s1 = s1.to(tl.float64)
        # where a factor is 0 (nothing finite seen on that side) the shift may be -inf: zeroed
        # first, so no 0 * (-inf) = NaN appears
        shift_old = tl.where(a_old > 0.0, m_old - m_ref, 0.0)
        shift_blk = tl.where(a_blk > 0.0, m - m_ref, 0.0)
        s1_old = tl.load(st + 2)
        tl.store(st + 2, a_old * (s1_old + shift_old * s_old) + a_blk * (s1 + shift_blk * s))
    if WITH_SUMS:
        tl.store(st + 4, a_old * a_old * tl.load(st + 4) + a_blk * a_blk * (s2.to(tl.float64) + k))
        tl.store(st + 5, tl.load(st + 5) + sz.to(tl.float64))
    local = tl.load(targets_ptr + row) - col_offset
    in_block = (local >= 0) & (local < V)
    # the same load-convert-scale as the tiles, so z_t <= m holds bit for bit; an out-of-block
    # target reads column 0 instead, and that value is not stored
    x_t = tl.load(logits_ptr + row * stride_row + tl.where(in_block, local, 0)).to(tl.float32)
    z_t = scaled(x_t, inv_temp, inv_softcap, cap_scale, SOFTCAP)
    tl.store(st + 3, z_t.to(tl.float64), mask=in_block)


@triton.jit
def row_stats_kernel(
    logits_ptr, targets_ptr, part_m_ptr, part_k_ptr, part_r_ptr, part_s1_ptr, part_s2_ptr, part_sz_ptr,
    state_ptr, V, col_offset, stride_row, n_splits, split_v, inv_temp, inv_softcap, cap_scale,
    BLOCK_V: tl.constexpr, WITH_ENT: tl.constexpr, WITH_SUMS: tl.constexpr, MERGE: tl.constexpr,
    SOFTCAP: tl.constexpr, STATE_WIDTH: tl.constexpr,
):
    """Grid (C, n_splits): program (row, k) reduces columns [k * split_v, (k + 1) * split_v).

    logits: [C, V] float32 / bfloat16 / float16 with unit column stride, row stride
    ``stride_row``, the columns of vocabulary ids ``col_offset .. col_offset + V - 1``; targets:
    [C] integer vocabulary ids; state: [C, STATE_WIDTH] float64, contiguous (m, s, s1, z_t, s2,
    sz: ``row_state``'s layout). With ``MERGE`` (n_splits == 1) the program merges its sums into
    the state directly, otherwise it writes them into part_m / part_k / part_r / part_s1 /
    part_s2 / part_sz ([C, n_splits] float32, contiguous) for ``row_stats_combine_kernel``.
    ``split_v`` is a multiple of BLOCK_V. ``SOFTCAP``: z as in ``kernels.scaled`` (inv_softcap,
    cap_scale), else ``logits * inv_temp``.
    """
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    row_ptr = logits_ptr + row * stride_row
    start = split * split_v
    end = tl.minimum(start + split_v, V)
    cols = tl.arange(0, BLOCK_V)

    m = -float("inf")
    k = 0.0
    r = 0.0
    s1 = 0.0
    s2 = 0.0
    sz = 0.0
    for off in range(start, end, BLOCK_V):
        mask = off + cols < end
        x = tl.load(row_ptr + off + cols, mask=mask, other=-float("inf")).to(tl.float32)
        z = scaled(x, inv_temp, inv_softcap, cap_scale, SOFTCAP)
        if SOFTCAP:
            # masked lanes stay -inf: the cap maps their -inf to -softcap * inv_temp
            z = tl.where(mask, z, -float("inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # shift by 0 while everything seen is -inf, so no (-inf) - (-inf) = NaN appears
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        zs = z - m_ref
        at_max = zs == 0.0
        e = tl.where(at_max, 0.0, tl.exp(zs))
        # the ones counted in k stop being the largest when the maximum grows: they join r
        k_old = tl.where(m_new > m, k, 0.0)
        if WITH_ENT:
            # re-centre the old sum on m_new: sum e'(z - m_new) = alpha * (s1 + (m - m_new) * s).
            # Where alpha or e is 0 (nothing finite seen yet, masked lanes, -inf logits) the
            # difference may be -inf; zeroing it first avoids 0 * (-inf) = NaN.
            shift = tl.where(alpha > 0.0, m - m_ref, 0.0)
            s1 = alpha * (s1 + shift * (k + r)) + tl.sum(e * tl.where(e > 0.0, zs, 0.0), axis=0)
        if WITH_SUMS:
            s2 = (s2 + k_old) * alpha * alpha + tl.sum(e * e, axis=0)
            sz += tl.sum(tl.where(mask, z, 0.0), axis=0)
        r = (r + k_old) * alpha + tl.sum(e, axis=0)
        k = k - k_old + tl.sum(at_max.to(tl.float32), axis=0)
        m = m_new

    if MERGE:
        _merge_into_state(
            logits_ptr, targets_ptr, state_ptr, row, V, col_offset, stride_row, inv_temp, inv_softcap,
            cap_scale, m, k, r, s1, s2, sz, WITH_ENT, WITH_SUMS, SOFTCAP, STATE_WIDTH,
        )
    else:
        part = row * n_splits + split
        tl.store(part_m_ptr + part, m)
        tl.store(part_k_ptr + part, k)
        tl.store(part_r_ptr + part, r)
        if WITH_ENT:
            tl.store(part_s1_ptr + part, s1)
        if WITH_SUMS:
            tl.store(part_s2_ptr + part, s2)
            tl.store(part_sz_ptr + part, sz)


@triton.jit
def row_stats_combine_kernel(
    logits_ptr, targets_ptr, part_m_ptr, part_k_ptr, part_r_ptr, part_s1_ptr, part_s2_ptr, part_sz_ptr,
    state_ptr, V, col_offset, stride_row, n_splits, inv_temp, inv_softcap, cap_scale,
    BLOCK_S: tl.constexpr, WITH_ENT: tl.constexpr, WITH_SUMS: tl.constexpr, SOFTCAP: tl.constexpr,
    STATE_WIDTH: tl.constexpr,
):
    """Grid (C,): merge the ``n_splits`` partial sums of a row into its running state.

    Shapes and dtypes as in ``row_stats_kernel``; BLOCK_S >= n_splits.
    """
    row = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK_S)
    mask = k < n_splits
    base = row * n_splits
    m_k = tl.load(part_m_ptr + base + k, mask=mask, other=-float("inf"))
    count_k = tl.load(part_k_ptr + base + k, mask=mask, other=0.0)
    r_k = tl.load(part_r_ptr + base + k, mask=mask, other=0.0)
    m = tl.max(m_k, axis=0)
    m_ref = tl.where(m == -float("inf"), 0.0, m)
    w = tl.exp(m_k - m_ref)
    # a split's ones stay ones (in ``count``) only if its maximum is the row's; the others'
    # become terms exp(m_k - m) < 1 of r
    below = tl.where(m_k == m, 0.0, count_k)
    count = tl.sum(count_k - below, axis=0)
    r = tl.sum(w * (r_k + below), axis=0)
    s1 = 0.0
    if WITH_ENT:
        s1_k = tl.load(part_s1_ptr + base + k, mask=mask, other=0.0)
        # w == 0 for padding and all -inf splits, whose m_k - m is -inf: zero it to avoid NaN
        shift = tl.where(w > 0.0, m_k - m_ref, 0.0)
        s1 = tl.sum(w * (s1_k + shift * (count_k + r_k)), axis=0)
    s2 = 0.0
    sz = 0.0
    if WITH_SUMS:
        s2 = tl.sum(w * w * (tl.load(part_s2_ptr + base + k, mask=mask, other=0.0) + below), axis=0)
        sz = tl.sum(tl.load(part_sz_ptr + base + k, mask=mask, other=0.0), axis=0)
    _merge_into_state(
        logits_ptr, targets_ptr, state_ptr, row, V, col_offset, stride_row, inv_temp, inv_softcap,
        cap_scale, m, count, r, s1, s2, sz, WITH_ENT, WITH_SUMS, SOFTCAP, STATE_WIDTH,
    )
