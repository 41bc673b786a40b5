"""One training step of a tiny Qwen2 on each rank of a gloo group, its parameters sharded by
DeepSpeed ZeRO-3 or by FSDP2, with and without one of hpt_fast's patches:

    python -m torch.distributed.run --nproc_per_node=2 THIS {zero3,fsdp2} {trl,loss} OUT_DIR

``trl``: TRL's fused LM head (``add_fused_lm_head``), as TRL ships it and with hpt_fast's op
behind it (``patch_trl_fused_head``); ``loss``: the model's own ``model(..., labels=...).loss``,
as transformers computes it and through ``patch_causal_lm_loss``, given the DeepSpeed engine
(which patches the model inside it) or the FSDP2-sharded model. In float32 and in bf16 mixed
precision (DeepSpeed's bf16: bf16 weights, float32 master weights; FSDP2's
``MixedPrecisionPolicy``: bf16 compute, float32 parameters and reductions), untied and tied
embeddings. Under ZeRO-3 every parameter is partitioned, however small. Under FSDP2 each decoder
layer and the model are sharded, and an untied head is a unit of its own. For ``trl`` that head
never runs as a module, so TRL's forward hands its head (and so the op) the head's
``full_tensor()``, and its gradient is not reduced over the ranks, with TRL's head as with the op
(``full_tensor()``'s backward only slices; FSDP reduces a unit's gradients after its module's
backward): that case checks the op against TRL's head, not the reduction. ``patch_causal_lm_loss``
calls such a head with the op as its forward, so FSDP2 unshards it and reduces its gradient, as
around the model's own call of it. Each rank saves what it saw to OUT_DIR/rank_R.pt; ``compare``
is what the tests check of them.
"""
from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import transformers

