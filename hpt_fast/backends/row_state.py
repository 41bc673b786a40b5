"""The running softmax state of logits rows, shared by every backend's ``row_stats``.

A row's logits may reach ``row_stats`` in one block (token order: whole rows) or in several
vocabulary slabs (vocabulary order). Each call merges its columns into a running state per row,
and ``finish`` turns the state into the statistics once every column has been seen, so the
result does not depend on how the row was cut.

The state is a ``[C, 4]`` tensor, float32 (float64 for float64 blocks), one row per token:
column 0 is ``m``, the largest ``z = logit * inv_temp`` seen so far; 1 is ``s = sum exp(z - m)``;
2 is ``s1 = sum exp(z - m) * (z - m)`` (kept only when the entropy is wanted); 3 is ``z_t``, the
target's ``z``, written by the call whose columns contain the target.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

M, S, S1, Z_T = range(4)
WIDTH = 4


def empty(rows: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The state of ``rows`` rows before any column: m = -inf, s = s1 = 0, z_t = NaN.

    z_t starts as NaN so that a target no block contained shows up as a NaN logp, never as a
    plausible number.
    """
    state = torch.zeros(rows, WIDTH, dtype=dtype, device=device)
    state[:, M] = float("-inf")
    state[:, Z_T] = float("nan")
    return state


def finish(state: Tensor, with_entropy: bool) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(logp, lse, entropy or None), each [C] in the state's dtype, from a complete state.

    ``z_t <= m`` holds bit for bit (z_t is one of the values whose maximum is m, computed the same
    way) and ``s >= 1`` (the maximum contributes exp(0) = 1), so ``logp = (z_t - m) - log s <= 0``
    holds in floating point too.
    """
    m, s = state[:, M], state[:, S]
    log_s = s.log()
    logp = (state[:, Z_T] - m) - log_s
    lse = m + log_s
    entropy = (log_s - state[:, S1] / s).clamp_min_(0.0) if with_entropy else None
    return logp, lse, entropy
