"""FusedUnifiedLoss (fused op mode B, or mode A for SRFT) against the estimator on per-token log-probs."""
import random
import re
from pathlib import Path

import pytest
import torch

import hpt_fast.loss as loss_module
from hpt_fast import backends
from hpt_fast.estimator import PRESETS, get_estimator
from hpt_fast.hpt import assemble_hpt_rows
from hpt_fast.loss import FusedUnifiedLoss
from hpt_fast.ops import fused_token_logprobs
from tests.reference import reference_logprobs

B, T, H, V = 5, 6, 8, 13
TEMPERATURE = 0.7
OFF = torch.tensor([False, True, False, True, False])
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=1e-6)}


def _estimator(name):
    return get_estimator(name, **({"max_response_length": 8} if name in ("dr_grpo", "luffy", "srft", "hpt") else {}))


def _batch(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [6, 4, 5, 2, 0]
    mask = torch.tensor([[j < n for j in range(T)] for n in lengths])
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype).requires_grad_(True)
    weight = (0.5 * torch.randn(V, H, generator=g, dtype=dtype)).requires_grad_(True)
    bias = (0.1 * torch.randn(V, generator=g, dtype=dtype)).requires_grad_(True)
    targets = torch.randint(0, V, (B, T), generator=g).masked_fill(~mask, -100)
    with torch.no_grad():
        lp, _ = reference_logprobs(hidden, weight, targets, bias, TEMPERATURE)
    # old log-probs near the current ones, with a few tokens pushed outside the clip range
    old = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(dtype)
    adv = torch.tensor([1.0, -0.5, -1.5, 0.3, 0.8], dtype=torch.float32)
    return dict(hidden=hidden, weight=weight, bias=bias, targets=targets, mask=mask, adv=adv, old=old)


def _row_args(est, x):
    off = OFF if (est.preset.takes_demos and est.preset.rollout is not None) else None
    adv = None if est.name == "sft" else x["adv"]
    return adv, x["old"], off


def _backend_cases():
    """(backend, dtype) pairs: the torch backend in float64 and float32, the C++ cpu backend (float32
    only) where it is built."""
    skip_cpu = pytest.mark.skipif("cpu" not in backends.available(), reason="the cpu backend is not built here")
    return [
        pytest.param("torch", torch.float64, id="torch-f64"),
        pytest.param("torch", torch.float32, id="torch-f32"),
        pytest.param("cpu", torch.float32, id="cpu-f32", marks=skip_cpu),
    ]


@pytest.mark.parametrize("backend, dtype", _backend_cases())
@pytest.mark.parametrize("name", list(PRESETS))
def test_matches_estimator_on_fused_logprobs(name, backend, dtype):
    """FusedUnifiedLoss (mode B; SRFT mode A) == est(fused_token_logprobs(...)): loss, gradients, stats."""
    est = _estimator(name)
    x = _batch(dtype)
    adv, old, off = _row_args(est, x)
    params = (x["hidden"], x["weight"], x["bias"])
    fused = FusedUnifiedLoss(est, temperature=TEMPERATURE, chunk_size=4, backend=backend)
    loss, stats = fused(
        x["hidden"], x["weight"], x["targets"], x["mask"], adv, bias=x["bias"], old_logp=old, off_policy=off,
        rewards=REWARDS,
    )
    grads = torch.autograd.grad(loss, params)

    logp, entropy = fused_token_logprobs(
        x["hidden"], x["weight"], x["targets"], bias=x["bias"], temperature=TEMPERATURE,
        return_entropy=est.needs_entropy, backend=backend, chunk_size=4,
    )
    ref_loss, ref_stats = est(logp, x["mask"], adv, old_logp=old, off_policy=off, entropy=entropy, rewards=REWARDS)
    ref_grads = torch.autograd.grad(ref_loss, params)

    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(loss, ref_loss, **TOL[dtype])
    for g, r in zip(grads, ref_grads):
        assert bool(r.abs().max() > 0)
        torch.testing.assert_close(g, r, **TOL[dtype])
    assert set(stats) == set(ref_stats)
    for k in stats:
        torch.testing.assert_close(stats[k], ref_stats[k], **TOL[dtype])


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("name", list(PRESETS))
def test_matches_materialised_logits_reference(name, softcap):
    """The same comparison against log_softmax over full float64 logits (no fused code at all),
    also with soft-capped logits."""
    est = _estimator(name)
    x = _batch(torch.float64, seed=1)
    adv, old, off = _row_args(est, x)
    params = (x["hidden"], x["weight"], x["bias"])
    loss, _ = FusedUnifiedLoss(est, temperature=TEMPERATURE, chunk_size=3, backend="torch", softcap=softcap)(
        x["hidden"], x["weight"], x["targets"], x["mask"], adv, bias=x["bias"], old_logp=old, off_policy=off,
        rewards=REWARDS,
    )
    logp, entropy = reference_logprobs(x["hidden"], x["weight"], x["targets"], x["bias"], TEMPERATURE,
                                       softcap=softcap)
    ref_loss, _ = est(logp, x["mask"], adv, old_logp=old, off_policy=off, entropy=entropy, rewards=REWARDS)
    torch.testing.assert_close(loss, ref_loss, **TOL[torch.float64])
    for g, r in zip(torch.autograd.grad(loss, params), torch.autograd.grad(ref_loss, params)):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["sft", "grpo", "hpt", "srft"])
