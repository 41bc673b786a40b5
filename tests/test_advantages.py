"""Group advantages against values worked out by hand from the definitions."""
import statistics

import pytest
import torch

from hpt_fast.advantages import ADVANTAGE_ESTIMATORS, compute_advantages, is_correct

GROUPS = [[1.0, 0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0], [0.5, -1.0, 2.0, 0.0, 1.5], [1.0, 0.0]]


def _by_hand(group: list[float], kind: str) -> list[float]:
    n, mean = len(group), statistics.fmean(group)
    if kind == "grpo":
        return [(r - mean) / (statistics.stdev(group) + 1e-6) for r in group]
    if kind == "dr_grpo":
        return [r - mean for r in group]
    if kind == "rloo":
        return [r - (sum(group) - r) / (n - 1) for r in group]
    return list(group)


@pytest.mark.parametrize("kind", ADVANTAGE_ESTIMATORS)
def test_matches_definition_per_group(kind):
    rewards = torch.tensor([r for g in GROUPS for r in g], dtype=torch.float64)
    ids = torch.tensor([i for i, g in enumerate(GROUPS) for _ in g])
    expected = torch.tensor([a for g in GROUPS for a in _by_hand(g, kind)], dtype=torch.float64)
    torch.testing.assert_close(compute_advantages(rewards, ids, kind), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ADVANTAGE_ESTIMATORS)
def test_only_group_membership_matters(kind):
    rewards = torch.tensor([r for g in GROUPS for r in g])
    ids = torch.tensor([i for i, g in enumerate(GROUPS) for _ in g])
    perm = torch.randperm(rewards.numel(), generator=torch.Generator().manual_seed(0))
    # shuffled samples, arbitrary id values
    shuffled = compute_advantages(rewards[perm], torch.tensor([7, 3, 11, -2])[ids][perm], kind)
    torch.testing.assert_close(shuffled, compute_advantages(rewards, ids, kind)[perm])
    assert shuffled.dtype == torch.float32


def test_uneven_groups_luffy_style():
    # LUFFY: 1 demonstration (reward 1) + 3 rollouts share a group; a second group has 2 samples
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    adv = compute_advantages(rewards, torch.tensor([0, 0, 0, 0, 1, 1]), "dr_grpo")
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, 0.5, -0.5, 0.5, -0.5], dtype=torch.float64))


@pytest.mark.parametrize("kind", ADVANTAGE_ESTIMATORS)
def test_group_of_one_is_zero_for_centred_kinds(kind):
    rewards = torch.tensor([0.75, 1.0, 0.0, 1.0])
    adv = compute_advantages(rewards, torch.tensor([0, 1, 1, 2]), kind)
    singles = adv[[0, 3]].tolist()
    assert singles == ([0.75, 1.0] if kind == "reinforce" else [0.0, 0.0])


def test_equal_rewards_give_zero():
    for kind in ("grpo", "dr_grpo", "rloo"):
        assert torch.equal(compute_advantages(torch.ones(3), torch.zeros(3, dtype=torch.long), kind), torch.zeros(3))


def test_is_correct_is_positive_reward():
    assert is_correct(torch.tensor([1.0, 0.0, -1.0, 0.5])).tolist() == [True, False, False, True]


IDS = torch.zeros(4, dtype=torch.long)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.ones(4), IDS, "ppo"), ValueError,
         "unknown advantage kind 'ppo'; known: grpo, dr_grpo, rloo, reinforce"),
        ((torch.ones(4), IDS[:3], "grpo"), ValueError, r"rewards \(4,\) and group_ids \(3,\)"),
        ((torch.ones(2, 2), IDS.reshape(2, 2), "grpo"), ValueError, r"must both be \[B\]"),
        ((torch.ones(4), IDS.float(), "grpo"), TypeError, "group_ids must be an integer"),
        ((torch.ones(4), IDS.bool(), "grpo"), TypeError, "group_ids must be an integer"),
        ((torch.tensor([1.0, float("nan"), 0.0, 0.0]), IDS, "grpo"), ValueError, "NaN"),
        ((torch.tensor([1.0, float("inf"), 0.0, 0.0]), IDS, "dr_grpo"), ValueError, "NaN or inf"),
        ((torch.ones(4, dtype=torch.long), IDS, "grpo"), TypeError, "floating-point"),
        ((torch.ones(0), IDS[:0], "grpo"), ValueError, "empty"),
    ],
)
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        compute_advantages(*args)
