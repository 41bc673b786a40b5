"""One training step in process, on the embedded toy task: which policy gives log pi_old when a step
makes several optimizer updates, and how the loss's statistics merge over micro-batches and updates."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpt_fast.config import load_config
from hpt_fast.reward import Scores
from hpt_fast.toy import use_toy
from hpt_fast.trainer import Trainer

# 4 prompts x 2 rollouts of at most 24 tokens, as tests/test_trainer.py
SMALL = ["train.prompts_per_step=4", "rollout.n=2", "data.max_response_length=24", "validation.every=0",
         "train.total_steps=1", "optim.warmup_steps=0"]


@pytest.fixture
def make_trainer(tmp_path):
    made = []

    def make(*overrides: str) -> Trainer:
        cfg = use_toy(load_config(None, [f"train.output_dir={tmp_path / 'run'}", *SMALL, *overrides]))
        made.append(Trainer(cfg))
        return made[-1]

    yield make
    for trainer in made:
        trainer.close()


def _rewards(trainer: Trainer, per_prompt: list[list[float]]) -> None:
    """Make the verifier return ``per_prompt[p][s]`` for rollout s of prompt p of the step."""
    flat = np.asarray(per_prompt, dtype=np.float32).reshape(-1)

    def score(texts, truths):
        assert len(texts) == flat.size
        return Scores(rewards=flat.copy(), outcomes=tuple("match" if r else "wrong" for r in flat))

    trainer.rewards.score = score


def _spy_updates(trainer: Trainer) -> list[tuple[list, list]]:
    """Record the (micro-batches, log pi_old) each optimizer update of the trainer is given."""
    seen, update = [], trainer._update

    def spy(rule, mbs, old, stats):
        seen.append((mbs, old))
        return update(rule, mbs, old, stats)

    trainer._update = spy
    return seen


def test_recomputed_old_logprobs_are_those_of_the_policy_that_sampled(make_trainer):
    """Two updates per step: the second update's pi_old must be the sampling policy, not the one the
    first update left (which made every ratio exactly 1 and switched clipping off)."""
    trainer = make_trainer("algorithm.method=grpo", "train.mini_batch_prompts=2", "rollout.old_logprobs=recompute",
                           "optim.lr=0.05")
    _rewards(trainer, [[1, 0], [0, 1], [1, 0], [0, 1]])
    seen = _spy_updates(trainer)
    metrics = trainer.train_step()
    assert len(seen) == 2
    for mbs, old in seen:
        for mb, o in zip(mbs, old):
            # the native engine samples in float32: its log-probs are the sampling policy's
            rollout = mb.mask & ~mb.off_policy[:, None]
            assert rollout.any()
            torch.testing.assert_close(o[rollout], mb.sample_logprobs[rollout], atol=1e-4, rtol=0)
    # the first update moved the policy, so the second one's ratios are not all 1
    assert metrics["ratio_max"] > 1.0 + 1e-4 and metrics["approx_kl"] != 0.0


def test_updates_with_and_without_rollouts_merge_their_statistics(make_trainer):
    """HPT, two updates: the first one's prompts all go to SFT, so only the second has ratio statistics
    (this raised KeyError); the step's are the second update's."""
    trainer = make_trainer("algorithm.method=hpt", "train.mini_batch_prompts=2")
    _rewards(trainer, [[0, 0], [0, 0], [1, 0], [0, 1]])
    seen = _spy_updates(trainer)
    metrics = trainer.train_step()
    assert [bool(mb.off_policy.all()) for mbs, _ in seen for mb in mbs] == [True] * len(seen[0][0]) + [False] * len(seen[1][0])
    assert metrics["sft_fraction"] == 0.5
    # demonstration rows: prompts 0 and 1; rollout rows: 2 per RL prompt
    assert metrics["batch_sft_fraction"] == pytest.approx(2 / 6)
    assert 0.0 <= metrics["clip_fraction"] <= 1.0 and metrics["ratio_max"] >= metrics["ratio_mean"] > 0.0


def test_ratio_statistics_are_over_rollout_tokens_only(make_trainer):
    """One update (ratio exactly 1) whose demonstrations get micro-batches of their own: those add
    no rollout tokens, so ratio_mean and ratio_max stay 1 (they were averaged down to 2/3)."""
    trainer = make_trainer("algorithm.method=hpt", "deepspeed.micro_batch_tokens=100")
    _rewards(trainer, [[0, 0], [0, 0], [1, 0], [0, 1]])
    seen = _spy_updates(trainer)
    metrics = trainer.train_step()
    (mbs, old), = seen
    assert old == [None] * len(mbs) and any(bool(mb.off_policy.all()) for mb in mbs)
    assert metrics["ratio_mean"] == 1.0 and metrics["ratio_max"] == 1.0 and metrics["clip_fraction"] == 0.0
    assert metrics["batch_sft_fraction"] == pytest.approx(2 / 6)
