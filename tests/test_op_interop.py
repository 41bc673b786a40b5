"""The fused op inside other people's training steps: under torch.autocast it runs its GEMMs in
the dtype autocast gives a linear layer's inputs, its own math with autocast off, and hands each
input its gradient in that input's dtype; under torch.compile mode A is a pair of custom ops in the
graph and mode B one opaque call."""
from __future__ import annotations

import pytest
import torch

from hpt_fast import backends, fused_linear_loss, fused_token_logprobs, op_inputs, op_passes, ops
from tests.reference import backend_device, reference_logprobs, rel_err

BACKENDS = ["torch", "cpu", "triton"]
BF16_TOL = 6e-2  # tests/test_fused_op.py's bf16 tolerance against the float64 reference


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


def _check_autocast_grads(names, got, want, ref, device: torch.device) -> None:
    """Gradients of float32 leaves under bf16 autocast (``got``) against the op's gradients of
    bf16 copies (``want``) and a float64 reference on those bf16 values (``ref``).

    The op writes a float32 input's gradient in float32. On CPU each GEMM's product still leaves
    it in bf16 and sums over blocks run in float32 either way, so got is want before its one
    final rounding to bf16, exactly. On CUDA no product is rounded; there got is checked against
    the reference at the bf16 tolerance of the other tests."""
    for name, g, w, r in zip(names, got, want, ref):
        assert g.dtype == torch.float32, name
        if device.type == "cpu":
            assert torch.equal(g.bfloat16(), w), name
        assert rel_err(g, r) <= BF16_TOL, name


