"""The fused op with a DeepSpeed ZeRO-3 partitioned head (hpt_fast.zero3), on one gloo rank.

A partitioned parameter keeps its object and loses its data (an empty tensor) outside the
forward of the module that owns it. The op's forward refuses such a head with a clear error; its
backward gathers a head released since the forward again, as TRL's chunked head does.
"""
from __future__ import annotations

import pytest
import torch

from hpt_fast import fused_linear_loss, fused_token_logprobs, zero3

deepspeed = pytest.importorskip("deepspeed")


@pytest.fixture
def partitioned(one_rank_group, monkeypatch):
    """A bias-carrying head [V 53, H 12] partitioned under zero.Init (no size is too small to be),
    and a plain copy of its weight and bias."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    config = {"train_batch_size": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=config):
        head = torch.nn.Linear(12, 53)
    with deepspeed.zero.GatheredParameters(list(head.parameters())):
        plain = [p.detach().clone() for p in (head.weight, head.bias)]
    assert zero3.is_released(head.weight) and head.weight.numel() == 0
    return head, plain


def _inputs(n=19, hidden=12, vocab=53):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(n, hidden, generator=g)
    t = torch.randint(0, vocab, (n,), generator=g)
    t[3] = -100
    return h, t, torch.randn(n, generator=g), torch.randn(n, generator=g)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
def test_the_backward_gathers_a_head_released_since_the_forward(partitioned, backend, frozen, monkeypatch):
    """The forward runs while the caller holds the head gathered; the backward runs after it was
    released and gathers it again: log-probs, entropies and every gradient as with a plain head
    (a frozen head's too: hidden's gradient needs its values), and the head is released after.

    The gradients are taken with autograd.grad: outside a DeepSpeed engine nothing would take a
    partitioned parameter's .grad (its engine's hooks reduce-scatter it)."""
    head, (w_plain, b_plain) = partitioned
    head.requires_grad_(not frozen)
    h, t, g_logp, g_ent = _inputs()
    gathers = []
    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", _counting(deepspeed.zero.GatheredParameters, gathers))

    def grads(weight, bias):
        hidden = h.clone().requires_grad_()
        logp, ent = fused_token_logprobs(hidden, weight, t, bias=bias, temperature=0.8, return_entropy=True,
                                         backend=backend)
        return logp, ent, (hidden, *(() if frozen else (weight, bias)))

    with deepspeed.zero.GatheredParameters(list(head.parameters())):
        logp, ent, inputs = grads(head.weight, head.bias)
    assert zero3.is_released(head.weight) and zero3.is_released(head.bias)
    gathers.clear()
    got = torch.autograd.grad((logp, ent), inputs, (g_logp, g_ent))
    assert [len(g) for g in gathers] == [2], "the backward did not gather the released head once"
    assert zero3.is_released(head.weight) and zero3.is_released(head.bias)

    w, b = (x.clone().requires_grad_(not frozen) for x in (w_plain, b_plain))
    ref_logp, ref_ent, ref_inputs = grads(w, b)
    want = torch.autograd.grad((ref_logp, ref_ent), ref_inputs, (g_logp, g_ent))
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=0)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=0)
    assert len(got) == len(want) == (1 if frozen else 3)
    for a, ref in zip(got, want):
        assert torch.isfinite(a).all() and ref.abs().max() > 0
        torch.testing.assert_close(a, ref, rtol=1e-6, atol=1e-6)


def _counting(gathered_parameters, calls):
    """GatheredParameters, recording the parameters of each use."""
    def counted(params, *args, **kwargs):
        calls.append(list(params))
        return gathered_parameters(params, *args, **kwargs)
    return counted


def test_a_head_gathered_through_the_backward_is_left_to_its_owner(partitioned, monkeypatch):
    """A head its module's hooks (or a caller) keep gathered through the backward is not gathered
    again, nor released under its owner by the op."""
    head, _ = partitioned
    h, t, g_logp, _ = _inputs()
    gathers = []
    with deepspeed.zero.GatheredParameters(list(head.parameters())):
        monkeypatch.setattr(deepspeed.zero, "GatheredParameters", _counting(deepspeed.zero.GatheredParameters,
                                                                             gathers))
        logp, _ = fused_token_logprobs(h, head.weight, t, bias=head.bias, backend="torch")
        grad_w, = torch.autograd.grad((logp * g_logp).sum(), [head.weight])
        assert not zero3.is_released(head.weight) and not zero3.is_released(head.bias)
    assert gathers == [] and grad_w.shape == (53, 12)


@pytest.mark.parametrize("mode", ["A", "B"])
def test_a_released_head_is_refused_before_any_work(partitioned, mode):
    head, _ = partitioned
    h, t, *_ = _inputs()
    with pytest.raises(ValueError, match="weight is a DeepSpeed ZeRO-3 partitioned parameter that is not gathered"):
        if mode == "A":
            fused_token_logprobs(h, head.weight, t, bias=head.bias)
        else:
            fused_linear_loss(h, head.weight, t, lambda logp, ent, rows: -logp, bias=head.bias)
    with deepspeed.zero.GatheredParameters([head.weight]):  # the weight whole, the bias still released
        with pytest.raises(ValueError, match="bias is a DeepSpeed ZeRO-3 partitioned parameter"):
            fused_token_logprobs(h, head.weight, t, bias=head.bias)
