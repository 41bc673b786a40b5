"""Outcome advantages from per-sample rewards, computed within each prompt's group of samples.

The advantage is the unified estimator's A_hat component (see the README's estimator section). Kinds:

| kind | A_i for sample i of a group g with rewards r_g (size n) |
|---|---|
| ``grpo`` | ``(r_i - mean(r_g)) / (std(r_g) + 1e-6)``, std unbiased (n - 1), as GRPO and veRL |
| ``dr_grpo`` | ``r_i - mean(r_g)`` (no std: Dr.GRPO; the RL half of HPT, and LUFFY / SRFT in the HPT runs) |
| ``rloo`` | ``r_i - mean(r_g without r_i)`` = ``n / (n - 1) * (r_i - mean(r_g))`` |
| ``reinforce`` | ``r_i`` (no baseline) |

A group of one sample gets 0 from the three centred kinds (its only baseline is itself), as does
a group whose rewards are all equal; ``reinforce`` gives ``r`` there too.
"""
from __future__ import annotations

import torch
from torch import Tensor

ADVANTAGE_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce")
_GRPO_EPS = 1e-6


def is_correct(rewards: Tensor) -> Tensor:
    """Whether each sample counts as correct: reward > 0 (the verifier gives 1 or 0). bool, same shape."""
    return rewards > 0


def _check(rewards: Tensor, group_ids: Tensor, kind: str) -> None:
    if kind not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage kind {kind!r}; known: {', '.join(ADVANTAGE_ESTIMATORS)}")
    if not isinstance(rewards, Tensor) or not rewards.is_floating_point():
        got = rewards.dtype if isinstance(rewards, Tensor) else type(rewards).__name__
        raise TypeError(f"rewards must be a floating-point torch.Tensor, got {got}")
    if not isinstance(group_ids, Tensor) or group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        got = group_ids.dtype if isinstance(group_ids, Tensor) else type(group_ids).__name__
        raise TypeError(f"group_ids must be an integer torch.Tensor, got {got}")
    if rewards.dim() != 1 or tuple(group_ids.shape) != tuple(rewards.shape):
        raise ValueError(
            f"rewards and group_ids must both be [B]; got rewards {tuple(rewards.shape)} "
            f"and group_ids {tuple(group_ids.shape)}"
        )
    if rewards.numel() == 0:
        raise ValueError("rewards is empty")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN or inf")


def compute_advantages(rewards: Tensor, group_ids: Tensor, kind: str) -> Tensor:
    """Per-sample advantages, each sample compared with the other samples of its group (prompt).

    Args:
        rewards: float [B], one reward per sample.
        group_ids: int [B], the group (prompt) of each sample: any values, any order, groups of
            any size (e.g. LUFFY's groups of 1 demonstration + n - 1 rollouts).
        kind: one of ``ADVANTAGE_ESTIMATORS`` (table in the module docstring).
    Returns:
        advantages: [B], rewards' dtype (computed in float64).
    """
    _check(rewards, group_ids, kind)
    r = rewards.double()
    if kind == "reinforce":
        return rewards.clone()
    ids = torch.unique(group_ids, return_inverse=True)[1]
    n_groups = int(ids.max()) + 1
    count = torch.bincount(ids, minlength=n_groups).double()
    mean = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(0, ids, r) / count
    dev = r - mean[ids]  # exactly 0 in a group of one
    n = count[ids]
    if kind == "grpo":
        var = torch.zeros_like(mean).index_add_(0, ids, dev * dev) / (count - 1).clamp_min(1)
        adv = dev / (var.sqrt()[ids] + _GRPO_EPS)
    elif kind == "rloo":
        adv = dev * n / (n - 1).clamp_min(1)
    else:
        adv = dev
    return adv.to(rewards.dtype)