def _reference_grads(low, targets, loss_of, **kw):
    """float64 gradients of ``loss_of(logp, entropy)`` at the bf16 inputs ``low``."""
    ref_in = [x.detach().double().requires_grad_() for x in low]
    logp, ent = reference_logprobs(ref_in[0], ref_in[1], targets, ref_in[2], kw.get("temperature", 1.0))
    return torch.autograd.grad(loss_of(logp, ent), ref_in)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mode_a_under_autocast_follows_the_explicit_cast(backend):
    """float32 leaves under bf16 autocast give bit for bit the op's values on bf16 copies; each
    gradient comes back in float32, the bf16 copies' gradients before their last rounding (see
    ``_check_autocast_grads``), also with backward called inside the autocast region."""
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
    valid = targets != -100
    ref = _reference_grads(low, targets, lambda lp, e: (lp + 0.5 * e)[valid].sum(), temperature=0.8)
    _check_autocast_grads(("hidden", "weight", "bias"), got, want, ref, device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mode_b_takes_autocast_activations_with_a_float32_weight(backend):
    """The mixed-precision case: bf16 activations from an autocast region, a float32 lm_head
    weight. Outside autocast that pair is refused; inside, the op runs in bf16 with autocast off
    (token_loss_fn sees float32 logp and no autocast), with the values of the op on bf16 copies
    and float32 gradients for the weight and bias, no rounder than those copies' gradients."""
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
    got = torch.autograd.grad(loss, [activations, weight, bias])
    assert seen and all(s == (torch.float32, False) for s in seen)
    low = _as(torch.bfloat16, activations, weight, bias)
    want_loss, want_logp, _ = fused_linear_loss(low[0], low[1], targets, token_loss, **{**kw, "bias": low[2]})
    want = torch.autograd.grad(want_loss, low)
    assert torch.equal(loss, want_loss) and torch.equal(logp, want_logp)
    assert got[0].dtype == torch.bfloat16 and torch.equal(got[0], want[0])
    rows = (targets != -100).nonzero().squeeze(1)
    ref = _reference_grads(
        low, targets, lambda lp, e: (-torch.exp(lp) * adv - 0.1 * e)[rows].sum()
    )
    _check_autocast_grads(("weight", "bias"), got[1:], want[1:], ref[1:], device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_float32_weight_keeps_mode_b_in_token_order(backend, monkeypatch):
    """Where a bf16 weight's float32 sum would need a [V, H] buffer over the budget (vocabulary
    order, nearly four GEMMs), a float32 weight under autocast takes its float32 gradient as the
    sum itself: three-GEMM token order over several chunks, no buffer, and the gradients of the
    bf16 copies in token order with float32 sums, before their final rounding."""
    _skip_unavailable(backend)
    # 2 KiB: 3-token chunks of bf16 rows, and V * H * 4 = 29 KiB is over it
    monkeypatch.setenv("HPT_FAST_MEMORY_BUDGET_MB", "0.002")
    device = backend_device(backend)
    hidden, weight, bias, targets = _leaves(torch.float32, seed=5, device=device)
    low = _as(torch.bfloat16, hidden, weight, bias)
    fn = lambda lp, e, r: -lp * (r % 3 - 1) - 0.1 * e
    kw = dict(with_entropy=True, backend=backend)

    def plan_of(h, w, b):
        dtype = op_inputs.checked_args(h, w, targets, b, 1.0, -100, backend, None, "auto", torch.float32)[-1]
        return ops._prepare(h, w, targets, b, 1.0, -100, backend, None, "B", "auto", torch.float32, dtype, None)[-1]

    plan = plan_of(*low)
    assert plan.order == "vocab" and plan.float32_weight_sum
    with torch.autocast(device.type, dtype=torch.bfloat16):
        plan = plan_of(hidden, weight, bias)
        assert (plan.order, plan.float32_weight_sum, plan.dtype) == ("tokens", False, torch.bfloat16)
        assert plan.chunk < 11  # several chunks of the 11 scored tokens: the sum runs over them
        loss, _, _ = fused_linear_loss(hidden, weight, targets, fn, bias=bias, **kw)
    got = torch.autograd.grad(loss, [hidden, weight, bias])
    want_loss, _, _ = fused_linear_loss(low[0], low[1], targets, fn, bias=low[2], grad_order="tokens", **kw)
    want = torch.autograd.grad(want_loss, low)
    assert torch.equal(loss, want_loss)
    rows = (targets != -100).nonzero().squeeze(1)
    ref = _reference_grads(low, targets, lambda lp, e: fn(lp[rows], e[rows], rows).sum())
    _check_autocast_grads(("hidden", "weight", "bias"), got, want, ref, device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ["tokens", "vocab"])
def test_bf16_leaves_under_float16_autocast(backend, order):
    """Under float16 autocast bf16 leaves take float16 GEMMs (their values are float16 values:
    exact) and get bf16 gradients, the float16 products added into them; within the low-precision
    tolerance of the float64 reference in both modes."""
    _skip_unavailable(backend)
    device = backend_device(backend)
    hidden, weight, bias, targets = _leaves(torch.bfloat16, seed=6, device=device)
    fn = lambda lp, e, r: -torch.exp(lp) * (r % 3 - 1) - 0.1 * e
    kw = dict(bias=bias, backend=backend, chunk_size=4, grad_order=order)
    valid = targets != -100
    rows = valid.nonzero().squeeze(1)
    for accum in (torch.float32, None):
        with torch.autocast(device.type, dtype=torch.float16):
            logp, ent = fused_token_logprobs(hidden, weight, targets, return_entropy=True, accum_dtype=accum, **kw)
            loss, _, _ = fused_linear_loss(hidden, weight, targets, fn, with_entropy=True, accum_dtype=accum, **kw)
        got_a = torch.autograd.grad((logp + 0.5 * ent).sum(), [hidden, weight, bias])
        got_b = torch.autograd.grad(loss, [hidden, weight, bias])
        low = (hidden, weight, bias)
        want_a = _reference_grads(low, targets, lambda lp, e: (lp + 0.5 * e)[valid].sum())
        want_b = _reference_grads(low, targets, lambda lp, e: fn(lp[rows], e[rows], rows).sum())
        for got, want in ((got_a, want_a), (got_b, want_b)):
            for name, g, r in zip(("hidden", "weight", "bias"), got, want):
                assert g.dtype == torch.bfloat16 and rel_err(g, r) <= BF16_TOL, (accum, name)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("rows, piece_rows, add", [(10, 3, False), (10, 3, True), (10, 16, True), (0, 3, True)])
def test_matmul_into_a_wider_output(device, rows, piece_rows, add, monkeypatch):
    """bf16 products into float32 rows of a larger tensor, from a transposed operand: on CPU a few
    rows at a time, each piece the bf16 product of its rows, copied or added; on CUDA straight
    from cuBLAS in float32 (the products of the bf16 values summed in float32). The rest of the
    tensor is untouched."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU")
    gen = torch.Generator().manual_seed(9)
    k, n = 7, 5
    monkeypatch.setattr(op_passes, "PIECE_BYTES", piece_rows * n * 2)
    a = torch.randn(k, rows, generator=gen).bfloat16().to(device).t()  # [rows, k], not contiguous
    b = torch.randn(k, n, generator=gen).bfloat16().to(device)
    full = torch.randn(rows + 4, n, generator=gen).to(device)
    before = full.clone()
    op_passes.matmul_into(full[2 : 2 + rows], a, b, add, backends.load("torch"))
    if device == "cpu":
        product = (a @ b).float()
        want = before[2 : 2 + rows] + product if add else product
        assert torch.equal(full[2 : 2 + rows], want)
    else:
        product = a.double() @ b.double()
        want = before[2 : 2 + rows].double() + product if add else product
        assert torch.allclose(full[2 : 2 + rows].double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(full[:2], before[:2]) and torch.equal(full[2 + rows :], before[2 + rows :])


def _float32_output_gemms(monkeypatch, addmm_fault=None):
    """Give CPU torch.mm / torch.addmm the ``out_dtype=torch.float32`` path CUDA has (the
    products of the low-precision values summed in float32), same signatures; ``addmm_fault``
    makes addmm into a float32 self misbehave: "raise" as pytorch#154086 reports, "wrong" a bad
    sum. Returns the calls that took the float32 path."""
    mm, addmm, calls = torch.mm, torch.addmm, []

    def fake_mm(a, b, *, out_dtype=None, out=None):
        if out_dtype is None:
            return mm(a, b, out=out)
        calls.append("mm")
        return mm(a.to(out_dtype), b.to(out_dtype), out=out)

    def fake_addmm(c, a, b, *, out_dtype=None, beta=1, alpha=1, out=None):
        if out_dtype is None:
            return addmm(c, a, b, beta=beta, alpha=alpha, out=out)
        if addmm_fault == "raise":
            raise RuntimeError("self and mat2 must have the same dtype, but got Float and BFloat16")
        calls.append("addmm")
        result = addmm(c, a.to(out_dtype), b.to(out_dtype), beta=beta, alpha=alpha, out=out)
        return result.mul_(1.5) if addmm_fault == "wrong" else result

    monkeypatch.setattr(torch, "mm", fake_mm)
    monkeypatch.setattr(torch, "addmm", fake_addmm)
    monkeypatch.setattr(op_passes, "FLOAT32_OUT_GEMM", True)  # the overloads, which torch < 2.8 lacks
    op_passes.float32_products.cache_clear()
    return calls


@pytest.mark.parametrize("fault", [None, "raise", "wrong"])
def test_float32_output_gemms_are_tried_before_use(fault, monkeypatch):
    """Products for a float32 sum come straight from a float32-output GEMM only where a trial on
    that device found it working (the CPU has none; some torch builds refuse addmm into a float32
    self, pytorch#154086): with the GEMM the sum is of exact products, without it of bf16-rounded
    pieces, and either way the op's values are right."""
    assert not op_passes.float32_products(torch.device("cpu"), torch.bfloat16)  # no CPU kernel
    calls = _float32_output_gemms(monkeypatch, fault)
    try:
        works = op_passes.float32_products(torch.device("cpu"), torch.bfloat16)
        assert works == (fault is None)
        assert not op_passes.float32_products(torch.device("cpu"), torch.float32)
        gen = torch.Generator().manual_seed(4)
        a = torch.randn(9, 33, generator=gen).bfloat16()
        b = torch.randn(33, 6, generator=gen).bfloat16()
        start = torch.randn(9, 6, generator=gen)
        calls.clear()
        for add in (False, True):
            out = start.clone()
            op_passes.matmul_into(out, a, b, add, backends.load("torch"))
            product = (a.float() @ b.float()) if works else (a @ b).float()
            want = start + product if add else product
            assert torch.allclose(out, want, rtol=1e-6, atol=1e-6), add
        assert calls == (["mm", "addmm"] if works else [])
    finally:
        op_passes.float32_products.cache_clear()


def test_float64_is_left_alone_under_autocast():
    """autocast does not cast float64, and neither does the op: the reference dtype stays exact,
    values and gradients, in both modes."""
    hidden, weight, bias, targets = _leaves(torch.float64)
    leaves = [hidden, weight, bias]
    fn = lambda lp, e, r: -lp - 0.1 * e

    def run():
        logp, ent = fused_token_logprobs(hidden, weight, targets, bias=bias, backend="torch", return_entropy=True)
        loss, _, _ = fused_linear_loss(hidden, weight, targets, fn, bias=bias, backend="torch", with_entropy=True)
        return [logp, ent, loss, *torch.autograd.grad((logp + ent).sum(), leaves), *torch.autograd.grad(loss, leaves)]

    want = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run()
        mixed = "float64 differs from hidden dtype torch.float32 .under torch.bfloat16 autocast"
        with pytest.raises(TypeError, match=mixed):
            fused_token_logprobs(hidden.float(), weight, targets)
    for g, w in zip(got, want):
        assert g.dtype == torch.float64 and torch.equal(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mode_a_compiles_into_one_graph(backend):
    """Mode A is a pair of custom ops with a registered autograd formula: a compiled step takes it
    with fullgraph=True (no graph break) and gets the eager values and gradients, ignored rows
    and autocast included, and its top-1 flags and logit sums."""
    _skip_unavailable(backend)
    device = backend_device(backend)
    hidden, weight, bias, targets = _leaves(torch.float32, seed=3, device=device)

    def step(h, w, b):
        logp, ent, *extras = fused_token_logprobs(
            torch.tanh(h) * 2, w, targets, bias=b, return_entropy=True, backend=backend, temperature=0.9,
            chunk_size=4, return_top1=True, return_logit_mean=True, return_log_sum_sq_probs=True)
        return (logp + 0.1 * ent).sum() * 0.5, logp, extras

    for autocast in (False, True):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            want_loss, want_logp, want_extras = step(hidden, weight, bias)
            torch._dynamo.reset()
            loss, logp, extras = torch.compile(step, backend="aot_eager", fullgraph=True)(hidden, weight, bias)
        want = torch.autograd.grad(want_loss, [hidden, weight, bias])
        got = torch.autograd.grad(loss, [hidden, weight, bias])
        assert torch.equal(logp, want_logp) and bool((logp[targets == -100] == 0).all())
        assert len(extras) == 3 and all(torch.equal(a, b) for a, b in zip(extras, want_extras))
        for g, w in zip(got, want):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


# Inductor's own imports use torch.jit, deprecated in this torch
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_mode_a_under_inductor_with_dynamic_shapes(device):
    """Inductor compiles the code around mode A's custom ops (C++ on the CPU, Triton on a GPU,
    where "auto" is the Triton backend); with dynamic shapes a second batch of another size and
    another set of ignored rows runs the same graph, against float64."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU")
    weight = (torch.randn(301, 24, generator=torch.Generator().manual_seed(6)) * 0.3).to(device).requires_grad_()

    def step(h, w, t):
        logp, ent = fused_token_logprobs(torch.tanh(h), w, t, return_entropy=True, chunk_size=5)
        return (logp * 0.7 - 0.1 * ent).sum()

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for seed, n in ((7, 13), (8, 21)):
        gen = torch.Generator().manual_seed(seed)
        hidden = torch.randn(2, n, 24, generator=gen).to(device).requires_grad_()
        targets = torch.randint(0, 301, (2, n), generator=gen)
        targets[:, seed % 5] = -100
        targets = targets.to(device)
        got = torch.autograd.grad(compiled(hidden, weight, targets), [hidden, weight])
        ref_in = [torch.tanh(hidden.detach().double()).requires_grad_(), weight.detach().double().requires_grad_()]
        logp, ent = reference_logprobs(*ref_in, targets)
        valid = targets != -100
        ref = torch.autograd.grad(((logp * 0.7 - 0.1 * ent) * valid).sum(), ref_in)
        ref_h = ref[0] * (1 - torch.tanh(hidden.detach().double()) ** 2)
        assert rel_err(got[0], ref_h) < 1e-5 and rel_err(got[1], ref[1]) < 1e-5
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_mode_a_scalars_changed_between_compiled_calls_recompile():
    """temperature, ignore_index, return_entropy and softcap are constants of a compiled graph: a
    second call with another value compiles again (never the first call's value), forward and
    backward, against float64."""
    hidden, weight, bias, targets = _leaves(torch.float32, seed=12)

    def step(h, w, b, t, temperature, ignore_index, entropy, softcap):
        logp, ent = fused_token_logprobs(h, w, t, bias=b, temperature=temperature, ignore_index=ignore_index,
                                         return_entropy=entropy, chunk_size=4, softcap=softcap)
        return logp if ent is None else logp - 0.3 * ent

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for temperature, ignore_index, entropy, softcap in (
        (1.0, -100, True, None), (0.5, -100, True, None), (0.5, 7, True, None), (2.0, 7, False, None),
        (2.0, 7, False, 1.5), (2.0, 7, True, 3.0),
    ):
        t = torch.where(targets == -100, ignore_index, targets)
        out = compiled(hidden, weight, bias, t, temperature, ignore_index, entropy, softcap)
        got = torch.autograd.grad(out.sum(), [hidden, weight, bias])
        ref_in = [x.detach().double().requires_grad_() for x in (hidden, weight, bias)]
        logp, ent = reference_logprobs(ref_in[0], ref_in[1], t, ref_in[2], temperature, ignore_index=ignore_index,
                                       softcap=softcap)
        want_out = logp - 0.3 * ent if entropy else logp
        assert rel_err(out, want_out) < 1e-5
        for g, w in zip(got, torch.autograd.grad(want_out.sum(), ref_in)):
            assert rel_err(g, w) < 1e-5


def test_mode_a_argument_errors_under_fullgraph_compile():
    """Under fullgraph=True Dynamo reports an exception raised while it traces the wrapper's
    argument checks as its own error (torch._dynamo.exc.Unsupported), the op's message inside;
    without fullgraph the step falls back to eager and raises it as is. Target ids, checked in the
    op, raise ValueError either way. A numpy scalar temperature, which Dynamo traces as an array,
    is refused there with a hint."""
    np = pytest.importorskip("numpy")
    hidden, weight, _, targets = _leaves(torch.float32, seed=13)
    for temperature, error, message in ((0.0, ValueError, "temperature must be a finite number > 0"),
                                        (np.float32(0.7), TypeError, r"pass float\(temperature\)")):
        def step(h, w):
            return fused_token_logprobs(h, w, targets, temperature=temperature)[0]

        torch._dynamo.reset()
        with pytest.raises(torch._dynamo.exc.Unsupported, match=message):
            torch.compile(step, backend="aot_eager", fullgraph=True)(hidden, weight)
        if error is ValueError:
            torch._dynamo.reset()
            with pytest.raises(error, match=message):
                torch.compile(step, backend="aot_eager")(hidden, weight)
    bad = targets.clone()
    bad[0] = weight.shape[0]
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="outside"):
        torch.compile(lambda h, w: fused_token_logprobs(h, w, bad)[0], backend="aot_eager", fullgraph=True)(hidden, weight)


@pytest.mark.parametrize("entropy, with_bias, want, ignored", [
    (True, True, [True, True, True], True), (False, True, [True, False, False], True),
    (False, False, [False, True, False], False), (True, False, [True, True, False], False),
])
def test_mode_a_custom_ops_pass_torch_opcheck(entropy, with_bias, want, ignored):
    """torch.library.opcheck: schemas, fake (meta) functions against the real ones, the autograd
    registration and AOT dispatch with dynamic shapes, for the forward and the backward op,
    with and without entropy, top-1 flags and logit sums, bias and ignored positions, and some
    gradients not wanted."""
    _skip_unavailable("cpu")
    hidden, weight, bias, targets = _leaves(torch.float32, seed=10)
    if not ignored:
        targets = targets.clamp(min=0)
    b = bias if with_bias else None
    # with the top-1 flags where there is entropy, the logit sums where there is a bias (the last
    # two arguments), without them elsewhere
    args = (hidden, weight, b, targets, 0.8, -100, entropy, "cpu", 4, "tokens", torch.float32, torch.float32, None,
            entropy, with_bias)
    torch.library.opcheck(ops._token_logprobs, args)
    _, _, stats, scored, cut, top1, sums = ops._token_logprobs(*args)
    assert top1.shape == (targets.shape if entropy else (0,))
    assert sums.shape == ((2, *targets.shape) if with_bias else (0,))
    assert cut.tolist() == [4, 0, 11 if ignored else 13] and scored.shape == (13,)
    g = torch.randn(targets.shape, generator=torch.Generator().manual_seed(11))
    detached = [None if x is None else x.detach() for x in (hidden, weight, b)]
    torch.library.opcheck(ops._token_logprobs_backward, (
        g, g * 0.5 if entropy else None, *detached, targets, stats.detach(), scored, cut, 0.8, "cpu", torch.float32,
        torch.float32, want,
    ))


def test_mode_a_exports_as_one_node():
    """torch.export keeps mode A as its custom op, one node, and the exported program computes the
    op's values and gradients (float64 reference)."""
    hidden, weight, _, targets = _leaves(torch.float32, seed=15)

    class Scorer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(weight.detach().clone())

        def forward(self, h, t):
            logp, ent = fused_token_logprobs(torch.tanh(h), self.weight, t, return_entropy=True, temperature=0.9)
            return (logp - 0.1 * ent).sum()

    program = torch.export.export(Scorer(), (hidden.detach(), targets))
    ops_in_graph = [n.target for n in program.graph.nodes if "hpt_fast" in str(n.target)]
    assert ops_in_graph == [torch.ops.hpt_fast.token_logprobs.default]
    module = program.module()
    h = hidden.detach().clone().requires_grad_()
    out = module(h, targets)
    got = torch.autograd.grad(out, [h, module.weight])
    ref_in = [hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()]
    logp, ent = reference_logprobs(torch.tanh(ref_in[0]), ref_in[1], targets, None, 0.9)
    want_out = ((logp - 0.1 * ent) * (targets != -100)).sum()
    want = torch.autograd.grad(want_out, ref_in)
    assert rel_err(out, want_out) < 1e-6
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


def test_mode_a_backward_reads_nothing_from_the_device(monkeypatch):
    """The target ids are read (a device sync on a GPU) once, in the forward: the backward takes
    the scored rows and their count from it, with ignored positions and without."""
    calls = []
    real = op_inputs.valid_rows
    monkeypatch.setattr(op_inputs, "valid_rows", lambda *a: calls.append(1) or real(*a))
    for ignored in (True, False):
        hidden, weight, bias, targets = _leaves(torch.float32, seed=14)
        if not ignored:
            targets = targets.clamp(min=0)
        logp, ent = fused_token_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, chunk_size=4)
        assert len(calls) == 1
        got = torch.autograd.grad((logp - 0.2 * ent).sum(), [hidden, weight, bias])
        assert len(calls) == 1
        calls.clear()
        ref_in = [x.detach().double().requires_grad_() for x in (hidden, weight, bias)]
        ref_logp, ref_ent = reference_logprobs(ref_in[0], ref_in[1], targets, ref_in[2])
        valid = targets != -100
        want = torch.autograd.grad(((ref_logp - 0.2 * ref_ent) * valid).sum(), ref_in)
        for g, w in zip(got, want):
            assert rel_err(g, w) < 1e-5


@pytest.mark.parametrize("dtype, backend", [(torch.bfloat16, "cpu"), (torch.float64, "torch")], ids=str)
def test_mode_a_custom_ops_pass_torch_opcheck_in_other_dtypes(dtype, backend):
    """The fake functions give the real outputs' dtypes where they are not the inputs': float32
    logp, entropy and statistics for bf16 inputs, float64 ones for float64 inputs; and each
    gradient in its input's dtype, with and without bias; here with a soft cap."""
    _skip_unavailable(backend)
    hidden, weight, bias, targets = (x.detach().to(dtype) if x.is_floating_point() else x
                                     for x in _leaves(torch.float32, seed=15))
    args = (hidden, weight, bias, targets, 0.8, -100, True, backend, 4, "tokens", None, dtype, 1.5)
    torch.library.opcheck(ops._token_logprobs, args)
    logp, ent, stats, scored, cut, _, _ = ops._token_logprobs(*args)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    assert logp.dtype == ent.dtype == stats.dtype == stat
    g = torch.randn(targets.shape, generator=torch.Generator().manual_seed(16), dtype=stat)
    for b, want in ((bias, [True, True, True]), (None, [True, False, False])):
        torch.library.opcheck(ops._token_logprobs_backward, (
            g, g * 0.5, hidden, weight, b, targets, stats, scored, cut, 0.8, backend, None, dtype, want, 1.5,
        ))


@pytest.mark.parametrize("ignored", [True, False], ids=["some-ignored", "all-scored"])
def test_mode_a_forward_hands_the_backward_its_scored_rows(ignored):
    """What the forward op keeps for the backward, of the Nv scored positions: their log-sum-exp's
    two parts (m, log s) and entropy in the first Nv columns of stats, their flat indices in the first Nv entries of
    scored (also when none is ignored; zeros after them), (chunk, vocabulary order, Nv) in cut;
    against float64."""
    hidden, weight, bias, targets = (x.detach() for x in _leaves(torch.float32, seed=17))
    if not ignored:
        targets = targets.clamp(min=0)
    hidden, targets = hidden[:12].reshape(3, 4, -1), targets[:12].reshape(3, 4)
    args = (hidden, weight, bias, targets, 0.8, -100, True, "cpu", 4, "vocab", torch.float32, torch.float32)
    _, ent, stats, scored, cut, *_ = ops._token_logprobs(*args)
    rows = (targets.reshape(-1) != -100).nonzero().squeeze(1)
    n_scored = rows.numel()
    assert cut.tolist() == [4, 1, n_scored] and stats.shape == (3, 12) and scored.shape == (12,)
    assert torch.equal(scored[:n_scored], rows)
    # the rest is zeros, not whatever memory held: the outputs are deterministic (opcheck and
    # AOT's comparisons of a compiled call with eager rely on it)
    assert not stats[:, n_scored:].any() and not scored[n_scored:].any()
    logits = (hidden.reshape(12, -1).double() @ weight.double().t() + bias.double()) / 0.8
    assert rel_err(stats[0, :n_scored], logits.max(-1).values[rows]) < 1e-6
    assert rel_err(stats[0, :n_scored].double() + stats[1, :n_scored], torch.logsumexp(logits, -1)[rows]) < 1e-6
    assert torch.equal(stats[2, :n_scored], ent.reshape(-1)[rows])
    _, ref_ent = reference_logprobs(hidden, weight, targets, bias, 0.8)
    assert rel_err(ent, ref_ent) < 1e-5


def test_mode_a_runs_on_the_backend_asked_for(monkeypatch):
    """backend="cpu": both of mode A's custom ops run the C++ row kernels, never the torch
    backend's; and without return_entropy the statistics pass keeps no entropy sums."""
    from hpt_fast.backends import torch_backend

    cpu_backend = _cpu_backend()
    calls = []

    def spy(module, name):
        real, tag = getattr(module, name), (module.__name__.rsplit(".", 1)[-1], name)

        def call(*args, **kwargs):
            calls.append((*tag, args[3] if name == "row_stats" else None))  # row_stats' with_entropy
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, call)

    for module in (torch_backend, cpu_backend):
        spy(module, "row_stats")
        spy(module, "grad_logits")
    hidden, weight, bias, targets = _leaves(torch.float32, seed=18)
    for entropy in (True, False):
        calls.clear()
        logp, ent = fused_token_logprobs(hidden, weight, targets, bias=bias, return_entropy=entropy, backend="cpu",
                                         chunk_size=4, grad_order="tokens")
        got = torch.autograd.grad(logp.sum() if ent is None else (logp + ent).sum(), [hidden, weight, bias])
        # 11 scored rows in chunks of 4: three blocks per pass
        assert calls == [("cpu_backend", "row_stats", entropy)] * 3 + [("cpu_backend", "grad_logits", None)] * 3
        ref_in = [x.detach().double().requires_grad_() for x in (hidden, weight, bias)]
        ref_logp, ref_ent = reference_logprobs(ref_in[0], ref_in[1], targets, ref_in[2])
        want = torch.autograd.grad((ref_logp + ref_ent).sum() if entropy else ref_logp.sum(), ref_in)
        for g, w in zip(got, want):
            assert rel_err(g, w) < 1e-5


def test_mode_b_inside_torch_compile_is_one_opaque_call():
    """Mode B takes a Python function, which no custom op can: a compiled step runs it as one
    opaque call (one graph break around it), where tracing into its argument checks and C++ /
    Triton calls broke the graph many times; the compiled step gets the eager gradients."""
    hidden, weight, bias, targets = _leaves(torch.float32, seed=3)

    def step(h, w, b):
        loss, _, _ = fused_linear_loss(torch.tanh(h) * 2, w, targets, lambda lp, e, r: -lp - 0.1 * e, bias=b,
                                       with_entropy=True)
        return loss * 0.5

    want = torch.autograd.grad(step(hidden, weight, bias), [hidden, weight, bias])
    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(hidden, weight, bias)
    assert explained.graph_break_count == 1, [str(r.reason)[:80] for r in explained.break_reasons]
    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(step, backend="aot_eager")(hidden, weight, bias), [hidden, weight, bias])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_a_compiled_step_does_not_trace_into_the_backward():
    """A compiled step that calls backward itself: the autograd engine runs the op's backward
    while Dynamo is active, and traced into it broke the graph on every C++ call."""
    hidden, weight, bias, targets = _leaves(torch.float32, seed=4)

    def step(h, w):
        loss, _, _ = fused_linear_loss(torch.tanh(h), w, targets, lambda lp, e, r: -lp.exp() - 0.1 * e,
                                       with_entropy=True)
        logp, _ = fused_token_logprobs(torch.tanh(h), w, targets)
        (loss - logp.sum()).backward()

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(hidden, weight)
    inside = [str(r.reason)[:80] for r in explained.break_reasons
              if any("hpt_fast" in frame.filename for frame in r.user_stack)]
    assert explained.graph_break_count >= 1 and not inside


def test_inside_non_reentrant_checkpoint_the_region_runs_once_per_pass():
    """Under torch.utils.checkpoint(use_reentrant=False) every tensor saved in the region gets the
    checkpoint's hooks; mode B's per-chunk graph of token_loss_fn took them too, so unpacking it
    reran the whole region once per chunk, in the forward."""
    hidden, weight, bias, targets = _leaves(torch.float32, seed=5)
    adv = torch.randn(hidden.shape[0])
    runs = []

    def region(h, w):
        runs.append(1)
        fn = lambda lp, e, r: -torch.exp(lp - lp.detach()) * adv[r] - 0.1 * e  # noqa: E731
        return fused_linear_loss(torch.tanh(h), w, targets, fn, with_entropy=True, chunk_size=4)[0]

    want = torch.autograd.grad(region(hidden, weight), [hidden, weight])
    runs.clear()
    loss = torch.utils.checkpoint.checkpoint(region, hidden, weight, use_reentrant=False)
    assert len(runs) == 1
    got = torch.autograd.grad(loss, [hidden, weight])
    assert len(runs) == 2  # the backward's one recomputation
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def _cpu_backend():
    if "cpu" not in backends.available():
        pytest.skip("the cpu backend is not built")
    return backends.load("cpu")


@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (13, 7, 33), (220, 64, 1000)])
def test_the_cpu_backends_float32_gemm_is_onednns_where_it_works(m, k, n):
    """float32 products on CPU come from oneDNN (ATen's mkldnn_matmul, found when the module
    loads and tried on small products first): contiguous or transposed operands, into a fresh or
    an accumulating out, against float64; anything it does not take is left to torch.mm."""
    cpu = _cpu_backend()
    from hpt_fast import _C

    assert cpu.onednn_float32() == _C.has_onednn_matmul()  # the trial passes wherever it exists
    if not cpu.onednn_float32():
        pytest.skip("this torch build has no oneDNN matmul")
    gen = torch.Generator().manual_seed(m + n)
    a, b = torch.randn(k, m, generator=gen).t(), torch.randn(n, k, generator=gen).t()  # both transposed
    start = torch.randn(m, n, generator=gen)
    for add in (False, True):
        out = start.clone()
        assert cpu.gemm_into(out, a, b, add)
        want = (start.double() if add else 0) + a.double() @ b.double()
        assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-5), add
    assert not cpu.gemm_into(start.bfloat16(), a.bfloat16(), b.bfloat16(), False)  # oneDNN's via torch.mm anyway
    assert not cpu.gemm_into(torch.ones(m, n), a[:, :0], b[:0], False)  # K = 0: torch.mm's zeros
    x = torch.ones(2, 2)
    assert not cpu.gemm_into(torch.empty(4, 2).t()[:, :2], x, x, False)  # a strided out


