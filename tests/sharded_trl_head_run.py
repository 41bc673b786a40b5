"""One training step of a tiny Qwen2 through TRL's fused LM head on each rank of a gloo group,
its parameters sharded by DeepSpeed ZeRO-3 or by FSDP2:

    python -m torch.distributed.run --nproc_per_node=2 THIS {zero3,fsdp2} OUT_DIR

with the head TRL ships and with hpt_fast's op behind it (``patch_trl_fused_head``), in float32
and in bf16 mixed precision (DeepSpeed's bf16: bf16 weights, float32 master weights; FSDP2's
``MixedPrecisionPolicy``: bf16 compute, float32 parameters and reductions), untied and tied
embeddings. Under ZeRO-3 every parameter is partitioned, however small; under FSDP2 each
decoder layer and the model are sharded, and an untied head is a unit of its own, so TRL's
forward finds it still sharded and hands the op its ``full_tensor()``. Each rank saves what it
saw to OUT_DIR/rank_R.pt for tests/test_trl_head.py to compare.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import transformers
from trl.trainer import add_fused_lm_head

import hpt_fast.trl_head as trl_head
from hpt_fast import zero3

# the default (1e5) would keep this model's parameters whole
ZERO3 = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 2**31 - 1,
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
OUTPUTS = ("log_probs", "entropy", "is_top1", "mean_logits")


Wrapped = tuple[Any, Callable, Callable, Callable, Callable]


def _zero3(model: torch.nn.Module, tied: bool, bf16: bool) -> Wrapped:
    """What runs the forward, the backward (given the loss), the update, and what returns the full
    gradients and the full weights of every parameter (collectives: every rank calls them)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                      config={**ZERO3, "bf16": {"enabled": bf16}}, dist_init_required=False)
    assert zero3.is_released(engine.module.lm_head.weight), "the head is not partitioned"

    def weights():
        out = {}
        for name, p in engine.module.named_parameters():
            with zero3.gathered(p):
                out[name] = p.detach().clone()
        return out

    return (engine, engine.backward, engine.step,
            lambda: {name: safe_get_full_grad(p).clone() for name, p in engine.module.named_parameters()}, weights)


def _fsdp2(model: torch.nn.Module, tied: bool, bf16: bool) -> Wrapped:
    """As ``_zero3``, under FSDP2 (``bf16``: bf16 compute, float32 parameters and reductions)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    settings = {"mesh": init_device_mesh("cpu", (dist.get_world_size(),))}
    if bf16:
        settings["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, **settings)
    if not tied:
        fully_shard(model.lm_head, **settings)
    fully_shard(model, **settings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return (model, lambda loss: loss.backward(), optimizer.step,
            lambda: {name: p.grad.full_tensor().clone() for name, p in model.named_parameters()},
            lambda: {name: p.detach().full_tensor().clone() for name, p in model.named_parameters()})


def _step(strategy: str, bf16: bool, tied: bool, patched: bool, rank: int) -> dict:
    torch.manual_seed(0)  # the same model on every rank
    config = transformers.Qwen2Config(
        vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, tie_word_embeddings=tied)
    model = transformers.Qwen2ForCausalLM(config)
    add_fused_lm_head(model, temperature=0.7, outputs=OUTPUTS)
    run, backward, step, grads, weights = {"zero3": _zero3, "fsdp2": _fsdp2}[strategy](model, tied, bf16)
    g = torch.Generator().manual_seed(1 + rank)  # each rank its own batch
    ids = torch.randint(0, 97, (2, 11), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    advantages = torch.randn(2, 10, generator=g)
    op_weights, backward_gathers = [], []
    op, gathered = trl_head.fused_token_logprobs, zero3.gathered

    def seen_op(hidden, weight, *args, **kwargs):
        op_weights.append(type(weight).__name__)
        return op(hidden, weight, *args, **kwargs)

    def seen_gathered(*params):
        backward_gathers.append([zero3.is_released(p) for p in params])
        return gathered(*params)

    trl_head.fused_token_logprobs, zero3.gathered = seen_op, seen_gathered
    try:
        with (trl_head.patch_trl_fused_head() if patched else contextlib.nullcontext()):
            with warnings.catch_warnings():
                # no call may fall back to TRL's own head
                warnings.filterwarnings("error", message="hpt_fast's TRL head")
                out = run(input_ids=ids, labels=labels, fused_lm_head=True)
                backward((out.log_probs * advantages).sum() + 0.1 * out.entropy.sum())
    finally:
        trl_head.fused_token_logprobs, zero3.gathered = op, gathered
    result = {"op_weights": op_weights, "backward_gathers": backward_gathers, "grads": grads(),
              **{k: getattr(out, k).detach().clone() for k in OUTPUTS}}
    step()
    return {**result, "weights": weights()}


def main(strategy: str, out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from transformers.integrations import HfDeepSpeedConfig

    # while it lives, transformers (and so TRL's head) see ZeRO-3
    zero3_config = [HfDeepSpeedConfig(ZERO3)] if strategy == "zero3" else []
    results = {(bf16, tied, patched): _step(strategy, bf16, tied, patched, rank)
               for bf16 in (False, True) for tied in (False, True) for patched in (False, True)}
    zero3_config.clear()
    torch.save(results, out_dir / f"rank_{rank}.pt")
    dist.destroy_process_group()

if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
