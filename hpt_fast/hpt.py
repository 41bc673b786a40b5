"""Batch rules: which rows a step trains on, for every baseline of the paper.

Each ``assemble_*_rows`` function returns ``BatchRows``: the rows of one training batch, prompt by
prompt (a prompt's demonstration first, then its rollouts), each with its advantage and its
``off_policy`` flag, ready for the estimator (``est(..., advantages=rows.advantages,
off_policy=rows.off_policy)``). The trainer fills row r with rollout ``rows.sample[r]`` of prompt
``rows.prompt[r]``, or with that prompt's demonstration where ``rows.off_policy[r]``.

| baseline | rows | estimator preset |
|---|---|---|
| SFT | ``assemble_sft_rows`` | ``sft`` |
| GRPO | ``assemble_rl_rows`` | ``grpo`` |
| SFT then GRPO | ``SFTThenRL(k).rule(step)``: ``"sft"`` for the first k steps, then ``"rl"`` | ``sft``, then ``grpo`` |
| LUFFY | ``assemble_luffy_rows``: 1 demonstration + n - 1 rollouts per prompt | ``luffy`` |
| SRFT | ``assemble_luffy_rows`` | ``srft`` |
| HPT | ``assemble_hpt_rows``: the gate below | ``hpt`` |

The HPT gate (hpt.md section 2), per prompt and all-or-nothing: with n scored rollouts and
P = (number correct) / n, a rollout being correct when its reward is > 0,

- P > gamma: RL on the prompt's n rollouts, with group advantages (``dr_grpo`` by default: HPT's);
- P <= gamma: the rollouts are discarded and the prompt contributes one SFT row, its demonstration
  (advantage 1). P exactly equal to gamma is SFT, since the rule is strict;
- a prompt without a demonstration always stays RL: the SFT branch has nothing to train on, and
  its rollouts are still valid on-policy samples (all-equal rewards give zero advantages).

gamma is a fraction in [0, 1]. Published settings: Qwen2.5-Math gamma = 0 (SFT only when all 8
rollouts fail); LLaMA-3.1-8B "SFT when at most 2 of 8 are correct", i.e. gamma = 2 / 8 = 0.25.
The comparison is made on counts, ``correct > gamma * n``, where a ``gamma * n`` within float
rounding of an integer k (a few ulps) counts as k: a P that equals gamma on paper (0.3 with 3 of
10, 2/3 with 2 of 3) is not pushed above it by the rounding, and a gamma just below k / n
(0.2999999, or 0.29999995) still sends P = k / n to RL.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from hpt_fast.advantages import compute_advantages, is_correct


@dataclass(frozen=True)
class BatchRows:
    """The training rows of one batch, prompt by prompt (a prompt's rows are contiguous).

    Attributes:
        prompt: int64 [R], the prompt each row comes from.
        sample: int64 [R], the rollout index within the prompt's group; -1 for a demonstration.
        off_policy: bool [R], True for demonstration rows.
        advantages: float32 [R], each row's A_hat: the group advantage, or 1.0 for a demonstration
            trained by SFT (``assemble_sft_rows``, ``assemble_hpt_rows``).
    """

    prompt: Tensor
    sample: Tensor
    off_policy: Tensor
    advantages: Tensor


@dataclass(frozen=True)
class SFTThenRL:
    """SFT-then-RL as a schedule: which batch rule a training step uses.

    Attributes:
        sft_steps: int >= 0, the number of SFT steps (on demonstrations, ``assemble_sft_rows`` with
            the ``sft`` preset) before RL (``assemble_rl_rows`` with an RL preset, e.g. ``grpo``).
    """

    sft_steps: int

    def __post_init__(self) -> None:
        if isinstance(self.sft_steps, bool) or not isinstance(self.sft_steps, int) or self.sft_steps < 0:
            raise ValueError(f"sft_steps must be an int >= 0, got {self.sft_steps!r}")

    def rule(self, step: int) -> str:
        """"sft" for steps 0 .. sft_steps - 1, then "rl"."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        return "sft" if step < self.sft_steps else "rl"


def _check_rewards(name: str, rewards: Tensor, dims: int) -> None:
    shape = "[num_prompts, n]" if dims == 2 else "[num_prompts]"
    if not isinstance(rewards, Tensor) or rewards.dim() != dims or rewards.numel() == 0:
        got = tuple(rewards.shape) if isinstance(rewards, Tensor) else type(rewards).__name__
        raise ValueError(f"{name} must be a non-empty {shape} tensor, got {got}")
    if not rewards.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {rewards.dtype}")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError(f"{name} contain NaN or inf")


def _demo_flags(has_demo: Optional[Tensor], num_prompts: int, device: torch.device) -> Tensor:
    """bool [num_prompts]: whether each prompt has a demonstration (default: all do)."""
    if has_demo is None:
        return torch.ones(num_prompts, dtype=torch.bool, device=device)
    if not isinstance(has_demo, Tensor) or has_demo.dtype != torch.bool or tuple(has_demo.shape) != (num_prompts,):
        raise ValueError(
            f"has_demo must be a bool tensor [num_prompts] = [{num_prompts}], got "
            f"{getattr(has_demo, 'dtype', type(has_demo).__name__)} {tuple(getattr(has_demo, 'shape', ()))}"
        )
    return has_demo.to(device)


def _assemble(
    with_demo: Tensor,
    n_rollouts: Tensor,
    rewards: Optional[Tensor],
    demo_rewards: Optional[Tensor],
    kind: Optional[str],
) -> BatchRows:
    """Lay out the rows and compute their advantages.

    Args:
        with_demo: bool [P], the prompt has a demonstration row (placed first in its block).
        n_rollouts: int64 [P], how many of the prompt's rollouts are rows (rollouts 0 .. n - 1).
        rewards: float [P, n] of the rollouts, or None when no rollout is a row.
        demo_rewards: float [P]: the demonstrations join their prompt's group (LUFFY); None: they
            are SFT rows, advantage 1.
        kind: the ``compute_advantages`` kind of the groups; None when no row is in a group.
    """
    per_prompt = with_demo.long() + n_rollouts
    prompt = torch.arange(with_demo.numel(), device=with_demo.device).repeat_interleave(per_prompt)
    starts = torch.cumsum(per_prompt, 0) - per_prompt
    within = torch.arange(prompt.numel(), device=prompt.device) - starts[prompt]
    first_is_demo = with_demo[prompt].long()
    off_policy = (within == 0) & with_demo[prompt]
    sample = within - first_is_demo
    advantages = torch.ones(prompt.numel(), dtype=torch.float32, device=prompt.device)
    grouped = ~off_policy if demo_rewards is None else torch.ones_like(off_policy)
    if bool(grouped.any()):
        row_rewards = torch.zeros(prompt.numel(), dtype=torch.float64, device=prompt.device)
        if rewards is not None:
            rollout = ~off_policy
            row_rewards[rollout] = rewards[prompt[rollout], sample[rollout]].double()
        if demo_rewards is not None:
            row_rewards[off_policy] = demo_rewards[prompt[off_policy]].double()
        advantages[grouped] = compute_advantages(row_rewards[grouped], prompt[grouped], kind).float()
    return BatchRows(prompt=prompt, sample=sample, off_policy=off_policy, advantages=advantages)


def hpt_gate(rewards: Tensor, gamma: float, has_demo: Optional[Tensor] = None) -> Tensor:
    """Decide SFT or RL for each prompt (rule in the module docstring).

    Args:
        rewards: float [num_prompts, n], the rollouts' rewards (correct when > 0).
        gamma: the threshold fraction in [0, 1]: RL when P > gamma.
        has_demo: bool [num_prompts], whether each prompt has a demonstration (default: all do).
    Returns:
        use_rl: bool [num_prompts], True: RL on the rollouts; False: SFT on the demonstration.
    """
    _check_rewards("rewards", rewards, 2)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (0.0 <= gamma <= 1.0):
        raise ValueError(
            f"gamma must be a fraction in [0, 1], got {gamma!r}; for 'SFT when at most k of n are "
            f"correct' pass gamma = k / n (the LLaMA setting, 2 of 8, is gamma = 0.25)"
        )
    has_demo = _demo_flags(has_demo, rewards.shape[0], rewards.device)
    correct = is_correct(rewards).sum(dim=1)
    n = rewards.shape[1]
    # P > gamma on integers: correct > floor(gamma * n), where gamma * n a few ulps off k is k
    # (float(k / n) * n lands on either side of k)
    scaled = gamma * n
    nearest = round(scaled)
    most_for_sft = nearest if abs(scaled - nearest) <= 4 * n * sys.float_info.epsilon else math.floor(scaled)
    return (correct > most_for_sft) | ~has_demo


def assemble_hpt_rows(
    rewards: Tensor, gamma: float, has_demo: Optional[Tensor] = None, kind: str = "dr_grpo"
) -> BatchRows:
    """HPT: gate the prompts, then n rollouts per RL prompt or one demonstration per SFT prompt.

    Args:
        rewards, gamma, has_demo: as in ``hpt_gate``.
        kind: the ``compute_advantages`` kind of the rollout rows, over each RL prompt's n rollouts.
    Returns:
        BatchRows; demonstration rows have advantage 1.0 (SFT).
    """
    use_rl = hpt_gate(rewards, gamma, has_demo)
    n_rollouts = torch.where(use_rl, rewards.shape[1], 0)
    return _assemble(~use_rl, n_rollouts, rewards, None, kind)


def assemble_luffy_rows(
    rewards: Tensor, demo_rewards: Tensor, has_demo: Optional[Tensor] = None, kind: str = "dr_grpo"
) -> BatchRows:
    """LUFFY (and SRFT) mixing: per prompt, its demonstration + its n - 1 rollouts in one group.

    Args:
        rewards: float [num_prompts, n - 1], the rollouts' rewards.
        demo_rewards: float [num_prompts], the demonstrations' rewards from the same verifier.
        has_demo: bool [num_prompts] (default: all do); a prompt without one has only its rollouts.
        kind: the ``compute_advantages`` kind, over each prompt's mixed group (the HPT repository's
            LUFFY and SRFT runs: ``dr_grpo``).
    Returns:
        BatchRows; demonstration rows carry their group advantage.
    """
    _check_rewards("rewards", rewards, 2)
    _check_rewards("demo_rewards", demo_rewards, 1)
    if demo_rewards.shape[0] != rewards.shape[0]:
        raise ValueError(
            f"demo_rewards has {demo_rewards.shape[0]} prompts but rewards has {rewards.shape[0]}"
        )
    has_demo = _demo_flags(has_demo, rewards.shape[0], rewards.device)
    n_rollouts = torch.full_like(has_demo, rewards.shape[1], dtype=torch.long)
    return _assemble(has_demo, n_rollouts, rewards, demo_rewards.to(rewards.device), kind)


def assemble_rl_rows(rewards: Tensor, kind: str = "grpo") -> BatchRows:
    """RL only (GRPO and the RL phase of SFT-then-RL): every rollout, group advantages per prompt.

    Args:
        rewards: float [num_prompts, n], the rollouts' rewards.
        kind: the ``compute_advantages`` kind.
    """
    _check_rewards("rewards", rewards, 2)
    num_prompts, n = rewards.shape
    n_rollouts = torch.full((num_prompts,), n, dtype=torch.long, device=rewards.device)
    return _assemble(torch.zeros_like(n_rollouts, dtype=torch.bool), n_rollouts, rewards, None, kind)


def assemble_sft_rows(num_prompts: int, has_demo: Optional[Tensor] = None) -> BatchRows:
    """SFT only (SFT and the SFT phase of SFT-then-RL): one demonstration row per prompt that has one.

    Args:
        num_prompts: int >= 1.
        has_demo: bool [num_prompts] (default: all do).
    """
    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1:
        raise ValueError(f"num_prompts must be an int >= 1, got {num_prompts!r}")
    device = has_demo.device if isinstance(has_demo, Tensor) else None
    has_demo = _demo_flags(has_demo, num_prompts, device)
    return _assemble(has_demo, torch.zeros(num_prompts, dtype=torch.long, device=has_demo.device), None, None, None)
