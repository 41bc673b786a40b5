"""Row kernels in plain PyTorch: the readable reference every other backend must match.

A backend is a module with three functions that work on one block of logits, shape [C, V], the
rows being tokens (all valid: ignored positions are removed before any backend sees them) and the
columns the vocabulary. The GEMMs around them live in ``hpt_fast.ops`` and are shared by all
backends. With ``z = logits * inv_temp`` (float32 arithmetic whatever the block's dtype; float64
blocks, used for gradcheck, stay float64 in this backend only):

- ``row_stats`` returns ``logp = z[target] - logsumexp(z)``, ``lse = logsumexp(z)`` and, when asked,
  ``entropy = -sum(softmax(z) * log_softmax(z))``.
- ``grad_logits`` writes ``d loss / d logits`` for per-token ``g_logp = d loss / d logp`` and
  ``g_ent = d loss / d entropy``:
  ``inv_temp * (g_logp * (onehot - p) - g_ent * p * (log p + H))``. The block may be a slab of
  vocabulary columns ``[col_offset, col_offset + cols)`` of the full rows: ``lse`` and the entropy
  are those of the full rows, and the one-hot term lands only on rows whose target is in the slab.
- ``accumulate_`` adds a low-precision block into a float32 accumulator.
"""
from __future__ import annotations

import torch
from torch import Tensor


def row_stats(
    logits: Tensor, targets: Tensor, inv_temp: float, with_entropy: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-row statistics of one logits block.

    Args:
        logits: [C, V] float32 / bfloat16 / float16, contiguous.
        targets: [C] int64, every id in [0, V).
        inv_temp: 1 / temperature.
        with_entropy: whether to compute the entropy.
    Returns:
        logp [C] float32 (always <= 0), lse [C] float32, entropy [C] float32 (>= 0) or None
        (float64 for a float64 block).
    """
    z = _compute(logits) * inv_temp
    m = z.amax(dim=1, keepdim=True)
    # shifted logits keep exp() finite for logits of any magnitude
    zs = z.sub_(m)
    e = zs.exp()
    s = e.sum(dim=1)
    log_s = s.log()
    # (z_t - m) <= 0 and log(s) >= 0 in floating point too, so logp <= 0 holds exactly
    logp = zs.gather(1, targets[:, None]).squeeze(1) - log_s
    lse = m.squeeze(1) + log_s
    entropy = None
    if with_entropy:
        entropy = (log_s - torch.linalg.vecdot(e, zs) / s).clamp_min_(0.0)
    return logp, lse, entropy


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
    """Write d loss / d logits of one block into ``out``.

    Args:
        logits: [C, Vs] float32 / bfloat16 / float16, the raw (untempered) logits of vocabulary
            ids ``col_offset .. col_offset + Vs - 1`` (Vs = V for a block of whole rows).
        targets: [C] int64 vocabulary ids in [0, V); a target outside the block's columns adds
            no one-hot term here and is never used as an index.
        lse: [C] float32 from ``row_stats`` on the whole rows; entropy: [C] float32 or None.
        g_logp: [C] float32; g_ent: [C] float32 or None (no entropy term).
        inv_temp: 1 / temperature.
        out: [C, Vs], any float dtype; may be ``logits`` itself (in place).
        col_offset: vocabulary id of the block's first column, >= 0.
    Returns:
        ``out``.
    """
    # two block-sized temporaries: log p (reused for the per-element factor) and p (becomes d)
    logp_all = _compute(logits) * inv_temp
    logp_all -= lse[:, None]
    p = logp_all.exp()
    # d = -p * (g_logp + g_ent * (log p + H)), then + g_logp at the target column
    if g_ent is None:
        p.mul_(-g_logp[:, None])
    else:
        logp_all.add_(entropy[:, None]).mul_(g_ent[:, None]).add_(g_logp[:, None])
        p.mul_(logp_all).neg_()
    del logp_all
    local = targets - col_offset
    in_block = (local >= 0) & (local < p.shape[1])
    # rows whose target lies in another slab scatter a zero onto a clamped, in-range column
    p.scatter_add_(1, local.clamp(0, p.shape[1] - 1)[:, None], (g_logp * in_block)[:, None])
    p.mul_(inv_temp)
    out.copy_(p)
    return out


def _compute(logits: Tensor) -> Tensor:
    """The block in its arithmetic dtype: float32, or float64 for a float64 block."""
    return logits if logits.dtype == torch.float64 else logits.float()


def accumulate_(acc: Tensor, x: Tensor) -> Tensor:
    """acc += x, with ``acc`` float32 and ``x`` any float dtype of the same shape."""
    return acc.add_(x)