def test_inside_torch_compile(name):
    """A compiled step runs the loss as one opaque call, like the op: one graph break around it
    (tracing into its checks broke the graph 12-18 times), and the eager gradients."""
    est = _estimator(name)
    x = _batch(torch.float32, seed=2)
    adv, old, off = _row_args(est, x)
    loss_fn = FusedUnifiedLoss(est, temperature=TEMPERATURE, chunk_size=3)

    def step(h, w, b):
        loss, _ = loss_fn(torch.tanh(h) * 2, w, x["targets"], x["mask"], adv, bias=b, old_logp=old, off_policy=off,
                          rewards=REWARDS)
        return loss * 0.5

    params = (x["hidden"], x["weight"], x["bias"])
    want = torch.autograd.grad(step(*params), params)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(*params)
    assert explained.graph_break_count == 1, [str(r.reason)[:80] for r in explained.break_reasons]
    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(step, backend="aot_eager")(*params), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "name, kwargs, mode, with_entropy",
    [
        ("grpo", {}, "B", False),
        ("grpo", {"entropy_coef": 0.01}, "B", True),
        ("hpt", {"max_response_length": 8}, "B", True),
        ("hpt", {"max_response_length": 8, "entropy_coef": 0.0}, "B", False),
        ("srft", {"max_response_length": 8}, "A", True),
    ],
)
def test_mode_and_entropy_routing(monkeypatch, name, kwargs, mode, with_entropy):
    calls = []
    real_b, real_a = loss_module.fused_linear_loss, loss_module.fused_token_logprobs

    def mode_b(*args, **kw):
        calls.append(("B", kw["with_entropy"]))
        return real_b(*args, **kw)

    def mode_a(*args, **kw):
        calls.append(("A", kw["return_entropy"]))
        return real_a(*args, **kw)

    monkeypatch.setattr(loss_module, "fused_linear_loss", mode_b)
    monkeypatch.setattr(loss_module, "fused_token_logprobs", mode_a)
    est = get_estimator(name, **kwargs)
    x = _batch(torch.float32)
    adv, old, off = _row_args(est, x)
    fused = FusedUnifiedLoss(est, backend="torch")
    fused(x["hidden"], x["weight"], x["targets"], x["mask"], adv, old_logp=old, off_policy=off, rewards=REWARDS)
    assert calls == [(mode, with_entropy)]


def test_micro_batches_with_normalizers_sum_to_the_batch():
    est = _estimator("hpt")
    x = _batch(torch.float64)
    fused = FusedUnifiedLoss(est, backend="torch")
    full, _ = fused(x["hidden"], x["weight"], x["targets"], x["mask"], x["adv"], old_logp=x["old"], off_policy=OFF)
    norms = est.normalizers(x["mask"], OFF)
    total = sum(
        fused(x["hidden"][s], x["weight"], x["targets"][s], x["mask"][s], x["adv"][s], old_logp=x["old"][s],
              off_policy=OFF[s], normalizers=norms)[0]
        for s in (slice(0, 2), slice(2, 5))
    )
    torch.testing.assert_close(total, full, **TOL[torch.float64])
    for g, r in zip(torch.autograd.grad(total, x["weight"]), torch.autograd.grad(full, x["weight"])):
        torch.testing.assert_close(g, r, **TOL[torch.float64])


def test_hpt_step_from_rewards():
    """Gate -> rows -> loss: rows of SFT prompts are demonstrations, the others rollouts with r - mean."""
    rewards = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    rows = assemble_hpt_rows(rewards, gamma=0.0)
    n_rows = rows.prompt.numel()
    assert n_rows == 1 + 2 + 1 + 2
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n_rows, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(n_rows, T, dtype=torch.bool)
    targets = torch.randint(0, V, (n_rows, T), generator=g)
    est = get_estimator("hpt", max_response_length=T)
    fused = FusedUnifiedLoss(est, backend="torch")
    loss, stats = fused(hidden, weight, targets, mask, rows.advantages, off_policy=rows.off_policy)
    logp, entropy = reference_logprobs(hidden, weight, targets)
    demo = rows.off_policy
    # by hand: SFT token-mean over the 2 demonstrations, RL -A * rho summed / T with pi_old = sg(pi),
    # entropy bonus 0.001 * token-mean
    ratio = (logp[~demo] - logp[~demo].detach()).exp()
    expected = -logp[demo].mean() - (rows.advantages[~demo, None] * ratio).sum() / T - 0.001 * entropy.mean()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(loss, hidden)[0], torch.autograd.grad(expected, hidden)[0])
    assert float(stats["sft_fraction"]) == pytest.approx(2 / 6)