import hpt_fast.causal_lm_loss as causal_lm_loss
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
    if not tied:  # an untied head as a unit of its own (see the module docstring)
        fully_shard(model.lm_head, **settings)
    fully_shard(model, **settings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return (model, lambda loss: loss.backward(), optimizer.step,
            lambda: {name: p.grad.full_tensor().clone() for name, p in model.named_parameters()},
            lambda: {name: p.detach().full_tensor().clone() for name, p in model.named_parameters()})


def _batch(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s (input ids, labels, advantages)."""
    g = torch.Generator().manual_seed(1 + rank)
    ids = torch.randint(0, 97, (2, 11), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    return ids, labels, torch.randn(2, 10, generator=g)


def _trl_loss(out: Any, advantages: torch.Tensor) -> torch.Tensor:
    return (out.log_probs * advantages).sum() + 0.1 * out.entropy.sum()


def _step(strategy: str, head: str, bf16: bool, tied: bool, patched: bool, rank: int) -> dict:
    torch.manual_seed(0)  # the same model on every rank
    config = transformers.Qwen2Config(
        vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, tie_word_embeddings=tied)
    model = transformers.Qwen2ForCausalLM(config)
    own_head_grads = []
    if head == "trl":
        import hpt_fast.trl_head as trl_head
        from trl.trainer import add_fused_lm_head

        if strategy == "fsdp2" and not (tied or bf16 or patched):
            # the head gradient of each rank's batch through TRL's head on an unsharded copy, for
            # what compare() checks of FSDP2's head of its own unit
            plain = copy.deepcopy(model)
            add_fused_lm_head(plain, temperature=0.7, outputs=OUTPUTS)
            for r in range(dist.get_world_size()):
                plain.zero_grad()
                ids, labels, advantages = _batch(r)
                _trl_loss(plain(input_ids=ids, labels=labels, fused_lm_head=True), advantages).backward()
                own_head_grads.append(plain.lm_head.weight.grad.clone())
        add_fused_lm_head(model, temperature=0.7, outputs=OUTPUTS)
        owner, op_name = trl_head, "fused_token_logprobs"
        patch = trl_head.patch_trl_fused_head() if patched else contextlib.nullcontext()
    else:
        owner, op_name = causal_lm_loss, "fused_linear_loss"
    run, backward, step, grads, weights = {"zero3": _zero3, "fsdp2": _fsdp2}[strategy](model, tied, bf16)
    if head == "loss":
        # patched through what runs it: the DeepSpeed engine (the model inside is patched), or
        # the model FSDP2 shards in place
        patch = causal_lm_loss.patch_causal_lm_loss(run) if patched else contextlib.nullcontext()
    ids, labels, advantages = _batch(rank)  # each rank its own batch
    op_weights, gathers = [], []
    op, gathered = getattr(owner, op_name), zero3.gathered

    def seen_op(hidden, weight, *args, **kwargs):
        op_weights.append(type(weight).__name__)
        return op(hidden, weight, *args, **kwargs)

    def seen_gathered(*params):
        gathers.append([zero3.is_released(p) for p in params])
        return gathered(*params)

    setattr(owner, op_name, seen_op)
    zero3.gathered = seen_gathered
    try:
        with patch, warnings.catch_warnings():
            # no call may fall back to TRL's own head
            warnings.filterwarnings("error", message="hpt_fast's TRL head")
            if head == "trl":
                out = run(input_ids=ids, labels=labels, fused_lm_head=True)
                backward(_trl_loss(out, advantages))
                outputs = {k: getattr(out, k).detach().clone() for k in OUTPUTS}
            else:
                out = run(input_ids=ids, labels=labels)
                backward(out.loss)
                outputs = {"loss": out.loss.detach().clone()}
    finally:
        setattr(owner, op_name, op)
        zero3.gathered = gathered
    result = {"op_weights": op_weights, "gathers": gathers, "grads": grads(), "own_head_grads": own_head_grads,
              **outputs}
    step()
    return {**result, "weights": weights()}


def compare(ranks: list[dict], strategy: str, head: str) -> None:
    """Each rank's step through the op against the same step without the patch: the op served the
    call; the outputs, the reduced gradients of every parameter and the weights after the update
    equal the unpatched ones; the gradients are the same on both ranks (reduced over their
    different batches)."""
    for bf16 in (False, True):
        # bf16: TRL's mean logit sums bf16-rounded logits where the op's GEMV does not, the bf16
        # trunk's gradients differ in their last bits, and a float32 master weight that moves by
        # ~1e-6 may round to the neighbouring bf16 value; transformers' loss takes bf16 logits
        mean_tol, grad_tol, weight_rtol = (1e-5, 1e-5, 0.0) if not bf16 else (1e-2, 2e-2, 2**-7)
        for tied in (False, True):
            for rank in ranks:
                ours, theirs = rank[(bf16, tied, True)], rank[(bf16, tied, False)]
                assert theirs["op_weights"] == [] and len(ours["op_weights"]) == 1
                if strategy == "fsdp2":
                    # TRL hands the op a head of its own unit as its full_tensor(); the patched
                    # loss, the head's unsharded parameter
                    assert ours["op_weights"] == ["Parameter" if tied or head == "loss" else "Tensor"]
                elif head == "trl":  # the op's backward ran through zero3.gathered
                    assert len(ours["gathers"]) == 1
                else:  # DeepSpeed's own parameter access inside the engine's forward gathered the head
                    assert ours["gathers"] == []
                if head == "trl":
                    assert torch.equal(ours["is_top1"], theirs["is_top1"])
                    for key in ("log_probs", "entropy"):
                        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)
                    torch.testing.assert_close(ours["mean_logits"], theirs["mean_logits"], rtol=mean_tol,
                                               atol=mean_tol)
                else:
                    torch.testing.assert_close(ours["loss"], theirs["loss"], rtol=mean_tol, atol=mean_tol)
                assert set(ours["grads"]) == set(theirs["grads"])
                for name, want in theirs["grads"].items():
                    got = ours["grads"][name]
                    assert want.abs().max() > 0 and torch.isfinite(got).all(), name
                    assert float((got - want).norm() / want.norm()) < grad_tol, name
                # AdamW's steps (lr 1e-2) are ~1e-2 per element whatever the gradient's size, so a
                # last-bit gradient difference moves a weight by up to ~1e-6
                if head == "loss" and bf16:
                    # transformers' bf16 logits against the op's float32 ones move the gradients by
                    # ~0.5%, which flips the sign of a few near-zero elements: AdamW moves those by
                    # up to 2 lr the other way
                    close = [torch.isclose(ours["weights"][name], want, rtol=weight_rtol, atol=1e-5)
                             for name, want in theirs["weights"].items()]
                    assert 1 - float(torch.cat([c.flatten() for c in close]).float().mean()) < 0.01
                    for name, want in theirs["weights"].items():
                        assert float((ours["weights"][name] - want).abs().max()) <= 2.1e-2, name
                else:
                    for name, want in theirs["weights"].items():
                        torch.testing.assert_close(ours["weights"][name], want, rtol=weight_rtol, atol=1e-5)
            for name, g in ranks[0][(bf16, tied, True)]["grads"].items():
                torch.testing.assert_close(ranks[1][(bf16, tied, True)]["grads"][name], g, rtol=0, atol=0)
            output = "log_probs" if head == "trl" else "loss"
            assert not torch.equal(ranks[0][(bf16, tied, True)][output], ranks[1][(bf16, tied, True)][output])
    if strategy == "fsdp2" and head == "trl":
        # TRL's FSDP2 head of its own unit (README): each rank's shard of its gradient is that
        # rank's own batch's, not the mean over the ranks the other parameters get. When a TRL
        # release reduces it, this fails, and the README's sentence goes.
        own = ranks[0][(False, False, False)]["own_head_grads"]
        shards = torch.cat([g.chunk(len(own))[r] for r, g in enumerate(own)])
        for rank in ranks:
            for patched in (False, True):
                got = rank[(False, False, patched)]["grads"]["lm_head.weight"]
                torch.testing.assert_close(got, shards, rtol=1e-5, atol=1e-6)
                assert float((got - sum(own) / len(own)).abs().max()) > 1e-3


def launch(strategy: str, head: str, out_dir: Path) -> list[dict]:
    """Run this script on two ranks; what each saw."""
    import os
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_port", str(29500 + (os.getpid() + 500) % 1000), __file__, strategy, head, str(out_dir)]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(out_dir / f"rank_{r}.pt") for r in range(2)]


def main(strategy: str, head: str, out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from transformers.integrations import HfDeepSpeedConfig

    # while it lives, transformers (and so TRL's head) see ZeRO-3
    zero3_config = [HfDeepSpeedConfig(ZERO3)] if strategy == "zero3" else []
    results = {(bf16, tied, patched): _step(strategy, head, bf16, tied, patched, rank)
               for bf16 in (False, True) for tied in (False, True) for patched in (False, True)}
    zero3_config.clear()
    torch.save(results, out_dir / f"rank_{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
