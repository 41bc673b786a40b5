"""Both modes of the fused op, on every backend, against a float64 reference of the naive computation."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from hpt_fast import backends, fused_linear_loss, fused_token_logprobs
from tests.reference import reference_logprobs, rel_err

BACKENDS = ["torch", "cpu", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# bf16 / fp16 logits blocks are rounded to the input dtype by the GEMM, as in every bf16 trainer
TOL = {torch.float32: 2e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2}
# (tokens, hidden, vocab); the interpreted Triton kernels get the small ones only
CASES = [(1, 1, 1), (5, 3, 7), (37, 64, 1001), (130, 300, 4099), (64, 17, 32003)]
TRITON_CASES = [(5, 3, 7), (33, 16, 1001), (17, 40, 2999)]


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
    cases = TRITON_CASES if backend == "triton" else CASES
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
    chunk_size = [None, 4, 16][case % 3]
    return Problem(
        hidden.to(dtype).requires_grad_(),
        weight.to(dtype).requires_grad_(),
        targets,
        None if bias is None else bias.requires_grad_(),
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
    logp, entropy = fused_token_logprobs(
        p.hidden, p.weight, p.targets, bias=p.bias, temperature=p.temperature,
        return_entropy=True, backend=backend, chunk_size=p.chunk_size,
    )
    ref_in = _reference_inputs(p)
    ref_logp, ref_ent = _reference(p, ref_in)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    assert logp.shape == p.targets.shape
    assert rel_err(logp, ref_logp) <= TOL[dtype]
    assert rel_err(entropy, ref_ent) <= TOL[dtype]
    assert (logp <= 0).all() and (entropy >= 0).all()
    ignored = p.targets == -100
    assert (logp[ignored] == 0).all() and (entropy[ignored] == 0).all()

    gen = torch.Generator().manual_seed(case)
    g_logp = torch.randn(p.targets.shape, generator=gen)
    g_ent = torch.randn(p.targets.shape, generator=gen)
    got = torch.autograd.grad((logp * g_logp + entropy * g_ent).sum(), _inputs(p))
    want = torch.autograd.grad((ref_logp * g_logp + ref_ent * g_ent).sum(), ref_in)
    for name, a, b in zip(("hidden", "weight", "bias"), got, want):
        assert a.dtype == dtype, name
        assert rel_err(a, b) <= TOL[dtype], name


@pytest.mark.parametrize("backend", BACKENDS)
def test_mode_a_logp_only_gradient(backend):
    """Without the entropy output, the backward uses the logp term alone."""
    _skip_unavailable(backend)
    p = draw_problem(backend, torch.float32, 2)
    logp, entropy = fused_token_logprobs(p.hidden, p.weight, p.targets, backend=backend,
                                         temperature=p.temperature, bias=p.bias, chunk_size=7)
    assert entropy is None
    ref_in = _reference_inputs(p)
    ref_logp, _ = _reference(p, ref_in)
    got = torch.autograd.grad(logp.sum(), _inputs(p))
    want = torch.autograd.grad(ref_logp.sum(), ref_in)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= TOL[torch.float32]


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
    ref_in = _reference_inputs(p)
    ref_logp, ref_ent = _reference(p, ref_in)
    gen = torch.Generator().manual_seed(case + 7)
    flat_ref = ref_logp.detach().reshape(-1)
    # old log-probs near the current ones, so some ratios fall inside the clip range and some outside
    old = flat_ref + 0.3 * torch.randn(flat_ref.shape, generator=gen, dtype=torch.float64)
    adv = torch.randn(flat_ref.shape, generator=gen, dtype=torch.float64)
    fn = clipped_ratio_loss(old, adv, 0.01)

    loss, logp, entropy = fused_linear_loss(
        p.hidden, p.weight, p.targets, fn, bias=p.bias, temperature=p.temperature,
        with_entropy=True, backend=backend, chunk_size=p.chunk_size,
    )
    rows = (p.targets.reshape(-1) != -100).nonzero().squeeze(1)
    ref_loss = fn(ref_logp.reshape(-1)[rows], ref_ent.reshape(-1)[rows], rows).sum()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(float(loss) - float(ref_loss)) <= TOL[dtype] * max(1.0, float(ref_loss.abs()) + rows.numel() ** 0.5)
    assert rel_err(logp, ref_logp) <= TOL[dtype] and not logp.requires_grad
    assert rel_err(entropy, ref_ent) <= TOL[dtype]

    # an upstream gradient other than 1 (a loss coefficient) scales every input gradient
    got = torch.autograd.grad(loss * 0.5, _inputs(p))
    want = torch.autograd.grad(ref_loss * 0.5, ref_in)
    for name, a, b in zip(("hidden", "weight", "bias"), got, want):
        assert a.dtype == dtype, name
        assert rel_err(a, b) <= TOL[dtype], name


@pytest.mark.parametrize("backend", BACKENDS)
def test_mode_b_equals_mode_a_composed(backend):
    """Mode B's gradients equal autograd through mode A's outputs with the same per-token loss."""
    _skip_unavailable(backend)
    p = draw_problem(backend, torch.float32, 2)
    gen = torch.Generator().manual_seed(3)
    n = p.targets.numel()
    fn = clipped_ratio_loss(-3 + torch.randn(n, generator=gen), torch.randn(n, generator=gen), 0.05)
    loss_b, _, _ = fused_linear_loss(p.hidden, p.weight, p.targets, fn, bias=p.bias, with_entropy=True,
                                     temperature=p.temperature, backend=backend, chunk_size=5)
    grads_b = torch.autograd.grad(loss_b, _inputs(p))
    logp, ent = fused_token_logprobs(p.hidden, p.weight, p.targets, bias=p.bias, return_entropy=True,
                                     temperature=p.temperature, backend=backend, chunk_size=5)
    rows = (p.targets.reshape(-1) != -100).nonzero().squeeze(1)
    loss_a = fn(logp.reshape(-1)[rows], ent.reshape(-1)[rows], rows).sum()
    grads_a = torch.autograd.grad(loss_a, _inputs(p))
    assert torch.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_a, grads_b):
        assert rel_err(b, a) <= 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_stay_finite(backend, dtype):
    """Logits of magnitude 1e4 give finite log-probs and gradients, never NaN; exact ones in float32.

    (In bf16 / fp16 the logits' own rounding error is of order 1 or more at that magnitude, so only
    finiteness and the value of logp relative to its scale can be checked there.)
    """
    _skip_unavailable(backend)
    p = draw_problem(backend, dtype, 2)
    with torch.no_grad():
        logits = p.hidden.double().reshape(-1, p.hidden.shape[-1]) @ p.weight.double().t()
        factor = 1e4 / float(logits.abs().max())
        p.hidden.mul_(factor ** 0.5)
        p.weight.mul_(factor ** 0.5)
    logp, entropy = fused_token_logprobs(p.hidden, p.weight, p.targets, return_entropy=True,
                                         backend=backend, chunk_size=p.chunk_size)
    ref_in = _reference_inputs(p)
    ref_logp, ref_ent = reference_logprobs(ref_in[0], ref_in[1], p.targets)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    assert (logp <= 0).all() and (entropy >= 0).all()
    assert rel_err(logp, ref_logp) <= TOL[dtype]
    got = torch.autograd.grad((logp + entropy).sum(), [p.hidden, p.weight])
    want = torch.autograd.grad((ref_logp + ref_ent).sum(), ref_in[:2])
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        if dtype == torch.float32:
            assert rel_err(a, b) <= TOL[dtype]

    fn = clipped_ratio_loss(ref_logp.detach().reshape(-1), torch.ones(p.targets.numel()), 0.01)
    loss, _, _ = fused_linear_loss(p.hidden, p.weight, p.targets, fn, with_entropy=True,
                                   backend=backend, chunk_size=p.chunk_size)
    grads = torch.autograd.grad(loss, [p.hidden, p.weight])
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)


def test_gradcheck_float64_both_modes():
    gen = torch.Generator().manual_seed(0)
    n, h, v = 6, 4, 9
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[2] = -100

    def mode_a(hd, wt, b):
        return fused_token_logprobs(hd, wt, targets, bias=b, temperature=0.8, return_entropy=True, chunk_size=4)

    old = torch.randn(n, generator=gen, dtype=torch.float64) - 2
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    # a smooth non-linear loss, so finite differences are valid everywhere
    fn = lambda lp, ent, rows: -adv[rows] * torch.exp(lp - old[rows]) - 0.1 * ent * torch.sigmoid(lp)

    def mode_b(hd, wt, b):
        return fused_linear_loss(hd, wt, targets, fn, bias=b, temperature=0.8, with_entropy=True, chunk_size=4)[0]

    assert torch.autograd.gradcheck(mode_a, (hidden, weight, bias))
    assert torch.autograd.gradcheck(mode_b, (hidden, weight, bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_positions_ignored(backend):
    _skip_unavailable(backend)
    hidden = torch.randn(2, 3, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    targets = torch.full((2, 3), -100)
    logp, entropy = fused_token_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)
    assert (logp == 0).all() and (entropy == 0).all()
    g_h, g_w = torch.autograd.grad(logp.sum() + entropy.sum(), [hidden, weight])
    assert (g_h == 0).all() and (g_w == 0).all()
    loss, _, _ = fused_linear_loss(hidden, weight, targets, lambda lp, e, r: -lp, backend=backend)
    g_h, g_w = torch.autograd.grad(loss, [hidden, weight])
    assert float(loss) == 0 and (g_h == 0).all() and (g_w == 0).all()


def test_mode_b_rows_index_the_flat_targets():
    """token_loss_fn sees each non-ignored position once, by its index into targets.reshape(-1)."""
    targets = torch.tensor([[3, -100, 1], [-100, 0, 2]])
    seen = []

    def fn(lp, ent, rows):
        seen.append(rows.clone())
        return -lp

    fused_linear_loss(torch.randn(2, 3, 5), torch.randn(4, 5), targets, fn, backend="torch", chunk_size=2)
    assert torch.cat(seen).tolist() == [0, 2, 4, 5]


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


def test_mode_b_backward_with_retained_graph():
    hidden = torch.randn(4, 3, requires_grad=True)
    loss, _, _ = fused_linear_loss(hidden, torch.randn(5, 3), torch.tensor([0, 1, 2, 3]),
                                   lambda lp, e, r: -lp, backend="torch")
    loss.backward(retain_graph=True)
    first = hidden.grad.clone()
    loss.backward()
    assert torch.allclose(hidden.grad, 2 * first)


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


def test_required_backends_are_built():
    """CI sets HPT_FAST_REQUIRE_BACKENDS so a failed C++ build or a missing triton cannot pass silently."""
    required = [b for b in os.environ.get("HPT_FAST_REQUIRE_BACKENDS", "").split(",") if b]
    if not required:
        pytest.skip("HPT_FAST_REQUIRE_BACKENDS is not set")
    missing = [b for b in required if b not in backends.available()]
    assert not missing, f"backends not available: {missing}"
