"""One training step of a tiny Qwen2 through TRL's fused LM head under DeepSpeed ZeRO-3, on each
rank of a gloo group (``python -m torch.distributed.run --nproc_per_node=2 THIS OUT_DIR``), with
the head TRL ships and with hpt_fast's op behind it (``patch_trl_fused_head``), untied and tied
embeddings. Each rank saves what it saw to OUT_DIR/rank_R.pt for tests/test_trl_head.py to compare.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import transformers
from deepspeed.utils import safe_get_full_grad
from transformers.integrations import HfDeepSpeedConfig
from trl.trainer import add_fused_lm_head

import hpt_fast.trl_head as trl_head
from hpt_fast import zero3

# every parameter partitioned, however small (the default keeps those under 1e5 elements whole)
CONFIG = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 2**31 - 1,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
OUTPUTS = ("log_probs", "entropy", "is_top1", "mean_logits")


def _step(tied: bool, patched: bool, rank: int) -> dict:
    torch.manual_seed(0)  # the same model on every rank
    config = transformers.Qwen2Config(
        vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, tie_word_embeddings=tied)
    model = transformers.Qwen2ForCausalLM(config)
    add_fused_lm_head(model, temperature=0.7, outputs=OUTPUTS)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                      config=CONFIG, dist_init_required=False)
    head = engine.module.lm_head.weight
    assert zero3.is_released(head), "the head is not partitioned"
    g = torch.Generator().manual_seed(1 + rank)  # each rank its own batch
    ids = torch.randint(0, 97, (2, 11), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    advantages = torch.randn(2, 10, generator=g)
    op_calls, released_at_backward = [], []
    op, gathered = trl_head.fused_token_logprobs, zero3.gathered

    def counted_op(*args, **kwargs):
        op_calls.append(1)
        return op(*args, **kwargs)

    def seen_gathered(*params):
        released_at_backward.append([zero3.is_released(p) for p in params])
        return gathered(*params)

    trl_head.fused_token_logprobs, zero3.gathered = counted_op, seen_gathered
    try:
        with (trl_head.patch_trl_fused_head() if patched else contextlib.nullcontext()):
            with warnings.catch_warnings():
                # no call may fall back to TRL's own head
                warnings.filterwarnings("error", message="hpt_fast's TRL head")
                out = engine(input_ids=ids, labels=labels, fused_lm_head=True)
                loss = (out.log_probs * advantages).sum() + 0.1 * out.entropy.sum()
                engine.backward(loss)
    finally:
        trl_head.fused_token_logprobs, zero3.gathered = op, gathered
    grads = {name: safe_get_full_grad(p).clone() for name, p in engine.module.named_parameters()}
    engine.step()
    weights = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            weights[name] = p.detach().clone()
    return {"op_calls": len(op_calls), "released_at_backward": released_at_backward, "grads": grads,
            "weights": weights, **{k: getattr(out, k).detach().clone() for k in OUTPUTS}}


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    zero3_on = HfDeepSpeedConfig(CONFIG)  # transformers (and TRL's head) see ZeRO-3 while it lives
    results = {(tied, patched): _step(tied, patched, rank) for tied in (False, True) for patched in (False, True)}
    del zero3_on
    torch.save(results, out_dir / f"rank_{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
