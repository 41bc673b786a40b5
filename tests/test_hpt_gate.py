"""Batch rules: the HPT gate (P > gamma -> RL, else SFT), LUFFY mixing, SFT / RL rows, SFT-then-RL."""
import pytest
import torch

from hpt_fast.hpt import (
    SFTThenRL, assemble_hpt_rows, assemble_luffy_rows, assemble_rl_rows, assemble_sft_rows, hpt_gate,
)


def _rewards(*correct_counts: int, n: int = 8) -> torch.Tensor:
    """One prompt per count, with that many correct (1.0) rollouts out of n, correct ones last."""
    return torch.tensor([[0.0] * (n - k) + [1.0] * k for k in correct_counts])


def _check_rows(rows, prompt, sample, off_policy, advantages):
    assert rows.prompt.tolist() == prompt
    assert rows.sample.tolist() == sample
    assert rows.off_policy.tolist() == off_policy
    torch.testing.assert_close(rows.advantages, torch.tensor(advantages))


def test_all_wrong_is_sft_all_right_is_rl():
    assert hpt_gate(_rewards(0, 8), gamma=0.0).tolist() == [False, True]
    assert hpt_gate(_rewards(0, 0), gamma=0.0).tolist() == [False, False]
    assert hpt_gate(_rewards(8, 8), gamma=0.5).tolist() == [True, True]


def test_qwen_setting_gamma_zero():
    # gamma = 0: SFT only when every rollout fails
    assert hpt_gate(_rewards(0, 1, 2), gamma=0.0).tolist() == [False, True, True]


def test_llama_setting_at_most_two_of_eight():
    # "SFT when at most 2 of 8 are correct" is gamma = 2/8 = 0.25; P == gamma stays SFT (P > gamma is RL)
    assert hpt_gate(_rewards(0, 1, 2, 3, 8), gamma=0.25).tolist() == [False, False, False, True, True]


@pytest.mark.parametrize("k, n, gamma", [(3, 10, 0.3), (7, 10, 0.7), (2, 3, 2 / 3), (15, 22, 15 / 22), (1, 49, 1 / 49)])
def test_p_equal_to_gamma_is_sft_despite_float_rounding(k, n, gamma):
    # 0.3 * 10 = 3.0000000000000004 in floating point, but (15 / 22) * 22 = 14.999999999999998
    assert hpt_gate(_rewards(k, k + 1, n=n), gamma=gamma).tolist() == [False, True]


@pytest.mark.parametrize("k, n, gamma", [(3, 10, 0.2999999), (3, 10, 0.29999995), (2, 3, 0.666666), (1, 8, 0.1249999)])
def test_p_just_above_gamma_is_rl(k, n, gamma):
    # a fixed tolerance on gamma * n sent these to SFT
    assert hpt_gate(_rewards(k - 1, k, n=n), gamma=gamma).tolist() == [False, True]


def test_gamma_one_is_always_sft():
    assert hpt_gate(_rewards(8, 0), gamma=1.0).tolist() == [False, False]


def test_prompt_without_demonstration_stays_rl():
    use_rl = hpt_gate(_rewards(0, 0, 5), gamma=0.0, has_demo=torch.tensor([False, True, False]))
    assert use_rl.tolist() == [True, False, True]


def test_nonbinary_rewards_count_positive_as_correct():
    assert hpt_gate(torch.tensor([[-1.0, -1.0], [-1.0, 0.5]]), gamma=0.0).tolist() == [False, True]


def test_hpt_rows():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    # prompt 0: 4 rollouts; prompt 1: its demonstration; prompt 2: 4 rollouts, in prompt order;
    # dr_grpo advantages r - mean over the prompt's 4 rollouts, 1.0 for the demonstration
    _check_rows(
        assemble_hpt_rows(rewards, gamma=0.0),
        prompt=[0, 0, 0, 0, 1, 2, 2, 2, 2], sample=[0, 1, 2, 3, -1, 0, 1, 2, 3],
        off_policy=[False] * 4 + [True] + [False] * 4,
        advantages=[0.5, -0.5, -0.5, 0.5, 1.0, 0.25, 0.25, 0.25, -0.75],
    )


def test_hpt_rows_all_sft_and_grpo_advantages():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    _check_rows(assemble_hpt_rows(rewards, gamma=0.5), [0, 1], [-1, -1], [True, True], [1.0, 1.0])
    std = (0.5**0.5) + 1e-6  # unbiased std of (1, 0)
    _check_rows(
        assemble_hpt_rows(rewards, gamma=0.0, kind="grpo"),
        [0, 0, 1], [0, 1, -1], [False, False, True], [0.5 / std, -0.5 / std, 1.0],
    )


