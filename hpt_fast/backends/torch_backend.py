"""Row kernels in plain PyTorch: the readable reference every other backend must match.

A backend is a module with three functions that work on one block of logits, shape [C, V], the
rows being tokens (all valid: ignored positions are removed before any backend sees them) and the
columns the vocabulary. The GEMMs around them live in ``hpt_fast.op_passes`` and are shared by all
backends. With ``z = logits * inv_temp``, or ``z = softcap * tanh(logits / softcap) * inv_temp``
when a soft cap is given (Gemma 2's ``final_logit_softcapping``) (float32 arithmetic whatever the
block's dtype; float64 blocks, used for gradcheck, stay float64 in this backend only):

- ``row_stats`` merges the block's columns into each row's running softmax state
  (``row_state``), from which ``row_state.finish`` gives ``logp = z[target] - logsumexp(z)``,
  ``norm``, logsumexp(z) in two parts (m, log s), and ``entropy = -sum(softmax(z) *
  log_softmax(z))`` once every column of the row has been seen, in one block or in several
  vocabulary slabs.
- ``grad_logits`` writes ``d loss / d logits`` for per-token ``g_logp = d loss / d logp`` and
  ``g_ent = d loss / d entropy``:
  ``inv_temp * (g_logp * (onehot - p) - g_ent * p * (log p + H))``, times
  ``1 - tanh(logits / softcap) ** 2`` with a soft cap. The block may be a slab of
  vocabulary columns ``[col_offset, col_offset + cols)`` of the full rows: ``norm`` and the
  entropy are those of the full rows, and the one-hot term lands only on rows whose target is
  in the slab.
- ``accumulate_`` adds a low-precision block into a float32 accumulator.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hpt_fast.backends import row_state


def row_stats(
    logits: Tensor,
    targets: Tensor,
    inv_temp: float,
    with_entropy: bool,
    state: Tensor,
    col_offset: int = 0,
    softcap: Optional[float] = None,
    with_sums: bool = False,
) -> Tensor:
    """Merge one logits block into the rows' running softmax state (see ``row_state``).

    Args:
        logits: [C, Vs] float32 / bfloat16 / float16 (float64 for gradcheck), the raw logits of
            vocabulary ids ``col_offset .. col_offset + Vs - 1`` (Vs = V for whole rows).
        targets: [C] int64 vocabulary ids in [0, V); a row's z_t is written by the block that
            contains its target, and a target outside the block is never used as an index.
        inv_temp: 1 / temperature.
        with_entropy: whether to keep s1, which only the entropy needs.
        state: [C, 6] float64, updated in place.
        col_offset: vocabulary id of the block's first column, >= 0.
        softcap: None, or the soft cap c > 0 (the logits become c * tanh(logits / c)).
        with_sums: whether to keep s2 and sz, which only ``row_state.logit_sums`` needs.
    Returns:
        ``state``.
    """
    z, _ = _scaled(logits, inv_temp, softcap)
    if with_sums:
        state[:, row_state.SZ] += z.sum(dim=1).double()
    local = targets - col_offset
    in_block = (local >= 0) & (local < z.shape[1])
    # gathered before the shift below: finish() relies on z_t being bit for bit one of the z
    z_t = z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
    m_old, s_old = state[:, row_state.M], state[:, row_state.S]
    # the block in its own dtype (m_old holds one of its values, so the cast is exact); the
    # state's sums in float64
    block_max, top = z.max(dim=1, keepdim=True)
    m = torch.maximum(m_old.to(z.dtype), block_max.squeeze(1))
    # shifted logits keep exp() finite for logits of any magnitude; a row with nothing but -inf
    # so far (vocabulary entries masked by a -inf bias) is shifted by 0, not by -inf (NaN)
    zs = z.sub_(torch.where(m == float("-inf"), 0.0, m)[:, None])
    e = zs.exp()
    # each row's largest term (exp(0) = 1 where the block holds the row's maximum) is taken out
    # of the float32 sums and added in float64: summed with a 1 in float32, the others' terms near
    # p = 1 (1 - p of 1e-7, all of log s) would keep only float32's spacing at 1. A tie at the
    # maximum leaves a second 1 in the sum, but then p <= 1/2 and nothing is lost.
    e_top = e.gather(1, top).squeeze(1)
    e.scatter_(1, top, 0.0)
    m = m.double()
    # rows with nothing seen yet have s_old = 0 and m_old = -inf: their old sums stay 0, not NaN
    seen = s_old > 0
    scale = torch.where(seen, torch.exp(m_old - m), 0.0)
    if with_entropy:
        shift = torch.where(seen, m_old - m, 0.0)
        # e = 0 at -inf logits: their term is 0, not 0 * (-inf) (NaN stays NaN)
        zs.clamp_(min=torch.finfo(zs.dtype).min)
        s1_blk = torch.linalg.vecdot(e, zs).double() + (e_top * zs.gather(1, top).squeeze(1)).double()
        state[:, row_state.S1] = scale * (state[:, row_state.S1] + shift * s_old) + s1_blk
    e_top = e_top.double()
    if with_sums:
        s2_blk = torch.linalg.vecdot(e, e).double() + e_top.square()
        state[:, row_state.S2] = scale.square() * state[:, row_state.S2] + s2_blk
    state[:, row_state.S] = scale * s_old + e.sum(dim=1).double() + e_top
    state[:, row_state.M] = m
    state[:, row_state.Z_T] = torch.where(in_block, z_t.double(), state[:, row_state.Z_T])
    return state


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
    softcap: Optional[float] = None,
) -> Tensor:
    """Write d loss / d logits of one block into ``out``.

    Args:
        logits: [C, Vs] float32 / bfloat16 / float16, the raw (untempered) logits of vocabulary
            ids ``col_offset .. col_offset + Vs - 1`` (Vs = V for a block of whole rows).
        targets: [C] int64 vocabulary ids in [0, V); a target outside the block's columns adds
            no one-hot term here and is never used as an index.
        norm: [C, 2] float32, the whole rows' log-sum-exp as (m, log s) (``row_state.finish``):
            log p = (z - m) - log s, each part at its own precision; entropy: [C] float32 or None.
        g_logp: [C] float32; g_ent: [C] float32 or None (no entropy term).
        inv_temp: 1 / temperature.
        out: [C, Vs], any float dtype; may be ``logits`` itself (in place).
        col_offset: vocabulary id of the block's first column, >= 0.
        softcap: None, or the soft cap c > 0: d is also multiplied by 1 - tanh(logits / c) ** 2.
    Returns:
        ``out``.
    """
    # two block-sized temporaries: log p (reused for the per-element factor) and p (becomes d);
    # a soft cap keeps a third, tanh, for the chain rule's factor
    logp_all, tanh = _scaled(logits, inv_temp, softcap)
    logp_all.sub_(norm[:, :1]).sub_(norm[:, 1:])
    local = targets - col_offset
    in_block = (local >= 0) & (local < logp_all.shape[1])
    column = local.clamp(0, logp_all.shape[1] - 1)[:, None]  # in range; a row not in_block keeps its d
    logp_t = logp_all.gather(1, column).squeeze(1)
    p = logp_all.exp()
    # below -1e4, p is exactly 0 (float32 and float64); clamping keeps the entropy factor finite
    # there (-inf logits), so that p * factor is 0 rather than NaN
    logp_all.clamp_(min=-1e4)
    # d = -p * (g_logp + g_ent * (log p + H)) off the target column
    if g_ent is None:
        p.mul_(-g_logp[:, None])
    else:
        logp_all.add_(entropy[:, None]).mul_(g_ent[:, None]).add_(g_logp[:, None])
        p.mul_(logp_all).neg_()
    del logp_all
    # at it g_logp * (1 - p) - g_ent * p * (log p + H), with 1 - p = -expm1(log p): near p = 1,
    # 1 - p in floating point keeps few of its digits
    d_t = -g_logp * torch.expm1(logp_t)
    if g_ent is not None:
        p_t = logp_t.exp()
        d_t = d_t - g_ent * torch.where(p_t > 0, p_t * (logp_t + entropy), 0.0)
    p.scatter_(1, column, torch.where(in_block, d_t, p.gather(1, column).squeeze(1))[:, None])
    p.mul_(inv_temp)
    if tanh is not None:
        p.mul_(tanh.square_().neg_().add_(1.0))
    out.copy_(p)
    return out


def _scaled(logits: Tensor, inv_temp: float, softcap: Optional[float]) -> tuple[Tensor, Optional[Tensor]]:
    """(z, tanh or None): z a new tensor in the block's arithmetic dtype (float32, or float64 for
    a float64 block), ``logits * inv_temp`` or, with a soft cap c, ``tanh(logits / c) * (c * inv_temp)``."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    if softcap is None:
        return x * inv_temp, None
    tanh = torch.tanh(x * (1.0 / softcap))
    return tanh * (softcap * inv_temp), tanh


def accumulate_(acc: Tensor, x: Tensor) -> Tensor:
    """acc += x, with ``acc`` float32 and ``x`` any float dtype of the same shape."""
    return acc.add_(x)
