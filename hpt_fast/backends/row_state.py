"""The running softmax state of logits rows, shared by every backend's ``row_stats``.

A row's logits may reach ``row_stats`` in one block (token order: whole rows) or in several
vocabulary slabs (vocabulary order). Each call merges its columns into a running state per row,
and ``finish`` turns the state into the statistics once every column has been seen, so the
result does not depend on how the row was cut.

The state is a ``[C, 6]`` float64 tensor, one row per token: column 0 is ``m``, the largest
``z = logit * inv_temp`` seen so far (a float32 value, or float64 for float64 blocks); 1 is
``s = sum exp(z - m)``; 2 is ``s1 = sum exp(z - m) * (z - m)`` (kept only when the entropy is
wanted); 3 is ``z_t``, the target's ``z``, written by the call whose columns contain the target;
4 and 5, kept only when the logit sums are wanted (``logit_sums``), are ``s2 = sum exp(2 (z - m))``
and ``sz = sum z``. The sums stay in float64 between blocks, so a row cut into slabs loses
nothing to rounding between them, and one block reproduces a whole-row pass.

Within a block every backend adds the terms in float32, but keeps the maximum's exp(0) = 1 out
of those sums and adds it in float64 (the C++ and Triton kernels count the z equal to the
maximum; the torch backend takes each row's largest term out): in one float32 sum with the 1,
the other terms of a near-deterministic row (1 - p of 1e-7, where they are all of log s, log p
and the entropy) would keep only float32's spacing at 1, 6e-8.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

M, S, S1, Z_T, S2, SZ = range(6)
WIDTH = 6


def empty(rows: int, device: torch.device) -> Tensor:
    """The state of ``rows`` rows before any column: m = -inf, the sums 0, z_t = NaN.

    z_t starts as NaN so that a target no block contained shows up as a NaN logp, never as a
    plausible number.
    """
    state = torch.zeros(rows, WIDTH, dtype=torch.float64, device=device)
    state[:, M] = float("-inf")
    state[:, Z_T] = float("nan")
    return state


def finish(
    state: Tensor, with_entropy: bool, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(logp [C], norm [C, 2], entropy [C] or None) in ``dtype``, from a complete state.

    ``norm`` is the log-sum-exp in two parts, (m, log s), so that ``log p = (z - m) - log s``
    keeps its own precision: as one float32 number, m + log s would resolve log p only to
    float32's spacing at m (7.6e-6 at 100), which near p = 1 is most of log p.
    ``z_t - m`` is taken in ``dtype``, where both are exact: ``z_t <= m`` holds bit for bit (z_t
    is one of the values whose maximum is m, computed the same way) and ``s >= 1`` (the maximum
    contributes exp(0) = 1), so ``logp = (z_t - m) - log s <= 0`` holds in floating point too.
    """
    m, s = state[:, M], state[:, S]
    log_s = s.log()
    norm = torch.stack([m, log_s], dim=1).to(dtype)
    logp = (state[:, Z_T].to(dtype) - norm[:, 0]) - norm[:, 1]
    entropy = (log_s - state[:, S1] / s).clamp_min_(0.0).to(dtype) if with_entropy else None
    return logp, norm, entropy


def is_top1(state: Tensor) -> Tensor:
    """bool [C]: whether each row's target has the largest ``z`` of the row, from a complete state.

    ``z_t`` and ``m`` are computed alike (``finish``), so the comparison is exact: a target tied
    for the largest counts, where ``argmax == target`` would pick the first of the tied columns.
    A target no block contained (``z_t`` NaN) is not.
    """
    return state[:, Z_T] == state[:, M]


def logit_sums(state: Tensor, vocab: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(mean z over the row's ``vocab`` columns, log sum_v p_v^2), each [C] in ``dtype``, from a
    complete state kept with the logit sums: the mean scaled logit and the log of the row's
    collision probability (TRL's ``mean_logits`` and ``log_sum_sq_probs``); no gradient flows.

    Both sums are relative to the same shift m, so log sum p^2 = log s2 - 2 log s.
    """
    mean = (state[:, SZ] / vocab).to(dtype)
    log_sum_sq = (state[:, S2].log() - 2.0 * state[:, S].log()).to(dtype)
    return mean, log_sum_sq