@pytest.mark.parametrize("fault", ["raise", "wrong"])
def test_a_onednn_gemm_that_fails_its_trial_is_not_used(fault, monkeypatch):
    """A torch whose mkldnn_matmul raises on float32 or sums wrongly: the op multiplies with
    torch.mm, and its values stay right."""
    cpu = _cpu_backend()

    def broken(a, b, out, add):
        if fault == "raise":
            raise RuntimeError("mkldnn_matmul: only enabled for bf16 and fp16 path")
        torch.mm(a, b, out=out).mul_(1.5)

    monkeypatch.setattr(cpu._C, "onednn_matmul", broken)
    cpu.onednn_float32.cache_clear()
    try:
        assert not cpu.onednn_float32()
        hidden, weight, bias, targets = _leaves(torch.float32)
        logp, _ = fused_token_logprobs(hidden, weight, targets, backend="cpu", chunk_size=4)
        want, _ = reference_logprobs(hidden, weight, targets)
        assert rel_err(logp, want) < 1e-5
    finally:
        cpu.onednn_float32.cache_clear()


@pytest.mark.parametrize("flaw", [None, "adds when told to write", "ignores add", "drops a transposed b", "raises"])
def test_a_gemm_trial_passes_only_a_gemm_that_is_right(flaw):
    """gemm_is_right, behind both GEMM trials (oneDNN float32, float32-output products): a right
    GEMM passes; one that accumulates into a fresh out, overwrites an accumulating one, or gets a
    transposed b wrong (tried only with transpose_b) fails; a listed error is a failure, not a crash."""
    from hpt_fast.backends.gemm_trial import gemm_is_right

    def gemm(a, b, out, add):
        if flaw == "raises":
            raise RuntimeError("no kernel for this dtype")
        product = a.float() @ b.float()  # float32 products, as the GEMMs tried give
        if flaw == "drops a transposed b" and not b.is_contiguous():
            product.zero_()
        if (add and flaw != "ignores add") or flaw == "adds when told to write":
            out += product
        else:
            out.copy_(product)

    assert gemm_is_right(gemm, transpose_b=True) == (flaw is None)
    assert gemm_is_right(gemm, torch.bfloat16) == (flaw in (None, "drops a transposed b"))


def test_torch_func_transforms_are_refused_by_torch_with_a_clear_error():
    """The README says torch.func cannot take the op: torch raises, never a wrong gradient."""
    hidden, weight, _, targets = _leaves(torch.float32, seed=9)
    h = hidden.detach()
    for call in (lambda x: fused_token_logprobs(x, weight.detach(), targets, backend="torch")[0].sum(),
                 lambda x: fused_linear_loss(x, weight.detach(), targets, lambda lp, e, r: -lp, backend="torch")[0]):
        with pytest.raises(RuntimeError, match="setup_context"):
            torch.func.grad(call)(h)
