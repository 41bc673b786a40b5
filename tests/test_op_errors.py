"""Bad input to the fused op gives a clear error naming the problem, before any work starts."""
import math
import warnings

import numpy as np
import pytest
import torch

from hpt_fast import fused_linear_loss, fused_token_logprobs, op_inputs


def _ok():
    return torch.randn(2, 5, 8), torch.randn(11, 8), torch.randint(0, 11, (2, 5))


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda h, w, t: (h, torch.randn(11, 7), t), ValueError, "hidden size mismatch"),
        (lambda h, w, t: (h, w.to_sparse(), t), TypeError, r"weight must be a dense \(strided\) tensor, got layout torch.sparse_coo"),
        (lambda h, w, t: (h.to("meta"), w.to("meta"), t.to("meta")), ValueError, "hidden is on the meta device"),
        (lambda h, w, t: (h, w.to(torch.bfloat16), t), TypeError, "weight dtype"),
        (lambda h, w, t: (h.long(), w, t), TypeError, "hidden must be"),
        (lambda h, w, t: (h, w, t.float()), TypeError, "targets must be int64"),
        (lambda h, w, t: (h, w, t[:, :4]), ValueError, "targets shape"),
        (lambda h, w, t: (h, w[None], t), ValueError, "weight must have shape"),
        (lambda h, w, t: (h, w, t.masked_fill(t == t[0, 0], 11)), ValueError, "target id 11"),
        (lambda h, w, t: (h, w, t.index_fill(1, torch.tensor([3]), -5)), ValueError, "target id -5"),
        (lambda h, w, t: (h.numpy(), w, t), TypeError, "hidden must be a torch.Tensor"),
    ],
)
def test_bad_tensors(change, error, match):
    h, w, t = change(*_ok())
    with pytest.raises(error, match=match):
        fused_token_logprobs(h, w, t)
    with pytest.raises(error, match=match):
        fused_linear_loss(h, w, t, lambda lp, e, r: -lp)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
        ({"temperature": -1.0}, ValueError, "temperature"),
        ({"temperature": math.nan}, ValueError, "temperature"),
        ({"temperature": "1"}, TypeError, "temperature must be a number"),
        # 1 / T overflows float32: the kernels' scale would make every logit inf / NaN
        ({"temperature": 1e-39}, ValueError, r"temperature must be at least 1 / 3.403e\+38"),
        ({"ignore_index": 2**63}, ValueError, "ignore_index must fit in int64, got 9223372036854775808"),
        ({"bias": torch.randn(10)}, ValueError, "bias must have shape"),
        ({"bias": torch.randn(11, dtype=torch.float64)}, TypeError, "bias dtype"),
        ({"backend": "cuda"}, ValueError, "backend must be one of"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
        ({"grad_order": "slabs"}, ValueError, "grad_order must be one of"),
        ({"accum_dtype": torch.bfloat16}, ValueError, "accum_dtype must be torch.float32, None or"),
        ({"accum_dtype": "float32"}, ValueError, "accum_dtype must be"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
        ({"softcap": 0.0}, ValueError, "softcap must be a finite number > 0"),
        ({"softcap": -30.0}, ValueError, "softcap must be a finite number > 0"),
        ({"softcap": math.inf}, ValueError, "softcap must be"),
        ({"softcap": math.nan}, ValueError, "softcap must be"),
        ({"softcap": True}, TypeError, "softcap must be a number or None, got bool"),
        ({"softcap": "30"}, TypeError, "softcap must be a number or None, got str"),
        # softcap / T is the kernels' float32 scale of tanh
        ({"softcap": 1e30, "temperature": 1e-10}, ValueError, "softcap / temperature a finite float32"),
    ],
)
def test_bad_options(kwargs, error, match):
    h, w, t = _ok()
    with pytest.raises(error, match=match):
        fused_token_logprobs(h, w, t, **kwargs)


def test_a_bad_backend_name_is_refused_before_the_target_ids_are_read(monkeypatch):
    """The backend name is one of the argument checks made before any work: a bad one is refused
    without reading the target ids (a device sync on a GPU), in both modes."""
    calls = []
    real = op_inputs.valid_rows
    monkeypatch.setattr(op_inputs, "valid_rows", lambda *a: calls.append(1) or real(*a))
    h, w, t = _ok()
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'torch', 'cpu', 'triton'; got 'cuda'"):
        fused_token_logprobs(h, w, t, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_linear_loss(h, w, t, lambda lp, e, r: -lp, backend="cuda")
    assert calls == []


def test_an_ignore_index_outside_int32_never_matches_int32_targets():
    """Compared in int32, 2**32 + 3 wraps to 3: the positions of id 3 were dropped without a word."""
    h, w, t = _ok()
    t = t.clone()
    t[0] = 3
    want, _ = fused_token_logprobs(h, w, t, ignore_index=2**32 + 3)
    got, _ = fused_token_logprobs(h, w, t.int(), ignore_index=2**32 + 3)
    assert (want != 0).all() and torch.equal(got, want)


def test_numpy_scalars_are_numbers():
    """temperature, ignore_index and chunk_size take numpy scalars (from configs, arrays) as their
    Python equivalents; a tensor temperature, whose reading would wait for its device, does not."""
    h, w, t = _ok()
    t = t.clone()
    t[1] = -1
    want, _ = fused_token_logprobs(h, w, t, temperature=0.5, ignore_index=-1, chunk_size=2)
    got, _ = fused_token_logprobs(h, w, t, temperature=np.float32(0.5), ignore_index=np.int64(-1),
                                  chunk_size=np.int32(2))
    assert torch.equal(got, want)
    with pytest.raises(TypeError, match="temperature must be a number, got Tensor"):
        fused_token_logprobs(h, w, t, temperature=torch.tensor(0.5))
    with pytest.raises(ValueError, match="chunk_size must be a positive int or None, got np.int64.0."):
        fused_token_logprobs(h, w, t, chunk_size=np.int64(0))
    with pytest.raises(TypeError, match="ignore_index must be an int, got bool"):
        fused_token_logprobs(h, w, t, ignore_index=True)
    with pytest.raises(TypeError, match="ignore_index must be an int, got Tensor"):
        fused_token_logprobs(h, w, t, ignore_index=torch.tensor(-1))
    with pytest.raises(ValueError, match="chunk_size must be a positive int or None, got tensor"):
        fused_token_logprobs(h, w, t, chunk_size=torch.tensor(2))


def test_a_token_loss_fn_type_error_keeps_its_own_message():
    """Only a TypeError about the None entropy gets the with_entropy hint; any other passes as is."""
    h, w, t = _ok()

    def fn(lp, e, r):
        raise TypeError("unrelated")

    with pytest.raises(TypeError, match="^unrelated$"):
        fused_linear_loss(h.requires_grad_(), w, t, fn)


def test_float64_only_on_the_torch_backend():
    h, w, t = (x.double() if x.is_floating_point() else x for x in _ok())
    with pytest.raises(TypeError, match="float64 runs on 'torch'"):
        fused_token_logprobs(h, w, t, backend="cpu")


@pytest.mark.parametrize("order", ["tokens", "vocab"])
def test_no_scored_token_calls_no_token_loss_fn(order):
    """With every position ignored, token_loss_fn is never called (a reducing loss would fail on
    zero tokens), in either order: the loss is 0 and the gradients are zeros."""
    h, w, t = _ok()
    h.requires_grad_()
    calls = []
    loss, logp, _ = fused_linear_loss(h, w, torch.full_like(t, -100), lambda lp, e, r: calls.append(1) or -lp,
                                      grad_order=order)
    assert calls == [] and float(loss.detach()) == 0.0 and not logp.any()
    loss.backward()
    assert not h.grad.any()


def test_ignore_index_is_not_out_of_range():
    h, w, t = _ok()
    t[0, 0] = -1
    logp, _ = fused_token_logprobs(h, w, t, ignore_index=-1)
    assert logp[0, 0] == 0


@pytest.mark.parametrize(
    "fn, error, match",
    [
        (lambda lp, e, r: -lp[:-1], ValueError, "per-token losses of shape"),
        (lambda lp, e, r: -lp.sum(), ValueError, "per-token losses of shape"),
        (lambda lp, e, r: (lp * 0).long(), TypeError, "float tensor"),
        (lambda lp, e, r: lp.tolist(), TypeError, "must return a Tensor"),
        (lambda lp, e, r: -lp * torch.nan, FloatingPointError, "non-finite"),
        (lambda lp, e, r: torch.sqrt(lp - lp), FloatingPointError, "non-finite"),  # finite loss, inf gradient
        # an entropy term without with_entropy=True: the user's own TypeError, with the reason
        (lambda lp, e, r: -lp - 0.001 * e, TypeError, "entropy argument is None: pass with_entropy=True"),
        (lambda lp, e, r: -lp - 0.001 * e.mean(), AttributeError, "entropy argument is None: pass with_entropy"),
        # autograd's own in-place check, kept under the op's saved-tensor hooks
        (lambda lp, e, r: (lambda y: (y.clone(), y.add_(1))[0])(lp.exp()), RuntimeError, "modified in place a tensor that its loss's gradient"),
    ],
)
def test_bad_token_loss_fn(fn, error, match):
    h, w, t = _ok()
    with pytest.raises(error, match=match):
        fused_linear_loss(h.requires_grad_(), w, t, fn)


@pytest.mark.parametrize("order", ["tokens", "vocab"])
@pytest.mark.parametrize("detach", [
    lambda lp: lp.detach(),
    lambda lp: torch.tensor(lp.tolist()),
    # a graph, but through another tensor only: still constant in logp
    lambda lp: lp.detach() * torch.ones((), requires_grad=True),
], ids=["detached", "rebuilt", "other-graph"])
def test_a_loss_without_a_graph_warns(order, detach):
    """A loss detached from logp (or rebuilt from its values) is a constant: the op still returns
    its value, with zero gradients, and says so; a loss through logp says nothing."""
    h, w, t = _ok()
    h.requires_grad_()
    with pytest.warns(UserWarning, match="no autograd graph back to its logp / entropy"):
        loss, _, _ = fused_linear_loss(h, w, t, lambda lp, e, r: -detach(lp), grad_order=order)
    want, _, _ = fused_linear_loss(h.detach(), w, t, lambda lp, e, r: -lp)
    assert torch.allclose(loss.detach(), want)
    loss.backward()
    assert not h.grad.any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_linear_loss(h, w, t, lambda lp, e, r: -lp, grad_order=order)[0].backward()
    assert h.grad.any()


@pytest.mark.parametrize("order", ["tokens", "vocab"])
def test_non_finite_loss_names_its_rows(order):
    """The finiteness check runs once per call, after the chunks, and names exactly the bad rows
    (flat indices into targets, ignored positions skipped); token_loss_fn sees chunks in token
    order and all the tokens at once in vocabulary order."""
    h, w, t = _ok()
    t[0, 1] = -100
    calls = []

    def fn(lp, e, r):
        calls.append(r.numel())
        return -lp / ((r != 6) & (r != 8)).float()  # inf at flat positions 6 and 8

    with pytest.raises(FloatingPointError, match=r"token rows \[6, 8\]$"):
        fused_linear_loss(h.requires_grad_(), w, t, fn, chunk_size=3, grad_order=order)
    assert calls == ([3, 3, 3] if order == "tokens" else [9])


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("order", ["tokens", "vocab"])
def test_non_finite_logits_are_named_as_the_cause(backend, order, softcap):
    """NaN in hidden makes one row's logp NaN, NaN in weight every row's: the error names those
    rows and the logits, not token_loss_fn, even where the loss is non-finite too. A soft cap
    keeps a NaN a NaN (tanh(NaN)), never a capped finite value."""
    if backend == "cpu":
        pytest.importorskip("hpt_fast._C")
    h, w, t = _ok()
    h[0, 2, 1] = float("nan")  # flat row 2
    w_nan = w.clone()
    w_nan[3, 0] = float("nan")  # one logit of every row, so every row's log-sum-exp
    with pytest.raises(FloatingPointError, match=r"logits are not finite .* token rows \[2\]$"):
        fused_linear_loss(h.requires_grad_(), w, t, lambda lp, e, r: -lp, with_entropy=True, chunk_size=3,
                          grad_order=order, backend=backend, softcap=softcap)
    with pytest.raises(FloatingPointError, match=r"logits are not finite .* token rows \[0, 1, 2, 3, 4, 5, 6, 7\]\.\.\.$"):
        fused_linear_loss(h.detach().nan_to_num().requires_grad_(), w_nan, t, lambda lp, e, r: -lp, chunk_size=3,
                          grad_order=order, backend=backend, softcap=softcap)


def test_token_loss_fn_not_callable():
    with pytest.raises(TypeError, match="token_loss_fn must be callable"):
        fused_linear_loss(*_ok(), None)


@pytest.mark.parametrize("value", ["0", "-64", "nan", "inf", "lots", ""])
def test_bad_memory_budget_is_named(value, monkeypatch):
    monkeypatch.setenv("HPT_FAST_MEMORY_BUDGET_MB", value)
    with pytest.raises(ValueError, match="HPT_FAST_MEMORY_BUDGET_MB must be a finite number of MiB > 0"):
        fused_token_logprobs(*_ok())
    with pytest.raises(ValueError, match="HPT_FAST_MEMORY_BUDGET_MB"):
        fused_linear_loss(*_ok(), lambda lp, e, r: -lp)
    monkeypatch.setenv("HPT_FAST_MEMORY_BUDGET_MB", "0.5")
    assert fused_token_logprobs(*_ok())[0].shape == (2, 5)


def test_a_dtensor_is_refused_by_name(one_rank_group):
    """FSDP2 / tensor-parallel parameters are DTensors: the op's first GEMM failed on them with
    "got mixed torch.Tensor and DTensor", after the checks had passed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    h, w, t = _ok()
    w = distribute_tensor(w, init_device_mesh("cpu", (1,)), [Shard(0)])
    match = r"weight is a DTensor, a tensor subclass .* hpt_fast\.fsdp2\.as_forward .* pass its full_tensor\(\)"
    with pytest.raises(TypeError, match=match):
        fused_token_logprobs(h, w, t)
    with pytest.raises(TypeError, match=match):
        fused_linear_loss(h, w, t, lambda lp, e, r: -lp)
    fused_token_logprobs(h, w.full_tensor(), t)
