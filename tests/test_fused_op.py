"""Both modes of the fused op, on every backend and in both gradient orders, against a float64
reference of the naive computation."""
from __future__ import annotations

import math
import os
import re
import dataclasses
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from torch import Tensor

from hpt_fast import backends, fused_linear_loss, fused_token_logprobs, op_passes, op_plan
from hpt_fast.backends import row_state
from tests.reference import backend_device, reference_logprobs, rel_err

BACKENDS = ["torch", "cpu", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# bf16 / fp16 logits blocks are rounded to the input dtype by the GEMM, as in every bf16 trainer
TOL = {torch.float32: 2e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2}
# (tokens, hidden, vocab); the interpreted Triton kernels get the small ones only (on a GPU, all)
CASES = [(1, 1, 1), (5, 3, 7), (37, 64, 1001), (130, 300, 4099), (64, 17, 32003)]
TRITON_CASES = [(5, 3, 7), (33, 16, 1001), (17, 40, 2999)]
# tokens per block, by case: several token chunks, and vocabulary slabs (chunk * V // N columns)
# that do not divide V, for most cases
CHUNK_SIZES = [None, 4, 16, 33, 4]
ORDERS = ["tokens", "vocab"]


def _skip_unavailable(backend: str) -> None:
    try:
        backends.load(backend)
    except ImportError as exc:
        pytest.skip(str(exc))


@dataclass
class Problem:
    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    bias: Optional[torch.Tensor]
    temperature: float
    chunk_size: Optional[int]


def draw_problem(backend: str, dtype: torch.dtype, case: int, scale: float = 1.0) -> Problem:
    """A fresh random problem: shape from the case list, the other options drawn from the seed."""
    device = backend_device(backend)
    cases = TRITON_CASES if backend == "triton" and device.type == "cpu" else CASES
    n, h, v = cases[case % len(cases)]
    gen = torch.Generator().manual_seed(1000 * case + DTYPES.index(dtype) * 10 + BACKENDS.index(backend))
    lead = (n,) if case % 2 else (1, n)  # also a [B, T, H] layout
    hidden = torch.randn(*lead, h, generator=gen) * scale
    weight = torch.randn(v, h, generator=gen) * (scale / max(h, 1) ** 0.5 * 2)
    targets = torch.randint(0, v, lead, generator=gen)
    ignored = torch.rand(lead, generator=gen) < 0.25
    if n > 1:
        targets[ignored] = -100
    bias = torch.randn(v, generator=gen).to(dtype) if case % 3 == 1 else None
    temperature = [1.0, 0.7, 1.3][case % 3]
    chunk_size = CHUNK_SIZES[case]
    return Problem(
        hidden.to(device, dtype).requires_grad_(),
        weight.to(device, dtype).requires_grad_(),
        targets.to(device),
        None if bias is None else bias.to(device).requires_grad_(),
        temperature,
        chunk_size,
    )


def _inputs(p: Problem) -> list[torch.Tensor]:
    return [p.hidden, p.weight] + ([p.bias] if p.bias is not None else [])


def _reference_inputs(p: Problem) -> list[torch.Tensor]:
    return [x.detach().double().requires_grad_() for x in _inputs(p)]


def _reference(p: Problem, ref_in: list[torch.Tensor]):
    bias = ref_in[2] if p.bias is not None else None
    return reference_logprobs(ref_in[0], ref_in[1], p.targets, bias, p.temperature)


@pytest.mark.parametrize("case", range(5))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mode_a_values_and_gradients(backend, dtype, case):
    _skip_unavailable(backend)
    p = draw_problem(backend, dtype, case)
    ref_in = _reference_inputs(p)
    ref_logp, ref_ent = _reference(p, ref_in)
    gen = torch.Generator().manual_seed(case)
    g_logp = torch.randn(p.targets.shape, generator=gen).to(p.targets.device)
    g_ent = torch.randn(p.targets.shape, generator=gen).to(p.targets.device)
    want = torch.autograd.grad((ref_logp * g_logp + ref_ent * g_ent).sum(), ref_in)
    ignored = p.targets == -100
    for order in ORDERS:
        logp, entropy = fused_token_logprobs(
            p.hidden, p.weight, p.targets, bias=p.bias, temperature=p.temperature,
            return_entropy=True, backend=backend, chunk_size=p.chunk_size, grad_order=order,
        )
        assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
        assert logp.shape == p.targets.shape
        assert rel_err(logp, ref_logp) <= TOL[dtype]
        assert rel_err(entropy, ref_ent) <= TOL[dtype]
        assert (logp <= 0).all() and (entropy >= 0).all()
        assert (logp[ignored] == 0).all() and (entropy[ignored] == 0).all()
        got = torch.autograd.grad((logp * g_logp + entropy * g_ent).sum(), _inputs(p))
        for name, a, b in zip(("hidden", "weight", "bias"), got, want):
            assert a.dtype == dtype, (order, name)
            assert rel_err(a, b) <= TOL[dtype], (order, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mode_a_logp_only_gradient(backend):
    """Without the entropy output, the backward uses the logp term alone."""
    _skip_unavailable(backend)
    p = draw_problem(backend, torch.float32, 2)
    ref_in = _reference_inputs(p)
    ref_logp, _ = _reference(p, ref_in)
    want = torch.autograd.grad(ref_logp.sum(), ref_in)
    for order in ORDERS:
        logp, entropy = fused_token_logprobs(p.hidden, p.weight, p.targets, backend=backend, grad_order=order,
                                             temperature=p.temperature, bias=p.bias, chunk_size=7)
        assert entropy is None
        got = torch.autograd.grad(logp.sum(), _inputs(p))
        for a, b in zip(got, want):
            assert rel_err(a, b) <= TOL[torch.float32], order


def clipped_ratio_loss(old_logp: torch.Tensor, advantages: torch.Tensor, entropy_coef: float):
    """A PPO-style per-token loss: a non-linear function of logp plus an entropy bonus."""

    def token_loss(logp, entropy, rows):
        ratio = torch.exp(logp - old_logp[rows].to(logp.dtype))
        adv = advantages[rows].to(logp.dtype)
        loss = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
        if entropy is not None:
            loss = loss - entropy_coef * entropy
        return loss

    return token_loss


@pytest.mark.parametrize("case", range(5))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mode_b_values_and_gradients(backend, dtype, case):
    _skip_unavailable(backend)
    p = draw_problem(backend, dtype, case)
    with_entropy = case != 3  # one case without the entropy term
    ref_in = _reference_inputs(p)
    ref_logp, ref_ent = _reference(p, ref_in)
    gen = torch.Generator().manual_seed(case + 7)
    flat_ref = ref_logp.detach().reshape(-1)
    # old log-probs near the current ones, so some ratios fall inside the clip range and some outside
    old = flat_ref + 0.3 * torch.randn(flat_ref.shape, generator=gen, dtype=torch.float64).to(flat_ref.device)
    adv = torch.randn(flat_ref.shape, generator=gen, dtype=torch.float64).to(flat_ref.device)
    fn = clipped_ratio_loss(old, adv, 0.01)
    rows = (p.targets.reshape(-1) != -100).nonzero().squeeze(1)
    ref_loss = fn(ref_logp.reshape(-1)[rows], ref_ent.reshape(-1)[rows] if with_entropy else None, rows).sum()
    # an upstream gradient other than 1 (a loss coefficient) scales every input gradient
    want = torch.autograd.grad(ref_loss * 0.5, ref_in)

    for order in ORDERS:
        loss, logp, entropy = fused_linear_loss(
            p.hidden, p.weight, p.targets, fn, bias=p.bias, temperature=p.temperature,
            with_entropy=with_entropy, backend=backend, chunk_size=p.chunk_size, grad_order=order,
        )
        assert loss.dtype == torch.float32 and loss.dim() == 0
        loss_tol = TOL[dtype] * max(1.0, float(ref_loss.detach().abs()) + rows.numel() ** 0.5)
        assert abs(float(loss.detach()) - float(ref_loss.detach())) <= loss_tol, order
        assert rel_err(logp, ref_logp) <= TOL[dtype] and not logp.requires_grad
        assert (entropy is None) != with_entropy
        assert not with_entropy or rel_err(entropy, ref_ent) <= TOL[dtype]
        got = torch.autograd.grad(loss * 0.5, _inputs(p))
        for name, a, b in zip(("hidden", "weight", "bias"), got, want):
            assert a.dtype == dtype, (order, name)
            assert rel_err(a, b) <= TOL[dtype], (order, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mode_b_equals_mode_a_composed(backend):
    """Mode B's gradients equal autograd through mode A's outputs with the same per-token loss."""
    _skip_unavailable(backend)
    p = draw_problem(backend, torch.float32, 2)
    gen = torch.Generator().manual_seed(3)
    n = p.targets.numel()
    old, adv = (torch.randn(2, n, generator=gen) + torch.tensor([[-3.0], [0.0]])).to(p.targets.device)
    fn = clipped_ratio_loss(old, adv, 0.05)
    rows = (p.targets.reshape(-1) != -100).nonzero().squeeze(1)
    for order in ORDERS:
        loss_b, _, _ = fused_linear_loss(p.hidden, p.weight, p.targets, fn, bias=p.bias, with_entropy=True,
                                         temperature=p.temperature, backend=backend, chunk_size=5,
                                         grad_order=order)
        grads_b = torch.autograd.grad(loss_b, _inputs(p))
        logp, ent = fused_token_logprobs(p.hidden, p.weight, p.targets, bias=p.bias, return_entropy=True,
                                         temperature=p.temperature, backend=backend, chunk_size=5,
                                         grad_order=order)
        loss_a = fn(logp.reshape(-1)[rows], ent.reshape(-1)[rows], rows).sum()
        grads_a = torch.autograd.grad(loss_a, _inputs(p))
        assert torch.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-5), order
        for a, b in zip(grads_a, grads_b):
            assert rel_err(b, a) <= 1e-5, order


@pytest.mark.parametrize("case", [1, 2, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_values_and_gradients(backend, dtype, case):
    """Soft-capped logits (Gemma 2's c * tanh(logits / c)), in both modes and both orders, against
    the float64 reference: a cap of 2.5 against logits of standard deviation about 4, so most
    logits sit on the tanh's curve and some near its saturation, with temperature, bias and
    ignored rows as the case draws them."""
    _skip_unavailable(backend)
    p = draw_problem(backend, dtype, case, scale=1.4)
    cap = 2.5
    ref_in = _reference_inputs(p)
    bias = ref_in[2] if p.bias is not None else None
    # the GEMM's output rounded to the inputs' dtype before the cap, as the op caps it
    ref_logp, ref_ent = reference_logprobs(ref_in[0], ref_in[1], p.targets, bias, p.temperature,
                                           logits_dtype=None if dtype == torch.float32 else dtype, softcap=cap)
    gen = torch.Generator().manual_seed(case + 40)
    g_logp = torch.randn(p.targets.shape, generator=gen).to(p.targets.device)
    g_ent = torch.randn(p.targets.shape, generator=gen).to(p.targets.device)
    want = torch.autograd.grad((ref_logp * g_logp + ref_ent * g_ent).sum(), ref_in)
    g_flat, e_flat = g_logp.reshape(-1).double(), g_ent.reshape(-1).double()
    # mode B with the same linear loss: its gradients are mode A's with these upstream gradients
    fn = lambda lp, ent, r: lp * g_flat[r].to(lp.dtype) + ent * e_flat[r].to(lp.dtype)
    uncapped, _ = reference_logprobs(*ref_in[:2], p.targets, bias, p.temperature)
    assert rel_err(ref_logp, uncapped) > 0.1  # the cap changes the answer
    for order in ORDERS:
        logp, entropy = fused_token_logprobs(
            p.hidden, p.weight, p.targets, bias=p.bias, temperature=p.temperature, return_entropy=True,
            backend=backend, chunk_size=p.chunk_size, grad_order=order, softcap=cap,
        )
        assert rel_err(logp, ref_logp) <= TOL[dtype] and rel_err(entropy, ref_ent) <= TOL[dtype], order
        assert (logp <= 0).all() and (entropy >= 0).all()
        got = torch.autograd.grad((logp * g_logp + entropy * g_ent).sum(), _inputs(p))
        loss, logp_b, _ = fused_linear_loss(
            p.hidden, p.weight, p.targets, fn, bias=p.bias, temperature=p.temperature, with_entropy=True,
            backend=backend, chunk_size=p.chunk_size, grad_order=order, softcap=cap,
        )
        assert torch.equal(logp_b, logp.detach()) or rel_err(logp_b, logp) <= 1e-6, order
        got_b = torch.autograd.grad(loss, _inputs(p))
        for name, a, b, w in zip(("hidden", "weight", "bias"), got, got_b, want):
            assert rel_err(a, w) <= TOL[dtype] and rel_err(b, w) <= TOL[dtype], (order, name)


# the Triton kernels' tanh lets exp overflow to inf on purpose (2 / inf = 0: tanh = 1 exactly);
# under the interpreter numpy reports that overflow
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("case", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_top1_marks_targets_with_the_largest_logit(backend, dtype, case, softcap):
    """return_top1: True exactly where the target's logit is its row's largest (float64 logits,
    checked where the top two are clearly apart; half the targets are made the argmax), with and
    without a soft cap, False
    at ignored positions, in both orders; logp and entropy as without it."""
    _skip_unavailable(backend)
    p = draw_problem(backend, dtype, case)
    z = p.hidden.detach().double().reshape(-1, p.hidden.shape[-1]) @ p.weight.detach().double().t()
    if p.bias is not None:
        z = z + p.bias.detach().double()
    # the soft cap keeps the order (these logits are far from its saturation): z stays uncapped
    flat = p.targets.reshape(-1)
    scored = (flat != -100).nonzero().squeeze(1)
    flat[scored[::2]] = z[scored[::2]].argmax(-1).to(flat.device)
    best = z.topk(min(2, z.shape[1]), dim=-1).values
    target_z = z.gather(1, flat.clamp(min=0).cpu()[:, None]).squeeze(1)
    # the rounding of a bf16 / fp16 GEMM's output moves logits by about 1%: compare where it cannot flip
    margin = 1e-4 if dtype == torch.float32 else 0.05 * float(z.abs().max())
    gap = torch.where(target_z >= best[:, 0], best[:, 0] - best[:, -1], best[:, 0] - target_z)
    clear = (flat.cpu() != -100) & ((gap > margin) | (z.shape[1] == 1))
    want = (target_z >= best[:, 0]) & (flat.cpu() != -100)
    kw = dict(bias=p.bias, temperature=p.temperature, return_entropy=True, backend=backend,
              chunk_size=p.chunk_size, softcap=softcap)
    for order in ORDERS:
        logp, entropy, top1 = fused_token_logprobs(p.hidden, p.weight, p.targets, grad_order=order,
                                                   return_top1=True, **kw)
        assert top1.dtype == torch.bool and top1.shape == p.targets.shape and not top1.requires_grad
        assert not top1[p.targets == -100].any()
        got = top1.reshape(-1).cpu()
        assert torch.equal(got[clear], want[clear]), order
        # both outcomes among the rows checked (but in the smallest cases, whose few random targets may all lead)
        assert want[clear].any() and (int(clear.sum()) < 8 or not want[clear].all()), (order, int(clear.sum()))
        plain = fused_token_logprobs(p.hidden, p.weight, p.targets, grad_order=order, **kw)
        assert torch.equal(logp, plain[0]) and torch.equal(entropy, plain[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_top1_counts_a_target_tied_for_the_largest(backend):
    """Two ids with one output embedding tie everywhere: both count as top-1 where they lead (where
    ``argmax == target`` would pick the first only), in both orders; a third id never does."""
    _skip_unavailable(backend)
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(13, 8, generator=gen)
    weight[5] = weight[2] = 3 * weight[2]
    hidden = weight[2].repeat(6, 1) + 0.01 * torch.randn(6, 8, generator=gen)
    targets = torch.tensor([2, 5, 2, 5, 0, -100])
    for order in ORDERS:
        _, _, top1 = fused_token_logprobs(hidden.to(device), weight.to(device), targets.to(device), backend=backend,
                                          grad_order=order, chunk_size=2, return_top1=True)
        assert top1.tolist() == [True, True, True, True, False, False], order


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("case", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_logit_mean_and_log_sum_sq_probs_against_float64(backend, dtype, case, softcap):
    """return_logit_mean / return_log_sum_sq_probs: each position's mean of the logits the softmax
    sees (capped, over T) and log sum_v p_v^2, against float64 on the logits as the GEMM rounds
    them, in both orders (vocabulary slabs merged), with and without a soft cap; 0 at ignored
    positions, no gradient, either alone in its place, logp and entropy as without them."""
    _skip_unavailable(backend)
    p = draw_problem(backend, dtype, case)
    x = p.hidden.detach().double().reshape(-1, p.hidden.shape[-1]) @ p.weight.detach().double().t()
    if p.bias is not None:
        x = x + p.bias.detach().double()
    x = x.to(dtype).double()  # a bf16 / fp16 GEMM's logits block is in its dtype
    z = (softcap * torch.tanh(x / softcap) if softcap else x) / p.temperature
    scored = p.targets.reshape(-1).cpu() != -100
    want = [torch.where(scored, z.mean(-1), 0.0), torch.where(scored, torch.logsumexp(2 * z.log_softmax(-1), -1), 0.0)]
    kw = dict(bias=p.bias, temperature=p.temperature, return_entropy=True, backend=backend,
              chunk_size=p.chunk_size, softcap=softcap)
    # float32 sums of float32 terms; in bf16 / fp16 a logit the op's GEMM rounds to the
    # neighbouring value (its sum order differs from float64's) moves the sums by ~1e-4
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    for order in ORDERS:
        logp, entropy, mean, log_sum_sq = fused_token_logprobs(
            p.hidden, p.weight, p.targets, grad_order=order, return_logit_mean=True, return_log_sum_sq_probs=True, **kw)
        for name, got, ref in zip(("mean", "log_sum_sq"), (mean, log_sum_sq), want):
            assert got.shape == p.targets.shape and got.dtype == logp.dtype and not got.requires_grad, name
            assert torch.isfinite(got).all() and not got[p.targets == -100].any(), name
            assert rel_err(got.reshape(-1).cpu(), ref) <= tol, (order, name, rel_err(got.reshape(-1).cpu(), ref))
        # log sum p^2 <= 0: a sum of squares of probabilities is at most 1
        assert (log_sum_sq <= 1e-6).all(), order
        plain = fused_token_logprobs(p.hidden, p.weight, p.targets, grad_order=order, **kw)
        assert torch.equal(logp, plain[0]) and torch.equal(entropy, plain[1])
        alone = fused_token_logprobs(p.hidden, p.weight, p.targets, grad_order=order, return_log_sum_sq_probs=True,
                                     **kw)
        assert len(alone) == 3 and torch.equal(alone[2], log_sum_sq), order


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_saturated_logits(backend):
    """Logits of magnitude 1e4 under a cap of 30: every capped logit is within rounding of +-30
    (tanh saturates), so the values are those of +-30 logits and the gradients, scaled by
    1 - tanh^2 = 0 there, are exactly 0 where saturated; finite everywhere, never NaN."""
    _skip_unavailable(backend)
    p = draw_problem(backend, torch.float32, 2)
    with torch.no_grad():
        p.hidden.mul_(1e3)
    ref_in = _reference_inputs(p)
    ref_logp, ref_ent = reference_logprobs(ref_in[0], ref_in[1], p.targets, softcap=30.0)
    for order in ORDERS:
        logp, entropy = fused_token_logprobs(p.hidden, p.weight, p.targets, return_entropy=True, backend=backend,
                                             chunk_size=p.chunk_size, grad_order=order, softcap=30.0)
        assert rel_err(logp, ref_logp) <= 1e-4 and rel_err(entropy, ref_ent) <= 1e-4, order
        grads = torch.autograd.grad((logp + entropy).sum(), [p.hidden, p.weight])
        assert all(torch.isfinite(g).all() for g in grads), order
        loss, _, _ = fused_linear_loss(p.hidden, p.weight, p.targets, lambda lp, e, r: -lp - e, with_entropy=True,
                                       backend=backend, chunk_size=p.chunk_size, grad_order=order, softcap=30.0)
        grads = torch.autograd.grad(loss, [p.hidden, p.weight])
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads), order


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_stay_finite(backend, dtype):
    """Logits of magnitude 1e4 give finite log-probs and gradients, never NaN; exact ones in float32.

    (In bf16 / fp16 the logits' own rounding error is of order 1 or more at that magnitude, so only
    finiteness and the value of logp relative to its scale can be checked there.)
    """
    _skip_unavailable(backend)
    p = draw_problem(backend, dtype, 2)
    max_logit = 1e4
    with torch.no_grad():
        logits = p.hidden.double().reshape(-1, p.hidden.shape[-1]) @ p.weight.double().t()
        factor = max_logit / float(logits.abs().max())
        p.hidden.mul_(factor ** 0.5)
        p.weight.mul_(factor ** 0.5)
    ref_in = _reference_inputs(p)
    ref_logp, ref_ent = reference_logprobs(ref_in[0], ref_in[1], p.targets)
    want = torch.autograd.grad((ref_logp + ref_ent).sum(), ref_in[:2])
    fn = clipped_ratio_loss(ref_logp.detach().reshape(-1), torch.ones_like(ref_logp).reshape(-1), 0.01)
    for order in ORDERS:
        logp, entropy = fused_token_logprobs(p.hidden, p.weight, p.targets, return_entropy=True,
                                             backend=backend, chunk_size=p.chunk_size, grad_order=order)
        assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
        assert (logp <= 0).all() and (entropy >= 0).all()
        assert rel_err(logp, ref_logp) <= TOL[dtype]
        got = torch.autograd.grad((logp + entropy).sum(), [p.hidden, p.weight])
        # Both orders recompute each block with the statistics pass's GEMM shape, so bit for bit
        # the same logits: p = exp(z - lse) stays exact at this magnitude. (A block of another
        # shape may round its float32 logits differently by a few ulps of |logit|, and p would
        # inherit that as a relative error of about 1e-3 here.)
        for a, b in zip(got, want):
            assert torch.isfinite(a).all(), order
            if dtype == torch.float32:
                assert rel_err(a, b) <= TOL[dtype], order

        loss, _, _ = fused_linear_loss(p.hidden, p.weight, p.targets, fn, with_entropy=True,
                                       backend=backend, chunk_size=p.chunk_size, grad_order=order)
        grads = torch.autograd.grad(loss, [p.hidden, p.weight])
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads), order


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_slabs_of_width_one(backend, dtype):
    """chunk_size 1 with fewer vocabulary ids than tokens: every slab is one column wide."""
    _skip_unavailable(backend)
    gen = torch.Generator().manual_seed(11)
    device = backend_device(backend)
    n, h, v = 16, 8, 13
    hidden = torch.randn(n, h, generator=gen).to(device, dtype).requires_grad_()
    weight = torch.randn(v, h, generator=gen).mul(0.5).to(device, dtype).requires_grad_()
    bias = torch.randn(v, generator=gen).to(device, dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[[2, 9]] = -100
    targets = targets.to(device)
    assert op_plan.make_plan("A", backend, hidden, v, n - 2, 1, 0.9, "vocab", torch.float32).slab == 1
    ref_in = [x.detach().double().requires_grad_() for x in (hidden, weight, bias)]
    ref_logp, ref_ent = reference_logprobs(ref_in[0], ref_in[1], targets, ref_in[2], 0.9)
    g_ent = torch.randn(n, generator=gen).to(device)
    want_a = torch.autograd.grad((ref_logp + ref_ent * g_ent).sum(), ref_in, retain_graph=True)
    logp, ent = fused_token_logprobs(hidden, weight, targets, bias=bias, temperature=0.9, return_entropy=True,
                                     backend=backend, chunk_size=1, grad_order="vocab")
    got_a = torch.autograd.grad((logp + ent * g_ent).sum(), [hidden, weight, bias])
    fn = lambda lp, e, r: -torch.exp(lp) * (r % 3 - 1) - 0.1 * e
    rows = (targets != -100).nonzero().squeeze(1)
    want_b = torch.autograd.grad(fn(ref_logp[rows], ref_ent[rows], rows).sum(), ref_in)
    loss, _, _ = fused_linear_loss(hidden, weight, targets, fn, bias=bias, temperature=0.9, with_entropy=True,
                                   backend=backend, chunk_size=1, grad_order="vocab")
    got_b = torch.autograd.grad(loss, [hidden, weight, bias])
    for got, want in ((got_a, want_a), (got_b, want_b)):
        for name, a, b in zip(("hidden", "weight", "bias"), got, want):
            assert rel_err(a, b) <= TOL[dtype], name


def _plan_order(mode: str, dtype: torch.dtype, n: int, v: int, h: int, chunk_size=None,
                accum_dtype=torch.float32) -> str:
    hidden = torch.empty(n, h, dtype=dtype)
    return op_plan.make_plan(mode, "torch", hidden, v, n, chunk_size, 1.0, "auto", accum_dtype).order


def test_plan_picks_vocab_order_exactly_when_it_should(monkeypatch):
    """Mode A: vocabulary order whenever there are fewer tokens than V. Mode B: vocabulary order
    only when token order would sum grad_weight in a float32 [V, H] buffer (low precision, more
    than one chunk) larger than the memory budget up to 128 MiB, or a quarter of a larger budget,
    and there are fewer tokens than V."""
    monkeypatch.setenv("HPT_FAST_MEMORY_BUDGET_MB", "1")  # V * H * 4 > budget from V * H > 2**18
    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    for dtype in (bf16, f32):
        assert _plan_order("A", dtype, 64, 1000, 512) == "vocab"
        assert _plan_order("A", dtype, 1000, 1000, 512) == "tokens"
        assert _plan_order("A", dtype, 4000, 1000, 512) == "tokens"
    assert _plan_order("B", bf16, 64, 1000, 512, chunk_size=8) == "vocab"
    assert _plan_order("B", f16, 64, 1000, 512, chunk_size=8) == "vocab"
    assert _plan_order("B", f32, 64, 1000, 512, chunk_size=8) == "tokens"  # no float32 buffer
    assert _plan_order("B", bf16, 64, 1000, 512, chunk_size=64) == "tokens"  # one chunk: no buffer
    assert _plan_order("B", bf16, 64, 1000, 200, chunk_size=8) == "tokens"  # buffer under the budget
    assert _plan_order("B", bf16, 2000, 1000, 512, chunk_size=8) == "tokens"  # [N, H] no smaller
    # the chunk from the budget: 1 MiB / (1000 * 2 bytes + the torch backend's extra) = 58 rows
    assert _plan_order("B", bf16, 64, 1000, 512) == "vocab"
    # summed in the gradient itself: no buffer, so token order
    assert _plan_order("B", bf16, 64, 1000, 512, chunk_size=8, accum_dtype=None) == "tokens"
    assert _plan_order("B", f16, 64, 1000, 512, chunk_size=8, accum_dtype=f16) == "tokens"
    monkeypatch.setenv("HPT_FAST_MEMORY_BUDGET_MB", "2")
    assert _plan_order("B", bf16, 64, 1000, 512, chunk_size=8) == "tokens"
    # up to 128 MiB the buffer may take the budget (150 MiB > 128 here), above it a quarter:
    # token order then holds at most 1.25 budgets. V * H * 4 = 150 MiB here.
    for mib, order in (("128", "vocab"), ("256", "vocab"), ("599", "vocab"), ("600", "tokens")):
        monkeypatch.setenv("HPT_FAST_MEMORY_BUDGET_MB", mib)
        assert _plan_order("B", bf16, 4096, 153600, 256, chunk_size=8) == order, mib
    monkeypatch.delenv("HPT_FAST_MEMORY_BUDGET_MB")
    # the default budget: 1/12 of the naive logits, 128 MiB at least. At 2048 x 32768 that is the
    # floor, and the 128 MiB buffer of H 1024 fits it (the CPU table's bf16 shape: token order);
    # at 8192 x 151936 x 3584 (Qwen2.5-7B) the 2.2 GB buffer is far over a quarter of 396 MiB
    assert _plan_order("B", bf16, 2048, 32768, 1024) == "tokens"
    assert _plan_order("B", bf16, 8192, 151936, 3584) == "vocab"
    assert _plan_order("B", bf16, 8192, 151936, 3584, accum_dtype=None) == "tokens"
    # just over the floor (171 MiB) a quarter holds: the 120 MiB buffer of H 240 would take token
    # order to 1.7 budgets, over 1/8 of the naive logits
    assert _plan_order("B", bf16, 4096, 131072, 240) == "vocab"
    assert _plan_order("B", bf16, 4096, 131072, 80) == "tokens"  # 40 MiB


@pytest.mark.parametrize("backend", BACKENDS)
def test_wider_sums_take_products_in_pieces(backend, monkeypatch):
    """A product bound for a wider sum (bf16 GEMMs into a float32 buffer or a float32 gradient
    under autocast) leaves the CPU GEMM a few rows at a time, the last piece shorter: the
    gradients stay those of whole products, within rounding, and of the float64 reference."""
    _skip_unavailable(backend)
    p = draw_problem(backend, torch.bfloat16, 3)
    p.chunk_size = 5
    ref_in = _reference_inputs(p)
    ref_logp, ref_ent = _reference(p, ref_in)
    want = torch.autograd.grad((ref_logp + 0.5 * ref_ent).sum(), ref_in)
    fp32 = [x.detach().float().requires_grad_() for x in _inputs(p)]
    results = []
    for piece_bytes in (op_passes.PIECE_BYTES, 3 * p.hidden.shape[-1] * 2):  # whole products, then 3 rows
        monkeypatch.setattr(op_passes, "PIECE_BYTES", piece_bytes)
        for order in ORDERS:
            kw = dict(bias=p.bias, temperature=p.temperature, backend=backend, chunk_size=p.chunk_size,
                      grad_order=order, return_entropy=True)
            logp, ent = fused_token_logprobs(p.hidden, p.weight, p.targets, **kw)
            results.append(torch.autograd.grad((logp + 0.5 * ent).sum(), _inputs(p)))
            with torch.autocast(p.hidden.device.type, dtype=torch.bfloat16):
                bias = fp32[2] if p.bias is not None else None
                logp, ent = fused_token_logprobs(fp32[0], fp32[1], p.targets, **{**kw, "bias": bias})
            results.append(torch.autograd.grad((logp + 0.5 * ent).sum(), fp32))
    half = len(results) // 2
    for whole, pieces in zip(results[:half], results[half:]):
        for name, a, b, r in zip(("hidden", "weight", "bias"), pieces, whole, want):
            assert rel_err(a, b) <= 1e-2, name
            assert rel_err(a, r) <= TOL[torch.bfloat16], name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_in_the_inputs_dtype(backend, dtype, monkeypatch):
    """accum_dtype=None sums grad_weight over token chunks in grad_weight itself (no float32
    buffer), in both modes, within the low-precision tolerance of the float64 reference; with
    torch.float32 the same call allocates the buffer. Vocabulary order sums grad_hidden in float32
    whatever accum_dtype says."""
    _skip_unavailable(backend)
    made = []
    real_init = op_passes.MatmulSum.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(self.acc is not self.out)

    monkeypatch.setattr(op_passes.MatmulSum, "__init__", spy)
    p = draw_problem(backend, dtype, 2)
    p.chunk_size = 5  # several token chunks and vocabulary slabs on every backend's case
    ref_in = _reference_inputs(p)
    ref_logp, ref_ent = _reference(p, ref_in)
    rows = (p.targets.reshape(-1) != -100).nonzero().squeeze(1)
    adv = torch.randn(p.targets.numel(), generator=torch.Generator().manual_seed(5)).to(p.targets.device)
    # smooth in logp: a clipped ratio could flip its clip on a bf16 rounding of logp
    fn = lambda lp, e, r: -torch.exp(lp) * adv[r].to(lp.dtype) - 0.1 * e
    want_b = torch.autograd.grad(fn(ref_logp.reshape(-1)[rows], ref_ent.reshape(-1)[rows], rows).sum(), ref_in,
                                 retain_graph=True)
    want_a = torch.autograd.grad((ref_logp + 0.5 * ref_ent).sum(), ref_in)
    for order in ORDERS:
        for accum, buffered in ((None, False), (dtype, False), (torch.float32, True)):
            buffered = buffered or order == "vocab"
            made.clear()
            kw = dict(bias=p.bias, temperature=p.temperature, backend=backend, chunk_size=p.chunk_size,
                      grad_order=order, accum_dtype=accum)
            logp, ent = fused_token_logprobs(p.hidden, p.weight, p.targets, return_entropy=True, **kw)
            got_a = torch.autograd.grad((logp + 0.5 * ent).sum(), _inputs(p))
            loss, _, _ = fused_linear_loss(p.hidden, p.weight, p.targets, fn, with_entropy=True, **kw)
            got_b = torch.autograd.grad(loss, _inputs(p))
            assert made == [buffered, buffered], (order, accum)
            for got, want in ((got_a, want_a), (got_b, want_b)):
                for name, a, b in zip(("hidden", "weight", "bias"), got, want):
                    assert a.dtype == dtype and torch.isfinite(a).all(), (order, accum, name)
                    assert rel_err(a, b) <= TOL[dtype], (order, accum, name)


@pytest.mark.parametrize("requested", ["auto", "tokens", "vocab"])
def test_gradient_pass_runs_in_the_planned_order(monkeypatch, requested):
    """The logits blocks the backend sees are whole rows in token order, all tokens in vocabulary order."""
    from hpt_fast.backends import torch_backend

    blocks = []
    real = torch_backend.grad_logits

    def spy(logits, *args, col_offset=0, **kwargs):
        blocks.append((tuple(logits.shape), col_offset))
        return real(logits, *args, col_offset=col_offset, **kwargs)

    gemms = []
    real_gemm = op_passes.logits_block

    def count_gemms(h, w, b, out, backend):
        gemms.append(tuple(out.shape))
        return real_gemm(h, w, b, out, backend)

    monkeypatch.setattr(torch_backend, "grad_logits", spy)
    monkeypatch.setattr(op_passes, "logits_block", count_gemms)
    monkeypatch.setenv("HPT_FAST_MEMORY_BUDGET_MB", "0.01")  # the [V, H] float32 buffer is 20 KiB
    n, h, v = 12, 8, 640
    hidden = torch.randn(n, h, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    loss, _, _ = fused_linear_loss(hidden, weight, targets, lambda lp, e, r: -lp, backend="torch",
                                   chunk_size=5, grad_order=requested)
    loss.backward()
    if requested == "tokens":
        assert blocks == [((5, v), 0), ((5, v), 0), ((2, v), 0)]
        assert gemms == [(5, v), (5, v), (2, v)]  # one pass: three GEMMs in all
    else:
        # chunk 5 of 12 tokens: slabs of at most 5 * 640 // 12 = 266 columns, so three; an even
        # split, 214, rounds up to 256. The statistics pass runs them last to first, ending on
        # slab 0 (full width), which the gradient pass, first to last, takes without a GEMM.
        assert blocks == [((n, 256), 0), ((n, 256), 256), ((n, 128), 512)]
        assert gemms == [(n, 128), (n, 256), (n, 256), (n, 256), (n, 128)]


@pytest.mark.parametrize("vocab,widest", [(151936, 8179), (151936, 30336), (1000, 126), (1000, 130),
                                          (640, 266), (131, 65), (100, 60), (7, 3), (50, 64), (50, 50)])
def test_slabs_are_even_aligned_and_within_the_widest(vocab, widest):
    """Slabs: no wider than allowed, as few as full aligned ones would take, all but the last of one
    width and a multiple of 64 columns where ``widest`` is, the last not much narrower."""
    slab = op_plan.slab_width(vocab, widest)
    n_slabs = -(-vocab // slab)
    last = vocab - (n_slabs - 1) * slab
    assert 0 < slab <= widest or slab == vocab <= widest
    if slab < vocab:
        aligned = widest - widest % 64 if widest >= 64 else widest
        assert n_slabs == -(-vocab // aligned)
        assert slab % 64 == 0 or widest < 64
        # rounding each slab up to 64 columns takes at most 63 from the last per slab
        assert last > slab - 64 * n_slabs, (slab, last)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("align", [64, 1])
def test_logits_block_rows_are_aligned(order, align):
    """Every logits block's rows start a multiple of 64 elements apart as on CUDA (cuBLAS's
    tensor-core GEMMs need 16-byte aligned rows), or are contiguous as on CPU (torch 2.6's CPU
    GEMM copied a strided output through float32), whatever V, the slab and the last block's
    width, and the blocks hold the logits."""
    gen = torch.Generator().manual_seed(4)
    n, h, v = 50, 16, 1001
    hidden, weight = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen)
    plan = op_plan.make_plan("B", "torch", hidden, v, n, 7, 1.0, order, torch.float32)
    assert plan.slab == 128  # at most 7 * 1001 // 50 = 140: 128 (a multiple of 64), 8 slabs
    assert plan.row_align == 1  # CPU tensors
    plan = dataclasses.replace(plan, row_align=align)
    buffer = op_passes.block_buffer(plan, hidden, v)
    seen = 0
    for logits, r, c in op_passes.blocks(plan, hidden, weight, None, buffer):
        assert logits.stride(1) == 1
        assert logits.stride(0) % 64 == 0 if align == 64 else logits.is_contiguous()
        assert torch.allclose(logits, hidden[r] @ weight[c].t(), atol=1e-5)
        seen += logits.numel()
    assert seen == n * v


@pytest.mark.parametrize("order", ORDERS)
def test_mode_a_backward_cuts_the_logits_as_its_forward(order, monkeypatch):
    """Mode A's backward recomputes the forward's logits blocks (the forward op hands it its
    cut): both passes see blocks of chunk_size rows in token order and the same vocabulary slabs
    (of at most chunk * V // N columns, aligned) in vocabulary order, ignored rows left out."""
    from hpt_fast.backends import torch_backend

    seen = {"row_stats": [], "grad_logits": []}

    def spy(name):
        real = getattr(torch_backend, name)

        def call(logits, *args, col_offset=0, **kwargs):
            seen[name].append((tuple(logits.shape), col_offset))
            return real(logits, *args, col_offset=col_offset, **kwargs)

        monkeypatch.setattr(torch_backend, name, call)

    spy("row_stats")
    spy("grad_logits")
    gen = torch.Generator().manual_seed(21)
    n, h, v = 14, 8, 640
    hidden = torch.randn(n, h, generator=gen, requires_grad=True)
    weight = (torch.randn(v, h, generator=gen) * 0.3).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[[3, 9]] = -100  # 12 scored rows
    logp, ent = fused_token_logprobs(hidden, weight, targets, return_entropy=True, backend="torch",
                                     chunk_size=5, grad_order=order)
    got = torch.autograd.grad((logp - 0.3 * ent).sum(), [hidden, weight])
    if order == "tokens":
        want = [((5, v), 0), ((5, v), 0), ((2, v), 0)]
    else:  # slabs of at most 5 * 640 // 12 = 266 columns: an even split, 214, rounds up to 256
        want = [((12, 256), 0), ((12, 256), 256), ((12, 128), 512)]
    assert sorted(seen["row_stats"]) == sorted(want) and sorted(seen["grad_logits"]) == sorted(want)
    ref_in = [x.detach().double().requires_grad_() for x in (hidden, weight)]
    ref_logp, ref_ent = reference_logprobs(*ref_in, targets)
    for g, w in zip(got, torch.autograd.grad((ref_logp - 0.3 * ref_ent).sum(), ref_in)):
        assert rel_err(g, w) < 1e-5


@pytest.mark.parametrize("softcap", [None, 1.5])
def test_gradcheck_float64_both_modes(softcap):
    gen = torch.Generator().manual_seed(0)
    n, h, v = 6, 4, 9
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[2] = -100

    old = torch.randn(n, generator=gen, dtype=torch.float64) - 2
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    # a smooth non-linear loss, so finite differences are valid everywhere
    fn = lambda lp, ent, rows: -adv[rows] * torch.exp(lp - old[rows]) - 0.1 * ent * torch.sigmoid(lp)

    for order in ORDERS:
        def mode_a(hd, wt, b):
            return fused_token_logprobs(hd, wt, targets, bias=b, temperature=0.8, return_entropy=True,
                                        chunk_size=4, grad_order=order, softcap=softcap)

        def mode_b(hd, wt, b):
            return fused_linear_loss(hd, wt, targets, fn, bias=b, temperature=0.8, with_entropy=True,
                                     chunk_size=4, grad_order=order, softcap=softcap)[0]

        assert torch.autograd.gradcheck(mode_a, (hidden, weight, bias)), order
        assert torch.autograd.gradcheck(mode_b, (hidden, weight, bias)), order


@pytest.mark.parametrize("tokens", [(2, 3), (0,)], ids=["all-ignored", "empty"])
@pytest.mark.parametrize("vocab", [11, 40001])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_positions_ignored(backend, vocab, tokens):
    """No scored token: zeros, no error. At V >= 32768 the C++ row passes split columns over the
    threads when rows are few, and 0 rows divided by zero there (SIGFPE, the process killed)."""
    _skip_unavailable(backend)
    device = backend_device(backend)
    hidden = torch.randn(*tokens, 8, device=device, requires_grad=True)
    weight = torch.randn(vocab, 8, device=device, requires_grad=True)
    targets = torch.full(tokens, -100, device=device)
    for order in ORDERS:
        logp, entropy = fused_token_logprobs(hidden, weight, targets, return_entropy=True, backend=backend,
                                             grad_order=order)
        assert (logp == 0).all() and (entropy == 0).all()
        g_h, g_w = torch.autograd.grad(logp.sum() + entropy.sum(), [hidden, weight])
        assert (g_h == 0).all() and (g_w == 0).all()
        loss, _, _ = fused_linear_loss(hidden, weight, targets, lambda lp, e, r: -lp, backend=backend,
                                       grad_order=order)
        g_h, g_w = torch.autograd.grad(loss, [hidden, weight])
        assert float(loss.detach()) == 0 and (g_h == 0).all() and (g_w == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_id_vocabulary_is_exact_at_any_temperature(backend, dtype):
    """V = 1: p is 1, so logp, entropy and every gradient are exactly 0, also when the temperature
    scaling rounds (the statistics and the gradient pass must round x / T the same way)."""
    _skip_unavailable(backend)
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(5)
    hidden = (torch.randn(9, 16, generator=gen) * 3).to(device, dtype).requires_grad_()
    weight = torch.randn(1, 16, generator=gen).to(device, dtype).requires_grad_()
    bias = torch.randn(1, generator=gen).to(device, dtype).requires_grad_()
    targets = torch.zeros(9, dtype=torch.long, device=device)
    inputs = [hidden, weight, bias]
    for temperature in (0.3, 0.7, 2.5):
        for order in ORDERS:
            kw = dict(bias=bias, temperature=temperature, backend=backend, chunk_size=4, grad_order=order)
            logp, entropy = fused_token_logprobs(hidden, weight, targets, return_entropy=True, **kw)
            grads = torch.autograd.grad((logp + entropy).sum(), inputs)
            assert (logp == 0).all() and (entropy == 0).all(), (temperature, order)
            assert all((g == 0).all() for g in grads), (temperature, order)
            loss, _, _ = fused_linear_loss(hidden, weight, targets, lambda lp, e, r: -lp - 0.1 * e,
                                           with_entropy=True, **kw)
            grads = torch.autograd.grad(loss, inputs)
            assert float(loss.detach()) == 0 and all((g == 0).all() for g in grads), (temperature, order)


def test_mode_b_rows_index_the_flat_targets():
    """token_loss_fn sees each non-ignored position once, by its index into targets.reshape(-1)."""
    targets = torch.tensor([[3, -100, 1], [-100, 0, 2]])
    seen = []

    def fn(lp, ent, rows):
        seen.append(rows.clone())
        return -lp

    fused_linear_loss(torch.randn(2, 3, 5), torch.randn(4, 5), targets, fn, backend="torch", chunk_size=2)
    assert torch.cat(seen).tolist() == [0, 2, 4, 5]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_mode_a_backward_computes_what_the_loss_needs(backend, monkeypatch):
    """Mode A's gradient pass makes the gradients of the inputs that need one (a frozen weight or
    bias gets none computed, not one computed and dropped) and takes an entropy term only from a
    loss that uses the entropy (an unused output's gradient is None, not zeros); a loss of the
    entropy alone gets the logp term's zeros. Against float64 in each case."""
    _skip_unavailable(backend)
    made = []

    class Spy(op_passes.GradientPass):
        def __init__(self, plan, hidden, weight, targets, rows, dtypes, want_h, want_w):
            made.append((want_h, want_w, dtypes[2] is not None, rows.g_ent is not None))
            super().__init__(plan, hidden, weight, targets, rows, dtypes, want_h, want_w)

    monkeypatch.setattr(op_passes, "GradientPass", Spy)
    gen = torch.Generator().manual_seed(22)
    n, h, v = 9, 6, 23
    inputs = (torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen) * 0.5, torch.randn(v, generator=gen))
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[[1, 6]] = -100
    valid = targets != -100
    # which of hidden, weight, bias need a gradient; the loss; what the pass makes: the gradients
    # of hidden, weight and bias, and the entropy term
    cases = [((True, False, False), lambda lp, e: (lp * 0.7).sum(), (True, False, False, False)),
             ((False, True, True), lambda lp, e: (e * 0.4).sum(), (False, True, True, True)),
             ((False, False, True), lambda lp, e: (lp - 0.2 * e).sum(), (False, False, True, True))]
    for need, loss_of, want_made in cases:
        leaves = [x.detach().requires_grad_(r) for x, r in zip(inputs, need)]
        logp, ent = fused_token_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], return_entropy=True,
                                         backend=backend, temperature=0.9, chunk_size=4)
        made.clear()
        got = torch.autograd.grad(loss_of(logp, ent), [x for x in leaves if x.requires_grad])
        assert made == [want_made], need
        ref_in = [x.detach().double().requires_grad_(r) for x, r in zip(inputs, need)]
        ref_logp, ref_ent = reference_logprobs(ref_in[0], ref_in[1], targets, ref_in[2], 0.9)
        want = torch.autograd.grad(loss_of(ref_logp * valid, ref_ent * valid), [x for x in ref_in if x.requires_grad])
        for g, w in zip(got, want):
            assert rel_err(g, w) < 1e-5, need


def test_mode_b_frozen_inputs_skip_gradients():
    hidden = torch.randn(9, 6)
    weight = torch.randn(13, 6, requires_grad=True)
    targets = torch.randint(0, 13, (9,))
    loss, _, _ = fused_linear_loss(hidden, weight, targets, lambda lp, e, r: -lp, backend="torch")
    (g_w,) = torch.autograd.grad(loss, [weight])
    ref_logp, _ = reference_logprobs(hidden, weight.detach().double().requires_grad_(), targets)
    assert torch.isfinite(g_w).all()
    with torch.no_grad():
        loss_ng, logp, _ = fused_linear_loss(hidden, weight, targets, lambda lp, e, r: -lp, backend="torch")
    assert not loss_ng.requires_grad and torch.allclose(loss_ng.double(), -ref_logp.sum(), atol=1e-4)


@pytest.mark.parametrize("order", ORDERS)
def test_mode_b_without_autograd_skips_the_gradient_pass(order, monkeypatch):
    """Under no_grad / inference_mode (an evaluation loss) mode B computes the loss of inputs that
    require grad without building any gradient, at a statistics pass's cost."""
    made = []
    real_init = op_passes.GradientPass.__init__

    def spy(self, *args, **kwargs):
        made.append(True)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(op_passes.GradientPass, "__init__", spy)
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(9, 6, generator=gen, requires_grad=True)
    weight = torch.randn(13, 6, generator=gen, requires_grad=True)
    targets = torch.randint(0, 13, (9,), generator=gen)
    kw = dict(backend="torch", chunk_size=4, grad_order=order)
    want, _, _ = fused_linear_loss(hidden, weight, targets, lambda lp, e, r: -lp, **kw)
    assert made == [True]
    for context in (torch.no_grad, torch.inference_mode):
        made.clear()
        with context():
            got, _, _ = fused_linear_loss(hidden, weight, targets, lambda lp, e, r: -lp, **kw)
            # a loss whose gradient is not finite: only a gradient that is computed is checked
            fused_linear_loss(hidden, weight, targets, lambda lp, e, r: torch.sqrt(lp - lp), **kw)
        assert made == [] and not got.requires_grad and torch.equal(got, want.detach())
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient"):
        fused_linear_loss(hidden, weight, targets, lambda lp, e, r: torch.sqrt(lp - lp), **kw)


@pytest.mark.parametrize("order", ORDERS)
def test_mode_b_scales_low_precision_gradients_in_float32(order):
    """backward(loss / 3) scales mode B's bf16 gradients by the float32 factor, then rounds once:
    not by that factor rounded to bf16 first (1/3 is 0.33398 in bf16)."""
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(9, 8, generator=gen).bfloat16().requires_grad_()
    weight = torch.randn(13, 8, generator=gen).bfloat16().requires_grad_()
    targets = torch.randint(0, 13, (9,), generator=gen)
    kw = dict(backend="torch", chunk_size=4, grad_order=order)
    loss, _, _ = fused_linear_loss(hidden, weight, targets, lambda lp, e, r: -lp, **kw)
    whole = torch.autograd.grad(loss, [hidden, weight])
    loss, _, _ = fused_linear_loss(hidden, weight, targets, lambda lp, e, r: -lp, **kw)
    third = torch.autograd.grad(loss / 3, [hidden, weight])
    factor = torch.ones((), dtype=torch.float32) / 3
    for g, w in zip(third, whole):
        assert g.dtype == torch.bfloat16 and torch.equal(g, (w.float() * factor).bfloat16())


def test_mode_b_backward_through_a_retained_graph_hands_out_new_tensors():
    """A later backward through a retained graph gets copies of the gradients, not the tensors an
    earlier one handed out, so editing those in place changes nothing else."""
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(5, 4, generator=gen, requires_grad=True)
    weight = torch.randn(7, 4, generator=gen, requires_grad=True)
    targets = torch.randint(0, 7, (5,), generator=gen)
    loss, _, _ = fused_linear_loss(hidden, weight, targets, lambda lp, e, r: -lp, backend="torch")
    g1 = torch.autograd.grad(loss, [weight], retain_graph=True)[0]
    g2 = torch.autograd.grad(loss, [weight], retain_graph=True)[0]
    assert g1 is not g2 and g1.data_ptr() != g2.data_ptr() and torch.equal(g1, g2)
    want = g2.clone()
    g2.mul_(0.5)
    g3 = torch.autograd.grad(loss, [weight], retain_graph=True)[0]
    assert torch.equal(g3, want)
    g1.mul_(0.5)  # the saved gradient itself: later backwards take a private copy
    assert torch.equal(torch.autograd.grad(loss, [weight], retain_graph=True)[0], want)
    # edited before any second backward: a clear error, never a wrong gradient
    loss, _, _ = fused_linear_loss(hidden, weight, targets, lambda lp, e, r: -lp, backend="torch")
    g1 = torch.autograd.grad(loss, [weight], retain_graph=True)[0]
    g1.mul_(0.5)
    with pytest.raises(RuntimeError, match="or edited by the caller"):
        torch.autograd.grad(loss, [weight])
    # a scaled first backward hands out new tensors: the saved ones stay intact for the next
    loss, _, _ = fused_linear_loss(hidden, weight, targets, lambda lp, e, r: -lp, backend="torch")
    (2 * loss).backward(retain_graph=True)
    weight.grad.mul_(0)
    assert torch.equal(torch.autograd.grad(loss, [weight])[0], want)


@pytest.mark.parametrize("ignored", [False, True], ids=["all-valid", "some-ignored"])
def test_mode_b_backward_with_retained_graph(ignored):
    """Backward through a retained graph accumulates, any number of times (plain PyTorch's
    behaviour); the handed-out gradient may be a parameter's .grad through a view (here with no
    position ignored), which later backwards add into; edited before a second backward, that
    backward is a clear error, never a corrupted gradient."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 3, 4, generator=gen, requires_grad=True)
    tied = torch.randn(4, 6, generator=gen, requires_grad=True)  # an lm_head tied to an embedding
    targets = torch.randint(0, 6, (2, 3), generator=gen)
    if ignored:
        targets[0, 1] = -100
    ref_h = hidden.detach().double().requires_grad_()
    ref_e = tied.detach().double().requires_grad_()
    ref_logp, _ = reference_logprobs(ref_h, ref_e.t(), targets)
    want = torch.autograd.grad(-ref_logp.sum(), [ref_h, ref_e])
    loss, _, _ = fused_linear_loss(hidden, tied.t(), targets, lambda lp, e, r: -lp, backend="torch")
    for times in (1, 2, 3, 4):
        loss.backward(retain_graph=True)
        for got, ref in zip((hidden.grad, tied.grad), want):
            assert rel_err(got, times * ref) <= 1e-5
    loss, _, _ = fused_linear_loss(hidden, tied.t(), targets, lambda lp, e, r: -lp, backend="torch")
    hidden.grad = tied.grad = None
    loss.backward(retain_graph=True)
    if not ignored:  # hidden.grad is the saved gradient itself (with ignored rows, a scatter of it)
        hidden.grad.zero_()  # as zero_grad(set_to_none=False) does
        with pytest.raises(RuntimeError, match="call the op again"):
            loss.backward()


def test_mode_a_outputs_may_be_edited_in_place():
    """The returned entropy is not the tensor saved for backward: masking it in place is allowed."""
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(5, 4, generator=gen, requires_grad=True)
    weight = torch.randn(7, 4, generator=gen)
    targets = torch.randint(0, 7, (5,), generator=gen)
    mask = torch.tensor([True, False, True, True, False])
    logp, ent = fused_token_logprobs(hidden, weight, targets, return_entropy=True, backend="torch")
    ent.masked_fill_(~mask, 0.0)
    logp.masked_fill_(~mask, 0.0)
    (logp + ent).sum().backward()
    ref_h = hidden.detach().double().requires_grad_()
    ref_logp, ref_ent = reference_logprobs(ref_h, weight.double(), targets)
    (want,) = torch.autograd.grad(((ref_logp + ref_ent) * mask).sum(), [ref_h])
    assert rel_err(hidden.grad, want) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_loss_fn_may_work_in_place(backend):
    _skip_unavailable(backend)
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(6, 8, generator=gen).to(device).requires_grad_()
    weight = torch.randn(11, 8, generator=gen).to(device)
    targets = torch.randint(0, 11, (6,), generator=gen).to(device)

    def clamped(lp, e, rows):
        return -lp.clamp_(min=-2.0) - 0.1 * e.mul_(2.0)

    loss, _, _ = fused_linear_loss(hidden, weight, targets, clamped, with_entropy=True, backend=backend)
    (got,) = torch.autograd.grad(loss, [hidden])
    ref_h = hidden.detach().double().requires_grad_()
    ref_logp, ref_ent = reference_logprobs(ref_h, weight.double(), targets)
    (want,) = torch.autograd.grad(clamped(ref_logp.clone(), ref_ent.clone(), None).sum(), [ref_h])
    assert rel_err(got, want) <= 2e-4


def test_double_backward_is_a_clear_error():
    hidden = torch.randn(3, 4, requires_grad=True)
    weight, targets = torch.randn(5, 4), torch.tensor([0, 2, 4])
    logp, _ = fused_token_logprobs(hidden, weight, targets, backend="torch")
    with pytest.raises(RuntimeError, match="create_graph=True .* is not supported"):
        torch.autograd.grad(logp.sum(), [hidden], create_graph=True)
    loss, _, _ = fused_linear_loss(hidden, weight, targets, lambda lp, e, r: -lp, backend="torch")
    with pytest.raises(RuntimeError, match="create_graph=True .* is not supported"):
        torch.autograd.grad(loss, [hidden], create_graph=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_bias_masks_vocabulary_entries(backend, dtype):
    """A -inf bias on some vocabulary ids (a padded vocabulary masked out), including whole slabs
    of them in vocabulary order, in the middle and at the end (the statistics pass runs the slabs
    last to first, so a masked tail is the first state a row sees): finite logp, entropy and
    gradients equal to the float64 reference on every backend, both modes and orders, whether or
    not the loss uses the entropy."""
    _skip_unavailable(backend)
    for masked in ((13, 31), (24, 40)):  # with chunk_size 2, vocabulary order's slabs are 8 wide: 2 all -inf
        _check_minus_inf_bias(backend, dtype, masked)


def _check_minus_inf_bias(backend, dtype, masked):
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(12)
    n, h, v = 9, 8, 40
    hidden = torch.randn(n, h, generator=gen).to(device, dtype).requires_grad_()
    weight = torch.randn(v, h, generator=gen).mul(0.5).to(device, dtype).requires_grad_()
    bias = torch.randn(v, generator=gen)
    bias[masked[0]:masked[1]] = float("-inf")
    bias = bias.to(device, dtype)
    targets = torch.randint(0, 13, (n,), generator=gen)
    targets[4] = -100
    targets = targets.to(device)
    ref_in = [hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()]
    ref_logp, ref_ent = reference_logprobs(*ref_in, targets, bias.double(), 0.8,
                                           logits_dtype=None if dtype == torch.float32 else dtype)
    fn = lambda lp, e, r: -torch.exp(lp) * (r % 3 - 1) - 0.1 * e
    rows = (targets != -100).nonzero().squeeze(1)
    for order in ORDERS:
        kw = dict(bias=bias, temperature=0.8, backend=backend, chunk_size=2, grad_order=order)
        logp, ent = fused_token_logprobs(hidden, weight, targets, return_entropy=True, **kw)
        assert rel_err(logp, ref_logp) <= TOL[dtype] and rel_err(ent, ref_ent) <= TOL[dtype], (masked, order)
        for use_entropy in (False, True):
            out = logp + ent if use_entropy else logp
            want = torch.autograd.grad((ref_logp + ref_ent if use_entropy else ref_logp).sum(), ref_in,
                                       retain_graph=True)
            got = torch.autograd.grad(out.sum(), [hidden, weight], retain_graph=True)
            for a, b in zip(got, want):
                assert rel_err(a, b) <= TOL[dtype], (masked, order, use_entropy)
        loss, _, _ = fused_linear_loss(hidden, weight, targets, fn, with_entropy=True, **kw)
        want = torch.autograd.grad(fn(ref_logp[rows], ref_ent[rows], rows).sum(), ref_in, retain_graph=True)
        for a, b in zip(torch.autograd.grad(loss, [hidden, weight]), want):
            assert rel_err(a, b) <= TOL[dtype], (masked, order)


def test_auto_backend_falls_back_to_torch_with_one_warning(monkeypatch):
    monkeypatch.setitem(backends._failed, "cpu", "hpt_fast backend 'cpu' is unavailable: simulated")
    monkeypatch.delitem(backends._loaded, "cpu", raising=False)
    monkeypatch.setattr(backends, "_warned", set())
    hidden, weight, targets = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 4])
    with pytest.warns(RuntimeWarning, match="falling back to the 'torch' backend"):
        logp, _ = fused_token_logprobs(hidden, weight, targets, backend="auto")
    ref, _ = reference_logprobs(hidden, weight, targets)
    assert rel_err(logp, ref) <= 1e-5
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_token_logprobs(hidden, weight, targets, backend="auto")  # warned once only


@pytest.mark.parametrize("version, interpreted, refused", [
    ("3.0.0", True, True), ("3.2.0", True, True), ("3.3.1", True, False), ("3.10.0+git1a2b", True, False),
    ("3.0.0", False, False),
])
def test_old_triton_interpreters_are_refused(version, interpreted, refused):
    """The interpreters of Triton 3.0-3.2 (pinned by torch 2.4-2.6) give NaN or wrong logp on these
    kernels: the triton backend will not load under them, naming the version; compiled, it does."""
    _skip_unavailable("triton")
    from hpt_fast.backends import triton_backend

    if refused:
        with pytest.raises(ImportError, match=f"before Triton 3.3; found {re.escape(version)}"):
            triton_backend._check_interpreter(version, interpreted)
    else:
        triton_backend._check_interpreter(version, interpreted)


def test_required_backends_are_built():
    """CI sets HPT_FAST_REQUIRE_BACKENDS so a failed C++ build or a missing triton cannot pass silently."""
    required = [b for b in os.environ.get("HPT_FAST_REQUIRE_BACKENDS", "").split(",") if b]
    if not required:
        pytest.skip("HPT_FAST_REQUIRE_BACKENDS is not set")
    missing = [b for b in required if b not in backends.available()]
    assert not missing, f"backends not available: {missing}"


def _near_deterministic_row(vocab: int, tail: Optional[float], temperature: float) -> tuple[Tensor, Tensor, int]:
    """(hidden [1, 64], weight [vocab, 64], target), float64, the target's logit moved along the
    hidden vector until 1 - p of the target is ``tail`` at ``temperature``; with ``tail`` None,
    the next column's weight row is the target's, so that the row's largest logit is tied (p of
    the target 1/2 or less)."""
    g = torch.Generator().manual_seed(vocab)
    h = torch.randn(1, 64, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, 64, generator=g, dtype=torch.float64) / 8
    target = (vocab // 2 + 3) % vocab
    if tail is None:
        w[target + 1] = w[target]
    else:
        z = (h @ w.t())[0] / temperature
        others = torch.logsumexp(torch.cat([z[:target], z[target + 1:]]), 0)
        wanted = temperature * (float(others) - math.log(tail))
        w[target] += h[0] * (wanted - float(h[0] @ w[target])) / float(h[0] @ h[0])
    return h, w, target


@pytest.mark.parametrize("mode", ["A", "B"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab, tail, temperature", [
    (2, 1e-5, 0.3), (1000, 1e-3, 1.0), (1000, 1e-5, 1.0), (1000, 1e-7, 1.0), (1000, 1e-7, 0.3), (1000, None, 1.0),
])
def test_near_deterministic_rows_keep_float32_precision(backend, mode, vocab, tail, temperature):
    """Rows where the target's p is near 1 (1 - p from 1e-3 to 1e-7), and one whose largest logit
    is tied. Three roundings lost most of such a row's logp, entropy and gradients, where naive
    PyTorch's gradients keep float32 precision:
    - the log-sum-exp as one float32 number resolved log p near 0 only to float32's spacing at
      the logits (7.6e-6 at 100): it is now taken in two parts, (m, log s);
    - 1 - p at the target column in float32 kept only float32's spacing at 1: now -expm1(log p);
    - s = sum exp(z - m) added the other columns' terms to the largest's exp(0) = 1 in float32,
      resolving log s only to float32's spacing at 1: the 1 is now kept out of them. Before, at
      1 - p of 1e-7 the gradients were 4-6% off (torch, triton) and 0.07-0.3% (cpu), and logp
      (as naive PyTorch's) up to 100%.
    Now logp, entropy and the gradients are within 1e-5 of float64's, row by row
    (``bench.float32_precision``: at most 4.7e-6, at V 8192)."""
    _skip_unavailable(backend)
    device = backend_device(backend)
    h64, w64, target = _near_deterministic_row(vocab, tail, temperature)
    h, w = h64.float().to(device).requires_grad_(), w64.float().to(device).requires_grad_()
    targets = torch.tensor([target], device=device)
    if mode == "A":
        logp, entropy = fused_token_logprobs(h, w, targets, temperature=temperature, return_entropy=True,
                                             backend=backend)
        loss = (logp + entropy).sum()
    else:
        loss, logp, entropy = fused_linear_loss(h, w, targets, lambda lp, ent, rows: lp + ent,
                                                temperature=temperature, with_entropy=True, backend=backend)
    grads = torch.autograd.grad(loss, [h, w])
    ref_in = [x.detach().cpu().double().requires_grad_() for x in (h, w)]
    ref_logp, ref_ent = reference_logprobs(*ref_in, targets.cpu(), temperature=temperature)
    ref_grads = torch.autograd.grad((ref_logp + ref_ent).sum(), ref_in)
    errors = [rel_err(got.cpu(), want) for got, want in zip((logp, entropy, *grads), (ref_logp, ref_ent, *ref_grads))]
    assert max(errors) < 1e-5, f"logp, entropy, grad_hidden, grad_weight errors {errors}"


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_target_columns_gradient_keeps_float32_precision(backend, with_entropy):
    """Each backend's ``grad_logits`` at the target column, ``g_logp * (1 - p) - g_ent * p *
    (log p + H)``, within 1e-6 of float64's (of its terms' magnitudes), row by row, for 1 - p
    from 0.35 to 1e-7, closely around 0.01 and 0.3. 1 - p is -expm1(log p); Triton, which has
    no expm1, took it as p - 1 below log p = -0.01 (6e-8 absolute: 6.6e-6 relative at 1 - p =
    0.0101) until it took a longer series once per row (2e-7; both under the CPU interpreter)."""
    _skip_unavailable(backend)
    module = backends.load(backend)
    device = backend_device(backend)
    tails = [*torch.linspace(0.0095, 0.0105, 11).tolist(), 0.35, 0.3, 0.29, 0.1, 0.05, 1e-3, 1e-5, 1e-7]
    g = torch.Generator().manual_seed(17)
    x = torch.randn(len(tails), 1000, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 1000, (len(tails),), generator=g)
    for row, tail in enumerate(tails):
        target = int(targets[row])
        others = torch.logsumexp(torch.cat([x[row, :target], x[row, target + 1:]]), 0)
        x[row, target] = others + math.log((1 - tail) / tail)
    logits = x.float()
    logprobs = torch.log_softmax(logits.double(), dim=1)
    logp_t = logprobs.gather(1, targets[:, None]).squeeze(1)
    entropy_64 = -(logprobs.exp() * logprobs).sum(1)
    g_logp = torch.randn(len(tails), generator=g).abs() + 0.5
    g_ent = torch.randn(len(tails), generator=g) if with_entropy else None
    terms = [g_logp.double() * -torch.expm1(logp_t)]
    if with_entropy:
        terms.append(-g_ent.double() * logp_t.exp() * (logp_t + entropy_64))
    want = sum(terms)
    logits, targets_d = logits.to(device), targets.to(device)
    state = row_state.empty(len(tails), device)
    module.row_stats(logits, targets_d, 1.0, True, state)
    _, norm, entropy = row_state.finish(state, True)
    out = torch.empty_like(logits)
    module.grad_logits(logits, targets_d, norm, entropy if with_entropy else None, g_logp.to(device),
                       None if g_ent is None else g_ent.to(device), 1.0, out)
    got = out.cpu().gather(1, targets[:, None]).squeeze(1).double()
    # relative to the terms' magnitudes: with the entropy term the two may cancel
    errors = (got - want).abs() / sum(t.abs() for t in terms)
    assert float(errors.max()) <= 1e-6, dict(zip(tails, errors.tolist()))