def test_string_estimator_and_repr():
    fused = FusedUnifiedLoss("grpo", backend="torch", softcap=30.0)
    assert fused.estimator.name == "grpo"
    assert "Estimator('grpo'" in repr(fused) and "softcap=30.0" in repr(fused)
    with pytest.raises(TypeError, match="estimator must be an Estimator or a preset name"):
        FusedUnifiedLoss(42)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda x: x.update(targets=x["targets"].masked_fill(~x["mask"], 0)), ValueError,
         r"targets must be -100 exactly where mask is 0; at row 1, position 4 the target is 0 and the mask is False"),
        (lambda x: x.update(mask=torch.ones_like(x["mask"])), ValueError,
         r"targets must be -100 exactly where mask is 0; at row 1, position 4 the target is -100 and the mask is True"),
        (lambda x: x.update(hidden=x["hidden"][0]), ValueError, r"hidden must be \[B, T, H\], got shape \(6, 8\)"),
        (lambda x: x.update(mask=x["mask"][:, :4]), ValueError,
         r"mask has shape \(5, 4\) but targets has shape \(5, 6\)"),
        (lambda x: x.update(targets=x["targets"][:4]), ValueError,
         r"targets has shape \(4, 6\) but hidden is \(5, 6, 8\)"),
        (lambda x: x.update(adv=torch.ones(3)), ValueError, r"advantages has shape \(3,\) but mask has shape \(5, 6\)"),
        (lambda x: x.update(weight=x["weight"][:, :5]), ValueError, "hidden size mismatch"),
    ],
)
def test_bad_inputs(change, error, match):
    x = _batch(torch.float32)
    change(x)
    with pytest.raises(error, match=match):
        FusedUnifiedLoss("grpo", backend="torch")(
            x["hidden"], x["weight"], x["targets"], x["mask"], x["adv"], old_logp=x["old"]
        )


def test_srft_checks_its_inputs_before_the_gemms(monkeypatch):
    def no_gemms(*args, **kwargs):
        raise AssertionError("mode A ran before the inputs were checked")

    monkeypatch.setattr(loss_module, "fused_token_logprobs", no_gemms)
    x = _batch(torch.float32)
    fused = FusedUnifiedLoss(_estimator("srft"), backend="torch")
    bad_adv = x["adv"].clone()
    bad_adv[2] = float("nan")
    with pytest.raises(ValueError, match="advantages is nan at row 2"):
        fused(x["hidden"], x["weight"], x["targets"], x["mask"], bad_adv, off_policy=OFF, rewards=REWARDS)
    with pytest.raises(ValueError, match="srft needs rewards"):
        fused(x["hidden"], x["weight"], x["targets"], x["mask"], x["adv"], off_policy=OFF)


def _readme_section(title: str) -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index(f"## {title}\n")
    end = readme.find("\n## ", start + 1)
    return readme[start:end if end != -1 else None]


@pytest.mark.parametrize("section", ["The fused op", "Using the fused loss in another trainer"])
def test_readme_examples_run(section, monkeypatch, tmp_path):
    # TRL's example: its Trainer in an empty directory, and no launcher variables an in-process
    # hpt_fast Trainer (other tests) left for accelerate to read
    monkeypatch.chdir(tmp_path)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    blocks = re.findall(r"```python\n(.*?)```", _readme_section(section), flags=re.S)
    assert blocks, f"README section {section!r} has no python example"
    namespace = {"__name__": "__readme__"}  # the blocks run in order, like a reader pasting them
    for i, code in enumerate(blocks, 1):
        exec(compile(code, f"README {section}, python block {i}", "exec"), namespace)


