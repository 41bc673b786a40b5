"""A step's statistics merged over its micro-batches and updates, against sums done by hand."""
import pytest
import torch

from hpt_fast.batching import Row, collate
from hpt_fast.step_stats import MERGE, StepStats


def _mb(*rows: tuple[int, bool]):
    """A micro-batch of rows given as (response tokens, is a demonstration), prompts of 2 tokens."""
    made = [Row(i, [1, 2], list(range(5, 5 + n)), 0.0, off, 0.0) for i, (n, off) in enumerate(rows)]
    return collate(made, list(range(len(made))), pad_id=0)


def _stats(**values: float) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v) for k, v in values.items()}


# update 1: two rollouts (3 + 2 response tokens), then one demonstration (4 tokens), which reports
# no ratio statistics; update 2: a rollout of 1 token with a demonstration of 2
UPDATES = [
    [(_mb((3, False), (2, False)),
      _stats(rl_loss=1.0, sft_loss=0.0, entropy_loss=-0.1, sft_fraction=0.0, entropy_mean=2.0,
             clip_fraction=0.2, ratio_mean=1.1, approx_kl=0.01, ratio_max=1.5)),
     (_mb((4, True)),
      _stats(rl_loss=0.0, sft_loss=2.0, entropy_loss=-0.2, sft_fraction=1.0, entropy_mean=1.0))],
    [(_mb((1, False), (2, True)),
      _stats(rl_loss=0.5, sft_loss=1.0, entropy_loss=-0.3, sft_fraction=0.5, entropy_mean=4.0,
             clip_fraction=1.0, ratio_mean=0.8, approx_kl=0.03, ratio_max=1.2))],
]


def test_each_statistic_is_merged_over_its_own_set():
    stats = StepStats(torch.device("cpu"))
    for update in UPDATES:
        for mb, values in update:
            stats.add(values, mb)
    got = stats.result(n_updates=2)
    want = {
        # loss parts: summed over an update's micro-batches, averaged over the updates
        "rl_loss": (1.0 + 0.0 + 0.5) / 2, "sft_loss": (0.0 + 2.0 + 1.0) / 2, "entropy_loss": (-0.1 - 0.2 - 0.3) / 2,
        # means over rows (2, 1, 2), response tokens (5, 4, 3) and rollout tokens (5, 0, 1)
        "sft_fraction": (0.0 * 2 + 1.0 * 1 + 0.5 * 2) / 5,
        "entropy_mean": (2.0 * 5 + 1.0 * 4 + 4.0 * 3) / 12,
        "clip_fraction": (0.2 * 5 + 1.0 * 1) / 6,
        "ratio_mean": (1.1 * 5 + 0.8 * 1) / 6,
        "approx_kl": (0.01 * 5 + 0.03 * 1) / 6,
        "ratio_max": 1.5,
    }
    assert set(got) == set(MERGE) == set(want)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-6), name


def test_a_statistic_no_micro_batch_reported_is_left_out():
    stats = StepStats(torch.device("cpu"))
    mb, values = UPDATES[0][1]  # demonstrations only: no ratio statistics
    stats.add(values, mb)
    assert set(stats.result(n_updates=1)) == {"rl_loss", "sft_loss", "entropy_loss", "sft_fraction", "entropy_mean"}


def test_an_unknown_statistic_is_refused():
    mb, _ = UPDATES[0][0]
    with pytest.raises(KeyError, match="statistic 'kl_to_ref' has no merge rule"):
        StepStats(torch.device("cpu")).add(_stats(kl_to_ref=0.1), mb)
