"""The loss's statistics of one training step, merged over its micro-batches, updates and ranks.

``FusedUnifiedLoss`` returns statistics per micro-batch (``Estimator.__call__``): loss parts, which
add up to the micro-batch's share of its update's loss, and means over a set of tokens or rows. A
step's mean must be the mean over the whole step's set, so each one is merged weighted by the size
of the set it was taken over in each micro-batch: the rollout tokens for the ratio statistics (a
micro-batch of demonstrations has none), every response token for the entropy, the rows for the
fraction of demonstrations. ``ratio_max`` is a maximum. Loss parts are summed over the micro-batches
and ranks of an update and averaged over the updates, as the step's ``loss`` is.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from hpt_fast.batching import MicroBatch

# each statistic's merge: "sum", "max", or the set its mean is taken over
MERGE = {
    "rl_loss": "sum",
    "sft_loss": "sum",
    "entropy_loss": "sum",
    "sft_fraction": "rows",
    "entropy_mean": "tokens",
    "clip_fraction": "rollout_tokens",
    "ratio_mean": "rollout_tokens",
    "approx_kl": "rollout_tokens",
    "ratio_max": "max",
}
_INDEX = {name: i for i, name in enumerate(MERGE)}


class StepStats:
    """Running totals of one step's statistics, on ``device`` (no host sync until ``result``)."""

    def __init__(self, device: torch.device) -> None:
        # row 0: the weighted sums of the values, row 1: the weights (for "sum": micro-batches seen)
        self.totals = torch.zeros(2, len(MERGE), dtype=torch.float64, device=device)
        self.maxima = torch.full((len(MERGE),), -math.inf, dtype=torch.float64, device=device)

    def add(self, stats: dict[str, Tensor], mb: MicroBatch) -> None:
        """Merge one micro-batch's ``stats`` (0-d tensors, as the loss returned them for ``mb``)."""
        sizes = {
            "sum": 1,
            "rows": mb.mask.shape[0],
            "tokens": mb.mask.sum(),
            "rollout_tokens": (mb.mask & ~mb.off_policy[:, None]).sum(),
        }
        for name, value in stats.items():
            if name not in MERGE:
                raise KeyError(f"statistic {name!r} has no merge rule in hpt_fast.step_stats.MERGE")
            i, kind = _INDEX[name], MERGE[name]
            value = value.detach().to(self.totals)
            if kind == "max":
                self.maxima[i] = torch.maximum(self.maxima[i], value)
            else:
                self.totals[0, i] += value * sizes[kind]
                self.totals[1, i] += sizes[kind]

    def result(self, n_updates: int) -> dict[str, float]:
        """The step's statistics over every rank (a collective: all ranks call it), as floats.

        A statistic no micro-batch of any rank reported is left out.
        """
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.totals)
            dist.all_reduce(self.maxima, op=dist.ReduceOp.MAX)
        (sums, weights), maxima = self.totals.tolist(), self.maxima.tolist()
        out = {}
        for name, kind in MERGE.items():
            i = _INDEX[name]
            if kind == "max":
                if maxima[i] > -math.inf:
                    out[name] = maxima[i]
            elif weights[i] > 0:
                out[name] = sums[i] / (n_updates if kind == "sum" else weights[i])
        return out
