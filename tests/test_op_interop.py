"""The fused op inside other people's training steps: under torch.autocast it casts its inputs as
autocast casts a linear layer's, runs its own math with autocast off, and hands each input its
gradient in that input's dtype; under torch.compile it is one opaque call."""
from __future__ import annotations

import pytest
import torch

from hpt_fast import backends, fused_linear_loss, fused_token_logprobs
from tests.reference import backend_device

BACKENDS = ["torch", "cpu", "triton"]


def _skip_unavailable(backend: str) -> None:
    try:
        backends.load(backend)
    except ImportError as exc:
        pytest.skip(str(exc))


def _leaves(dtype: torch.dtype, seed: int = 0, device: torch.device = torch.device("cpu")):
    gen = torch.Generator().manual_seed(seed)
    n, h, v = 13, 24, 301
    hidden = torch.randn(n, h, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) * 0.3).to(device, dtype).requires_grad_()
    bias = torch.randn(v, generator=gen).to(device, dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[[2, 7]] = -100
    return hidden, weight, bias, targets.to(device)


def _as(dtype: torch.dtype, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return [x.detach().to(dtype).requires_grad_() for x in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
def test_mode_a_under_autocast_equals_the_explicit_cast(backend):
    """float32 leaves under bf16 autocast give bit for bit the op on bf16 copies; the gradients
    are those bf16 gradients in float32, also with backward called inside the autocast region."""
    _skip_unavailable(backend)
    device = backend_device(backend)
    hidden, weight, bias, targets = _leaves(torch.float32, device=device)
    low = _as(torch.bfloat16, hidden, weight, bias)
    kw = dict(temperature=0.8, return_entropy=True, backend=backend, chunk_size=4)
    want_logp, want_ent = fused_token_logprobs(low[0], low[1], targets, bias=low[2], **kw)
    want = torch.autograd.grad((want_logp + 0.5 * want_ent).sum(), low)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logp, ent = fused_token_logprobs(hidden, weight, targets, bias=bias, **kw)
        got = torch.autograd.grad((logp + 0.5 * ent).sum(), [hidden, weight, bias])
    assert torch.equal(logp, want_logp) and torch.equal(ent, want_ent)
    for name, g, w in zip(("hidden", "weight", "bias"), got, want):
        assert g.dtype == torch.float32, name
        assert torch.equal(g, w.float()), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_mode_b_takes_autocast_activations_with_a_float32_weight(backend):
    """The mixed-precision case: bf16 activations from an autocast region, a float32 lm_head
    weight. Outside autocast that pair is refused; inside, the op runs in bf16 with autocast off
    (token_loss_fn sees float32 logp and no autocast), like the op on bf16 copies."""
    _skip_unavailable(backend)
    device = backend_device(backend)
    hidden, weight, bias, targets = _leaves(torch.float32, seed=1, device=device)
    adv = torch.randn(targets.numel(), generator=torch.Generator().manual_seed(2)).to(device)
    seen = []

    def token_loss(logp, entropy, rows):
        seen.append((logp.dtype, torch.is_autocast_enabled(device.type)))
        return -torch.exp(logp) * adv[rows] - 0.1 * entropy

    kw = dict(bias=bias, with_entropy=True, backend=backend, chunk_size=4)
    with pytest.raises(TypeError, match="weight dtype torch.float32 differs from hidden dtype torch.bfloat16"):
        fused_linear_loss(hidden.bfloat16(), weight, targets, token_loss, **kw)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        activations = torch.nn.functional.linear(hidden, torch.eye(hidden.shape[1], device=device))
        assert activations.dtype == torch.bfloat16
        loss, logp, _ = fused_linear_loss(activations, weight, targets, token_loss, **kw)
    got = torch.autograd.grad(loss, [hidden, weight, bias])
    assert seen and all(s == (torch.float32, False) for s in seen)
    low = _as(torch.bfloat16, activations, weight, bias)
    want_loss, want_logp, _ = fused_linear_loss(low[0], low[1], targets, token_loss, **{**kw, "bias": low[2]})
    want = torch.autograd.grad(want_loss, low)
    assert torch.equal(loss, want_loss) and torch.equal(logp, want_logp)
    assert torch.equal(got[1], want[1].float()) and torch.equal(got[2], want[2].float())
    assert got[0].dtype == torch.float32 and torch.isfinite(got[0]).all()


def test_float64_is_left_alone_under_autocast():
    """autocast does not cast float64, and neither does the op: the reference dtype stays exact."""
    hidden, weight, bias, targets = _leaves(torch.float64)
    want, _ = fused_token_logprobs(hidden, weight, targets, bias=bias, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = fused_token_logprobs(hidden, weight, targets, bias=bias, backend="torch")
    assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("mode", ["A", "B"])
def test_inside_torch_compile(mode):
    """A compiled step runs the op as one opaque call: one graph break around it, where tracing
    into its argument checks and C++ / Triton calls broke the graph many times; the compiled step
    gets the eager gradients."""
    hidden, weight, bias, targets = _leaves(torch.float32, seed=3)

    def step(h, w, b):
        x = torch.tanh(h) * 2
        if mode == "A":
            logp, ent = fused_token_logprobs(x, w, targets, bias=b, return_entropy=True)
            return (logp + 0.1 * ent).sum() * 0.5
        loss, _, _ = fused_linear_loss(x, w, targets, lambda lp, e, r: -lp - 0.1 * e, bias=b, with_entropy=True)
        return loss * 0.5

    want = torch.autograd.grad(step(hidden, weight, bias), [hidden, weight, bias])
    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(hidden, weight, bias)
    assert explained.graph_break_count == 1, [str(r.reason)[:80] for r in explained.break_reasons]
    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(step, backend="aot_eager")(hidden, weight, bias), [hidden, weight, bias])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
