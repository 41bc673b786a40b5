"""Training rows -> padded micro-batches packed by a token budget.

A row is one response to train on: a rollout (on-policy) or a demonstration (off-policy), with its
prompt. A micro-batch holds the model's inputs (prompt + response, right-padded) and, aligned with
the positions that predict the next token, the targets and the estimator's per-row inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Row:
    """One response to train on.

    Attributes:
        prompt_index: which prompt of the step's batch the row answers.
        prompt_ids, response_ids: token ids (the response is what the loss scores).
        advantage: A_hat of the row (1.0 for an SFT demonstration).
        off_policy: True for a demonstration.
        reward: the verifier's reward of the response (0/1).
        sample_logprobs: the sampler's log-probabilities of ``response_ids`` (float32 values), or
            None (demonstrations, or engines whose log-probs are not used).
    """

    prompt_index: int
    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    advantage: float
    off_policy: bool
    reward: float
    sample_logprobs: Optional[Sequence[float]] = None

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class MicroBatch:
    """Padded tensors of some rows (B rows, T = longest row - 1 predicting positions).

    Attributes:
        input_ids: [B, T + 1] int64, prompt + response, right-padded with ``pad_id``.
        attention_mask: [B, T + 1] int64, 1 on real tokens.
        targets: [B, T] int64, the next token at each position, IGNORE_INDEX outside responses.
        mask: [B, T] bool, True where ``targets`` is a response token.
        advantages, rewards: [B] float32; off_policy: [B] bool.
        sample_logprobs: [B, T] float32 aligned with ``targets`` (0 elsewhere), or None when any
            on-policy row lacks them.
        rows: the indices of these rows in the list given to ``pack``.
    """

    input_ids: Tensor
    attention_mask: Tensor
    targets: Tensor
    mask: Tensor
    advantages: Tensor
    rewards: Tensor
    off_policy: Tensor
    sample_logprobs: Optional[Tensor]
    rows: list[int]

    def to(self, device: torch.device) -> "MicroBatch":
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in vars(self).items()}
        return MicroBatch(**moved)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(rows: Sequence[Row], indices: Sequence[int], pad_id: int) -> MicroBatch:
    """The micro-batch of ``rows[i] for i in indices`` (see ``MicroBatch``)."""
    chosen = [rows[i] for i in indices]
    width = max(len(r) for r in chosen)
    b = len(chosen)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention = torch.zeros((b, width), dtype=torch.long)
    targets = torch.full((b, width - 1), IGNORE_INDEX, dtype=torch.long)
    with_logprobs = all(r.sample_logprobs is not None for r in chosen if not r.off_policy)
    sample_logprobs = torch.zeros((b, width - 1), dtype=torch.float32) if with_logprobs else None
    for k, r in enumerate(chosen):
        seq = list(r.prompt_ids) + list(r.response_ids)
        input_ids[k, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[k, : len(seq)] = 1
        # the response token at sequence position p is predicted from position p - 1
        start, end = len(r.prompt_ids) - 1, len(seq) - 1
        targets[k, start:end] = torch.tensor(list(r.response_ids), dtype=torch.long)
        if sample_logprobs is not None and r.sample_logprobs is not None:
            sample_logprobs[k, start:end] = torch.tensor(list(r.sample_logprobs), dtype=torch.float32)
    return MicroBatch(
        input_ids=input_ids,
        attention_mask=attention,
        targets=targets,
        mask=targets != IGNORE_INDEX,
        advantages=torch.tensor([r.advantage for r in chosen], dtype=torch.float32),
        rewards=torch.tensor([r.reward for r in chosen], dtype=torch.float32),
        off_policy=torch.tensor([r.off_policy for r in chosen], dtype=torch.bool),
        sample_logprobs=sample_logprobs,
        rows=list(indices),
    )


def pack(rows: Sequence[Row], token_budget: int) -> list[list[int]]:
    """Group row indices into micro-batches whose padded size (rows x longest) fits the budget.

    Rows are taken longest first, so rows of similar length share a micro-batch and padding stays
    small; a row longer than the budget gets a micro-batch of its own.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    for i, r in enumerate(rows):
        if len(r.prompt_ids) < 1 or len(r.response_ids) < 1:
            raise ValueError(f"row {i} needs at least one prompt and one response token")
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    groups: list[list[int]] = []
    for i in order:
        # the first row of a group is its longest, so the group's width is fixed by it
        if groups and (len(groups[-1]) + 1) * len(rows[groups[-1][0]]) <= token_budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups
