import os
os.environ["TRITON_INTERPRET"] = "1"
import sys, pathlib, itertools
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import kernels
sys.modules["hpt_fast.kernels"] = kernels
import pytest
import torch
from hpt_fast.backends import torch_backend as ref
from hpt_fast.backends import triton_backend as tb

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-5, atol=1e-5),
       torch.float16: dict(rtol=1e-5, atol=1e-5)}


def make(C, V, dtype, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(C, V, generator=g) * scale).to(dtype)
    t = torch.randint(0, V, (C,), generator=g)
    return x, t


def bf16_trunc(x32):
    # the interpreter converts fp32 -> bf16 by truncation (GPU: round to nearest even)
    return (x32.view(torch.int32) & -65536).view(torch.float32).bfloat16()


def check_lowp(got, want32):
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want32, rtol=1e-5, atol=1e-6)
        return
    torch.testing.assert_close(got.float(), want32, rtol=1e-2, atol=1e-6)
    exp = bf16_trunc(want32) if got.dtype == torch.bfloat16 else want32.to(got.dtype)
    frac = (got != exp).float().mean().item()
    assert frac <= 0.02, frac


def check_stats(got, want, tol):
    for a, b in zip(got, want):
        if b is None:
            assert a is None
            continue
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1, 7, 1001, 2999])
@pytest.mark.parametrize("C", [1, 5, 33])
@pytest.mark.parametrize("temp", [0.7, 1.3])
@pytest.mark.parametrize("scale", [3.0, 1e4])
def test_row_stats(dtype, V, C, temp, scale):
    x, t = make(C, V, dtype, scale)
    inv = 1.0 / temp
    for we in (False, True):
        got = tb.row_stats(x, t, inv, we)
        want = ref.row_stats(x, t, inv, we)
        assert (got[0] <= 0).all()
        if we:
            assert (got[2] >= 0).all()
        # entropy of 1e4-scale rows is ~0 with large cancellation: absolute check
        check_stats(got, want, dict(rtol=1e-5, atol=1e-4 if scale > 100 else 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V,block,split", [(2999, 128, 256), (2999, 128, 128), (1001, 256, 768), (7, 128, 128), (3000, 512, 1024)])
@pytest.mark.parametrize("scale", [3.0, 1e4])
def test_row_stats_split(dtype, V, block, split, scale):
    x, t = make(5, V, dtype, scale, seed=1)
    got = tb._row_stats(x, t, 0.7, True, block, split)
    want = ref.row_stats(x, t, 0.7, True)
    assert (got[0] <= 0).all()
    check_stats(got, want, dict(rtol=1e-5, atol=1e-4 if scale > 100 else 1e-5))
    got = tb._row_stats(x, t, 0.7, False, block, split)
    check_stats(got, ref.row_stats(x, t, 0.7, False), dict(rtol=1e-5, atol=1e-4 if scale > 100 else 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1, 7, 1001, 2999])
@pytest.mark.parametrize("C", [1, 5, 33])
@pytest.mark.parametrize("temp", [0.7, 1.3])
@pytest.mark.parametrize("with_ent", [False, True])
@pytest.mark.parametrize("scale", [3.0, 1e4])
def test_grad(dtype, V, C, temp, with_ent, scale):
    x, t = make(C, V, dtype, scale, seed=2)
    inv = 1.0 / temp
    _, lse, ent = ref.row_stats(x, t, inv, True)
    g = torch.Generator().manual_seed(3)
    g_logp = torch.randn(C, generator=g)
    g_ent = torch.randn(C, generator=g) if with_ent else None
    e_arg = ent if with_ent else None
    want = ref.grad_logits(x, t, lse, e_arg, g_logp, g_ent, inv, torch.empty(C, V, dtype=torch.float32))
    # separate fp32 out
    out = torch.empty(C, V, dtype=torch.float32)
    got = tb.grad_logits(x, t, lse, e_arg, g_logp, g_ent, inv, out)
    assert got is out
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # in place, same dtype as logits
    want_ip = ref.grad_logits(x, t, lse, e_arg, g_logp, g_ent, inv, x.clone())
    xi = x.clone()
    got = tb.grad_logits(xi, t, lse, e_arg, g_logp, g_ent, inv, xi)
    assert got is xi
    check_lowp(xi, want)
    # fp32 logits -> bf16 out
    if dtype == torch.float32:
        ob = torch.empty(C, V, dtype=torch.bfloat16)
        tb.grad_logits(x, t, lse, e_arg, g_logp, g_ent, inv, ob)
        wb = ref.grad_logits(x, t, lse, e_arg, g_logp, g_ent, inv, torch.empty(C, V, dtype=torch.bfloat16))
        check_lowp(ob, want)


def test_row_stride_and_empty():
    big, t = make(6, 300, torch.float32, 3.0)
    x = big[:, :250]
    got = tb.row_stats(x, t, 1.0, True)
    check_stats(got, ref.row_stats(x.contiguous(), t, 1.0, True), dict(rtol=1e-5, atol=1e-5))
    e = torch.empty(0, 10)
    lp, ls, en = tb.row_stats(e, torch.empty(0, dtype=torch.long), 1.0, True)
    assert lp.shape == (0,)


def test_accumulate():
    acc = torch.randn(7, 9)
    x = torch.randn(7, 9).bfloat16()
    want = acc + x.float()
    tb.accumulate_(acc, x)
    torch.testing.assert_close(acc, want)
