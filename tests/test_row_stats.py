"""Every backend's ``row_stats`` on its own: a row's logits merged slab by slab, in any order and
any cut, give the statistics of the whole row (float64 reference), and one block gives the same."""
from __future__ import annotations

import pytest
import torch

from hpt_fast import backends
from hpt_fast.backends import row_state
from tests.reference import backend_device, rel_err

BACKENDS = ["torch", "cpu", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _load(name: str):
    try:
        return backends.load(name)
    except ImportError as exc:
        pytest.skip(str(exc))


def _reference(logits: torch.Tensor, targets: torch.Tensor, inv_temp: float):
    """logp, lse, entropy, mean z, log sum p^2 [C] in float64 of the logits as stored (already
    rounded to their dtype)."""
    z = logits.double() * inv_temp
    logprobs = torch.log_softmax(z, dim=1)
    logp = logprobs.gather(1, targets[:, None]).squeeze(1)
    return (logp, torch.logsumexp(z, dim=1), -(logprobs.exp() * logprobs).sum(1), z.mean(1),
            torch.logsumexp(2 * logprobs, dim=1))


def _cuts(vocab: int, gen: torch.Generator) -> list[tuple[int, int]]:
    """Random slabs covering [0, vocab), one of them a single column when vocab > 2, shuffled."""
    inner = torch.randperm(vocab - 1, generator=gen)[: min(4, vocab - 1)] + 1
    edges = sorted({0, vocab, *inner.tolist()})
    slabs = list(zip(edges[:-1], edges[1:]))
    order = torch.randperm(len(slabs), generator=gen).tolist()
    return [slabs[i] for i in order]


def _merge(module, logits, targets, inv_temp, with_entropy, slabs, with_sums=False):
    """(logp, lse, entropy or None) and with ``with_sums`` (mean z, log sum p^2), merged slab by slab."""
    state = row_state.empty(logits.shape[0], logits.device)
    for v0, v1 in slabs:
        # a column slice of the block, rows `vocab` elements apart, as the kernels must accept
        module.row_stats(logits[:, v0:v1], targets, inv_temp, with_entropy, state, col_offset=v0,
                         with_sums=with_sums)
    sums = row_state.logit_sums(state, logits.shape[1]) if with_sums else ()
    return (*_finished(state, with_entropy), *sums)


def _finished(state, with_entropy):
    """(logp, lse, entropy or None) from a complete state: ``row_state.finish``'s two parts of the
    log-sum-exp added up."""
    logp, norm, entropy = row_state.finish(state, with_entropy)
    return logp, (norm[:, 0].double() + norm[:, 1]).to(norm.dtype), entropy


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_slabs_merge_to_the_whole_row(backend, dtype):
    module = _load(backend)
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(7 + DTYPES.index(dtype))
    for rows, vocab, scale in ((1, 1, 1.0), (3, 2, 3.0), (9, 301, 5.0), (4, 2999, 30.0)):
        logits = (torch.randn(rows, vocab, generator=gen) * scale).to(device, dtype)
        targets = torch.randint(0, vocab, (rows,), generator=gen).to(device)
        inv_temp = 1 / 0.7
        want = _reference(logits, targets, inv_temp)
        whole = _merge(module, logits, targets, inv_temp, True, [(0, vocab)], with_sums=True)
        cut = _merge(module, logits, targets, inv_temp, True, _cuts(vocab, gen), with_sums=True)
        for got in (whole, cut):
            for name, a, b in zip(("logp", "lse", "entropy", "mean z", "log sum p^2"), got, want):
                assert a.dtype == torch.float32, name
                assert rel_err(a, b) <= 1e-5, (rows, vocab, name)
            assert (got[0] <= 0).all() and (got[2] >= 0).all()
        # both are float32 sums of the same terms grouped differently (tree sums over up to 4096
        # columns), so they may differ by a few times log2(4096) * 2**-24 = 7e-7
        for a, b in zip(whole, cut):
            assert rel_err(a, b) <= 3e-6
        _, _, no_entropy = _merge(module, logits, targets, inv_temp, False, _cuts(vocab, gen))
        assert no_entropy is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_in_slabs(backend):
    """|logits| up to 1e4, the maximum in a late slab: finite, logp <= 0, entropy >= 0."""
    module = _load(backend)
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 1000, generator=gen) * 3e3
    logits[:, 900] = 1e4
    logits[0, :] = -1e4
    targets = torch.tensor([0, 900, 5, 999, 450, 900])
    logits, targets = logits.to(backend_device(backend)), targets.to(backend_device(backend))
    logp, lse, entropy = _merge(module, logits, targets, 1.0, True, [(0, 300), (300, 600), (600, 1000)])
    assert torch.isfinite(logp).all() and torch.isfinite(lse).all() and torch.isfinite(entropy).all()
    assert (logp <= 0).all() and (entropy >= 0).all()
    want_logp, want_lse, want_ent, *_ = _reference(logits, targets, 1.0)
    assert torch.allclose(logp.double(), want_logp, rtol=1e-6, atol=2e-3)
    assert torch.allclose(lse.double(), want_lse, rtol=1e-6, atol=0)
    assert torch.allclose(entropy.double(), want_ent, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dominant_logit_gives_an_entropy_of_zero_not_below(backend: str, dtype: torch.dtype) -> None:
    """A dominant logit's entropy is never below 0, and exactly 0 where every other term underflows."""
    # also on a one-column row, whole or cut in slabs, with logp <= 0 throughout
    module = _load(backend)
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(11)
    # scaled by inv_temp, the others trail by 29 and 57 (terms tiny but finite in float32), 286
    # and 14286 (terms underflow to 0)
    gaps, inv_temp = torch.tensor([20.0, 40.0, 200.0, 1e4]), 1 / 0.7
    # the dominant column in the slab merged last: the state's sums are rescaled onto it
    for vocab, cut in ((1, [(0, 1)]), (301, [(0, 100), (200, 301), (100, 200)])):
        logits = torch.randn(len(gaps), vocab, generator=gen) * 0.01
        logits[:, vocab // 2] += gaps
        logits = logits.to(device, dtype)
        targets = torch.tensor([vocab // 2, vocab - 1, vocab // 2, 0], device=device)
        _, _, want, *_ = _reference(logits, targets, inv_temp)
        underflow = want.float() == 0
        assert bool(underflow.any()) and (vocab > 1) == bool((~underflow).any())
        for slabs in ([(0, vocab)], cut):
            logp, _, entropy = _merge(module, logits, targets, inv_temp, True, slabs)
            assert (entropy >= 0).all() and (logp <= 0).all(), (entropy, logp)
            assert (entropy[underflow] == 0).all() and not torch.signbit(entropy).any()
            # s = 1 + 1e-10 keeps its 1e-10 (the maximum's 1 is counted apart from the others'
            # terms), which is 1/29 of these entropies; a GPU's approximate exp is off by about
            # 3.4e-6 at exp(-57)
            rel = (entropy.double() - want).abs() / want
            assert (rel[~underflow] < 2e-5).all(), (entropy, want)


def _peaked_rows(vocab: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [8, vocab] in ``dtype`` and targets [8]: rows whose target leads the others by 8 to
    22 (1 - p of the target from about 2e-2 to 2e-8 at V 1000), rows whose largest value is tied
    by two or three columns (the target among them, or not), and a row whose runner-up is one
    float32 ulp below its largest."""
    logits = torch.randn(8, vocab, generator=gen)
    targets = torch.randint(0, vocab, (8,), generator=gen)
    top = logits.max(dim=1).values
    for row, gap in enumerate((8.0, 12.0, 16.0, 22.0)):
        logits[row, targets[row]] = top[row] + gap
    cols = torch.randperm(vocab, generator=gen)[:3]
    logits[4, cols[:2]] = top[4] + 15.0
    targets[4] = cols[0]
    logits[5, cols] = top[5] + 15.0
    targets[5] = cols[2] + 1 if int(cols[2]) + 1 < vocab else cols[2] - 1
    logits[6, cols[:2]] = top[6] + 15.0
    logits = logits.to(dtype)
    logits[7, targets[7]] = top[7] + 3.0
    logits[7, cols[0]] = torch.nextafter(logits[7, targets[7]], torch.tensor(-1.0).to(dtype))
    return logits, targets


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_near_deterministic_and_tied_rows_keep_their_small_sums(backend: str, dtype: torch.dtype) -> None:
    """Every row's logp, entropy, log sum p^2 and the log s of ``row_state.finish``'s log-sum-exp
    within 5e-6 of float64's, relative to each row's own value, whole and cut in slabs (Triton:
    also split over programs; at most 3.9e-7 on the CPU, and the bound leaves room for a GPU's
    approximate exp, whose error grows with |z - m|). Near p = 1 these are all of the order of 1 - p: before the row's
    largest exp(0) = 1 was counted apart from the others' terms, float32 resolved them only to its
    spacing at 1 (6e-8): at 1 - p of 2e-8 the torch and triton backends rounded logp and log s to
    0, and the cpu backend's were 5% off."""
    module = _load(backend)
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(13 + DTYPES.index(dtype))
    vocab, inv_temp = 1000, 1.0
    logits, targets = _peaked_rows(vocab, dtype, gen)
    logits, targets = logits.to(device), targets.to(device)
    z = logits.double().cpu() * inv_temp
    logprobs = torch.log_softmax(z, dim=1)
    want = {"logp": logprobs.gather(1, targets.cpu()[:, None]).squeeze(1),
            "entropy": -(logprobs.exp() * logprobs).sum(1),
            "log sum p^2": torch.logsumexp(2 * logprobs, dim=1),
            "log s": torch.logsumexp(z - z.max(dim=1, keepdim=True).values, dim=1)}
    states = []
    for slabs in ([(0, vocab)], _cuts(vocab, gen), _cuts(vocab, gen)):
        state = row_state.empty(8, device)
        for v0, v1 in slabs:
            module.row_stats(logits[:, v0:v1], targets, inv_temp, True, state, col_offset=v0, with_sums=True)
        states.append(state)
    if backend == "triton":
        from hpt_fast.backends import triton_backend

        state = row_state.empty(8, device)
        triton_backend._row_stats(logits[:, :300], targets, inv_temp, True, state, 0, 128, 128, with_sums=True)
        triton_backend._row_stats(logits[:, 300:], targets, inv_temp, True, state, 300, 64, 128, with_sums=True)
        states.append(state)
    for state in states:
        logp, norm, entropy = row_state.finish(state, True)
        got = {"logp": logp, "entropy": entropy, "log sum p^2": row_state.logit_sums(state, vocab)[1],
               "log s": norm[:, 1]}
        for name, value in got.items():
            err = (value.double().cpu() - want[name]).abs() / want[name].abs().clamp_min(1e-30)
            assert float(err.max()) <= 5e-6, (name, err.tolist())


def test_an_entropy_rounded_below_zero_is_zero() -> None:
    """row_state.finish gives an entropy of +0, not a negative number, from sums that round below 0."""
    # A one-token row whose shift at the maximum is a rounding error off 0 (z - m of a multiply-add
    # contracted into an FMA: the one-column entropy of 7e-9 that triton_backend's launches avoid)
    # has s = exp(d), s1 = exp(d) * d, and log s - s1 / s just below 0. The kernels as they are never
    # produce such a state (exp(0) is exactly 1 and every term of s1 is <= 0 in each of them), so
    # only a state built by hand reaches the clamp.
    d = torch.tensor(1.37 * 2.0**-25)  # under half an ulp of 1: exp(d) rounds to 1 in float32
    e = d.exp()
    state = row_state.empty(1, torch.device("cpu"))
    state[0, row_state.M] = state[0, row_state.Z_T] = 0.5
    state[0, row_state.S], state[0, row_state.S1] = float(e), float(e * d)
    unclamped = state[0, row_state.S].log() - state[0, row_state.S1] / state[0, row_state.S]
    assert float(unclamped) < 0
    for dtype in (torch.float32, torch.float64):
        logp, _, entropy = row_state.finish(state, True, dtype)
        assert entropy.dtype == dtype and float(entropy) == 0.0 and not torch.signbit(entropy).any()
        assert float(logp) == 0.0


def test_triton_rows_split_over_programs():
    """The Triton kernel's split path (partial sums merged by a second kernel) merges into the
    state like its one-program path, the logit sums included."""
    _load("triton")
    from hpt_fast.backends import triton_backend

    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(3, 1001, generator=gen) * 4).to(backend_device("triton"))
    targets = torch.tensor([0, 500, 1000], device=logits.device)
    want = _reference(logits, targets, 1.0)
    for v0, v1 in ((0, 1001), (137, 1001)):
        state = row_state.empty(3, logits.device)
        if v0:  # the first 137 columns through the one-program path, the rest split in 7
            triton_backend._row_stats(logits[:, :v0], targets, 1.0, True, state, 0, 128, 256, with_sums=True)
        triton_backend._row_stats(logits[:, v0:v1], targets, 1.0, True, state, v0, 128, 128, with_sums=True)
        got = (*_finished(state, True), *row_state.logit_sums(state, 1001))
        for a, b in zip(got, want, strict=True):
            assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_target_no_block_contained_gives_nan(backend):
    """A row whose target column was never merged has no z_t: its logp is NaN, not a number."""
    module = _load(backend)
    logits = torch.randn(2, 10, device=backend_device(backend))
    targets = torch.tensor([3, 8], device=logits.device)
    logp, lse, _ = _merge(module, logits, targets, 1.0, False, [(0, 6)])
    assert torch.isfinite(logp[0]) and torch.isnan(logp[1])
    assert torch.isfinite(lse).all()


def test_cpu_rejects_bad_state_and_negative_targets():
    module = _load("cpu")
    logits = torch.randn(3, 10)
    state = row_state.empty(3, logits.device)
    with pytest.raises(RuntimeError, match=r"targets\[1\] = -2 is negative"):
        module.row_stats(logits, torch.tensor([1, -2, 3]), 1.0, True, state)
    with pytest.raises(RuntimeError, match="state must have shape"):
        module.row_stats(logits, torch.tensor([1, 2, 3]), 1.0, True, state[:2])
    with pytest.raises(RuntimeError, match="state must be float64"):
        module.row_stats(logits, torch.tensor([1, 2, 3]), 1.0, True, state.float())
    with pytest.raises(RuntimeError, match="col_offset must be >= 0"):
        module.row_stats(logits, torch.tensor([1, 2, 3]), 1.0, True, state, col_offset=-1)
