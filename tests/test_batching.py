"""Micro-batch packing, and the trainer's two sources of old log-probs agreeing."""
import pytest
import torch

from hpt_fast.batching import IGNORE_INDEX, Row, collate, pack
from hpt_fast.ops import fused_token_logprobs
from hpt_fast.rollout import NativeEngine
from hpt_fast.toy import build_toy, default_toy_dir, load_toy


def _row(p: int, prompt_len: int, resp_len: int, off: bool = False) -> Row:
    # advantage and reward differ by row and from each other, so a mix-up shows
    return Row(p, list(range(1, prompt_len + 1)), list(range(10, 10 + resp_len)), 0.5 + p, off, float(p % 2),
               None if off else [-0.1] * resp_len)


def test_collate_aligns_targets_with_predicting_positions():
    rows = [_row(0, 3, 2), _row(1, 1, 4, off=True)]
    mb = collate(rows, [0, 1], pad_id=0)
    assert mb.input_ids.tolist() == [[1, 2, 3, 10, 11], [1, 10, 11, 12, 13]]
    assert mb.targets.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 10, 11], [10, 11, 12, 13]]
    assert mb.mask.sum().item() == 6 and mb.off_policy.tolist() == [False, True]
    assert mb.sample_logprobs[0].tolist() == pytest.approx([0, 0, -0.1, -0.1])
    assert mb.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    mb = collate(rows, [1, 0], pad_id=0)  # the order asked for, padding on the right
    assert mb.rows == [1, 0] and mb.advantages.tolist() == [1.5, 0.5] and mb.rewards.tolist() == [1.0, 0.0]
    assert mb.input_ids.tolist() == [[1, 10, 11, 12, 13], [1, 2, 3, 10, 11]]
    short = collate([_row(0, 2, 1), _row(1, 1, 4)], [0, 1], pad_id=7)
    assert short.input_ids[0].tolist() == [1, 2, 10, 7, 7] and short.attention_mask[0].tolist() == [1, 1, 1, 0, 0]
    assert short.targets[0].tolist() == [IGNORE_INDEX, 10, IGNORE_INDEX, IGNORE_INDEX]


def test_pack_respects_the_token_budget_and_keeps_every_row():
    rows = [_row(i, 1 + i % 5, 1 + (7 * i) % 11) for i in range(23)]
    groups = pack(rows, token_budget=40)
    assert sorted(i for g in groups for i in g) == list(range(23))
    for g in groups:
        assert len(g) == 1 or len(g) * max(len(rows[i]) for i in g) <= 40
    with pytest.raises(ValueError, match="token_budget"):
        pack(rows, 0)


def test_pack_fills_each_micro_batch_longest_first():
    """Rows of lengths 5, 3, 8, 4, 2 under a budget of 12: the 8 alone (two would be 16), then
    5 + 4 (2 x 5 = 10; a third row would make 15), then 3 + 2."""
    rows = [_row(0, 2, 3), _row(1, 1, 2), _row(2, 3, 5), _row(3, 2, 2), _row(4, 1, 1)]
    assert pack(rows, token_budget=12) == [[2], [0, 3], [1, 4]]
    assert pack(rows, token_budget=100) == [[2, 0, 3, 1, 4]]
    assert pack(rows, token_budget=1) == [[2], [0], [3], [1], [4]]  # each row alone, however long


def test_sampler_logprobs_equal_the_recomputed_old_logprobs():
    """rollout.old_logprobs = "sampler" may stand in for the no-grad forward ("recompute")."""
    model, tok = load_toy(build_toy(default_toy_dir()))
    engine = NativeEngine(model)
    prompts = [tok("1+2=")["input_ids"], tok("3+4+5=")["input_ids"]]
    samples = engine.generate(prompts, n=2, max_new_tokens=12, temperature=0.8, seed=3,
                              stop_token_ids=[tok.eos_token_id])
    rows = [Row(p, prompts[p], s.token_ids, 1.0, False, 0.0, s.logprobs.tolist())
            for p, group in enumerate(samples) for s in group]
    mb = collate(rows, list(range(len(rows))), tok.pad_token_id)
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=mb.input_ids, attention_mask=mb.attention_mask).last_hidden_state[:, :-1]
        logp, _ = fused_token_logprobs(hidden, model.get_output_embeddings().weight, mb.targets, temperature=0.8)
    assert torch.allclose(logp[mb.mask], mb.sample_logprobs[mb.mask], atol=1e-4)
