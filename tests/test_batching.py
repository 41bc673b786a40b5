"""Micro-batch packing, and the trainer's two sources of old log-probs agreeing."""
import pytest
import torch

from hpt_fast.batching import IGNORE_INDEX, Row, collate, pack
from hpt_fast.ops import fused_token_logprobs
from hpt_fast.rollout import NativeEngine
from hpt_fast.toy import build_toy, default_toy_dir, load_toy


def _row(p: int, prompt_len: int, resp_len: int, off: bool = False) -> Row:
    return Row(p, list(range(1, prompt_len + 1)), list(range(10, 10 + resp_len)), 0.5, off, 1.0,
               None if off else [-0.1] * resp_len)


def test_collate_aligns_targets_with_predicting_positions():
    rows = [_row(0, 3, 2), _row(1, 1, 4, off=True)]
    mb = collate(rows, [0, 1], pad_id=0)
    assert mb.input_ids.tolist() == [[1, 2, 3, 10, 11], [1, 10, 11, 12, 13]]
    assert mb.targets.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 10, 11], [10, 11, 12, 13]]
    assert mb.mask.sum().item() == 6 and mb.off_policy.tolist() == [False, True]
    assert mb.sample_logprobs[0].tolist() == pytest.approx([0, 0, -0.1, -0.1])


def test_pack_respects_the_token_budget_and_keeps_every_row():
    rows = [_row(i, 1 + i % 5, 1 + (7 * i) % 11) for i in range(23)]
    groups = pack(rows, token_budget=40)
    assert sorted(i for g in groups for i in g) == list(range(23))
    for g in groups:
        assert len(g) == 1 or len(g) * max(len(rows[i]) for i in g) <= 40
    with pytest.raises(ValueError, match="token_budget"):
        pack(rows, 0)


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