@pytest.mark.parametrize("name", ["grpo", "srft"])
def test_accum_dtype_reaches_the_fused_op(name, monkeypatch):
    """accum_dtype goes to mode B (and to mode A for SRFT) unchanged, and the bf16 loss's
    gradients stay close to the float64 one's with grad_weight summed in bf16."""
    seen = []
    for op in ("fused_linear_loss", "fused_token_logprobs"):
        real = getattr(loss_module, op)

        def spy(*args, _real=real, **kwargs):
            seen.append(kwargs["accum_dtype"])
            return _real(*args, **kwargs)

        monkeypatch.setattr(loss_module, op, spy)
    est = _estimator(name)
    x = _batch(torch.float64)
    adv, old, off = _row_args(est, x)
    args = dict(bias=x["bias"], old_logp=old, off_policy=off, rewards=REWARDS)
    fused = FusedUnifiedLoss(est, temperature=TEMPERATURE, chunk_size=2, backend="torch")
    want = torch.autograd.grad(fused(x["hidden"], x["weight"], x["targets"], x["mask"], adv, **args)[0],
                               (x["hidden"], x["weight"]))
    low = {k: x[k].detach().bfloat16().requires_grad_(True) for k in ("hidden", "weight", "bias")}
    fused = FusedUnifiedLoss(est, temperature=TEMPERATURE, chunk_size=2, accum_dtype=None)
    assert "accum_dtype=None" in repr(fused)
    loss, _ = fused(low["hidden"], low["weight"], x["targets"], x["mask"], adv, **{**args, "bias": low["bias"]})
    got = torch.autograd.grad(loss, (low["hidden"], low["weight"]))
    assert seen == [torch.float32, None]
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        assert float((g.double() - w).abs().max()) <= 0.05 * float(w.abs().max())


def _random_case(seed: int):
    """A preset with random settings the preset takes, and a float64 batch of random shape: rows with
    no response token, zero / per-row / per-token advantages, with or without old log-probs and a
    bias, soft-capped logits, one-id vocabularies."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    name = rng.choice(list(PRESETS))
    settings = {"max_response_length": rng.choice([4, 13])}
    settings["loss_agg"] = rng.choice(["token-mean", "seq-mean-token-mean", "token-sum-norm"])
    settings["entropy_coef"] = rng.choice([0.0, 0.01, -0.02])
    if PRESETS[name].defaults.clip_low is not None and rng.random() < 0.5:
        settings["clip_low"], settings["clip_high"] = rng.choice([(0.2, 0.28), (0.1, 0.1)])
    est = get_estimator(name, **settings)
    b, t, h, v = rng.choice([1, 2, 5]), rng.choice([1, 6]), rng.choice([1, 4]), rng.choice([1, 2, 7])
    mask = torch.rand(b, t, generator=g) < rng.choice([0.0, 0.5, 1.0])
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, generator=g, dtype=torch.float64).requires_grad_() if rng.random() < 0.5 else None
    targets = torch.randint(0, v, (b, t), generator=g).masked_fill(~mask, -100)
    adv = rng.choice([torch.zeros(b), torch.randn(b, generator=g), torch.randn(b, t, generator=g)])
    old = 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64) - 1.0 if rng.random() < 0.7 else None
    return dict(
        est=est, op=dict(temperature=rng.choice([1.0, 0.6]), softcap=rng.choice([None, 3.0]),
                         chunk_size=rng.choice([None, 1, 3])),
        hidden=hidden, weight=weight, bias=bias, targets=targets, mask=mask,
        adv=None if name == "sft" else adv, old=old, rewards=(torch.rand(b, generator=g) < 0.5).double(),
        off=torch.rand(b, generator=g) < 0.5 if est.preset.takes_demos and est.preset.rollout is not None else None)


@pytest.mark.parametrize("seed", range(30))
def test_random_configurations_match_the_estimator_on_materialised_logits(seed):
    """Random presets, settings and batches (``_random_case``): FusedUnifiedLoss's loss, gradients
    and statistics equal the estimator's on float64 log_softmax over the full logits."""
    x = _random_case(seed)
    est, op = x["est"], x["op"]
    params = [p for p in (x["hidden"], x["weight"], x["bias"]) if p is not None]
    args = (x["mask"], x["adv"])
    kwargs = dict(old_logp=x["old"], off_policy=x["off"], rewards=x["rewards"])
    loss, stats = FusedUnifiedLoss(est, backend="torch", **op)(x["hidden"], x["weight"], x["targets"], *args,
                                                               bias=x["bias"], **kwargs)
    logp, entropy = reference_logprobs(x["hidden"], x["weight"], x["targets"], x["bias"], op["temperature"],
                                       softcap=op["softcap"])
    ref_loss, ref_stats = est(logp, *args, entropy=entropy if est.needs_entropy else None, **kwargs)
    torch.testing.assert_close(loss, ref_loss, **TOL[torch.float64])

    def grads(of: torch.Tensor) -> list[torch.Tensor]:
        # a batch with no response token may give a loss with no graph: zero gradients
        got = torch.autograd.grad(of, params, allow_unused=True) if of.requires_grad else [None] * len(params)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, got)]

    for got, want in zip(grads(loss), grads(ref_loss)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert set(stats) == set(ref_stats)
    for key in stats:
        torch.testing.assert_close(stats[key], ref_stats[key], **TOL[torch.float64])