def test_hpt_rows_all_wrong_without_demonstration():
    # no demonstration to fall back on: the failed prompt stays RL with zero advantages
    rows = assemble_hpt_rows(_rewards(0, 4, n=4), gamma=0.0, has_demo=torch.tensor([False, True]))
    _check_rows(rows, [0] * 4 + [1] * 4, [0, 1, 2, 3] * 2, [False] * 8, [0.0] * 8)


def test_luffy_rows_mix_one_demonstration_with_the_rollouts():
    # n = 4: each prompt's group is its demonstration + 3 rollouts; prompt 1 has no demonstration
    rewards = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    demo_rewards = torch.tensor([1.0, 1.0, 0.0])
    rows = assemble_luffy_rows(rewards, demo_rewards, has_demo=torch.tensor([True, False, True]))
    # group 0: (1, 0, 0, 1), mean 0.5; group 1: (1, 0, 0), mean 1/3; group 2: all 0
    _check_rows(
        rows,
        prompt=[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2], sample=[-1, 0, 1, 2, 0, 1, 2, -1, 0, 1, 2],
        off_policy=[True, False, False, False, False, False, False, True, False, False, False],
        advantages=[0.5, -0.5, -0.5, 0.5, 2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0, 0.0],
    )


def test_luffy_rows_grpo_advantages_include_the_demonstration():
    rows = assemble_luffy_rows(torch.tensor([[0.0]]), torch.tensor([1.0]), kind="grpo")
    std = (0.5**0.5) + 1e-6
    _check_rows(rows, [0, 0], [-1, 0], [True, False], [0.5 / std, -0.5 / std])


def test_sft_and_rl_rows():
    _check_rows(assemble_sft_rows(3, has_demo=torch.tensor([True, False, True])), [0, 2], [-1, -1], [True, True],
                [1.0, 1.0])
    _check_rows(assemble_sft_rows(2), [0, 1], [-1, -1], [True, True], [1.0, 1.0])
    std = (0.5**0.5) + 1e-6
    _check_rows(assemble_rl_rows(torch.tensor([[1.0, 0.0], [0.0, 0.0]])), [0, 0, 1, 1], [0, 1, 0, 1], [False] * 4,
                [0.5 / std, -0.5 / std, 0.0, 0.0])


def test_sft_then_rl_schedule():
    schedule = SFTThenRL(sft_steps=3)
    assert [schedule.rule(step) for step in range(5)] == ["sft", "sft", "sft", "rl", "rl"]
    assert SFTThenRL(0).rule(0) == "rl"
    with pytest.raises(ValueError, match="sft_steps must be an int >= 0, got -1"):
        SFTThenRL(-1)
    with pytest.raises(ValueError, match="step must be an int >= 0, got 1.5"):
        schedule.rule(1.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"gamma": 2}, r"gamma must be a fraction in \[0, 1\], got 2; .* gamma = 0.25"),
        ({"gamma": -0.1}, "gamma must be a fraction"),
        ({"gamma": float("nan")}, "gamma must be a fraction"),
        ({"gamma": True}, "gamma must be a fraction"),
        ({"gamma": 0.0, "has_demo": torch.ones(3, dtype=torch.bool)},
         r"has_demo must be a bool tensor \[num_prompts\] = \[2\]"),
        ({"gamma": 0.0, "has_demo": torch.ones(2)}, "has_demo must be a bool tensor"),
    ],
)
def test_bad_gate_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hpt_gate(_rewards(0, 8), **kwargs)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: hpt_gate(torch.ones(8), gamma=0.0), ValueError, r"rewards must be a non-empty \[num_prompts, n\]"),
        (lambda: hpt_gate(torch.tensor([[float("nan"), 1.0]]), gamma=0.0), ValueError, "NaN"),
        (lambda: hpt_gate(torch.tensor([[float("inf"), 1.0]]), gamma=0.0), ValueError, "NaN or inf"),
        (lambda: assemble_luffy_rows(torch.ones(2, 3), torch.tensor([1.0, -float("inf")])), ValueError, "NaN or inf"),
        (lambda: hpt_gate(torch.ones(2, 2, dtype=torch.long), gamma=0.0), TypeError, "floating point"),
        (lambda: assemble_luffy_rows(torch.ones(2, 3), torch.ones(3)), ValueError,
         "demo_rewards has 3 prompts but rewards has 2"),
        (lambda: assemble_luffy_rows(torch.ones(2, 3), torch.ones(2, 1)), ValueError,
         r"demo_rewards must be a non-empty \[num_prompts\]"),
        (lambda: assemble_luffy_rows(torch.ones(2, 3), torch.ones(2), kind="gae"), ValueError,
         "unknown advantage kind 'gae'"),
        (lambda: assemble_sft_rows(0), ValueError, "num_prompts must be an int >= 1"),
    ],
)
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()
