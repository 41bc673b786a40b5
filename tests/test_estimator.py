"""The estimator presets: gradients by autograd through ``est`` against gradients worked out by hand
from hpt.md's per-token losses, token by token (nothing here reuses the implementation's formulas)."""
import math
from pathlib import Path

import pytest
import torch

from hpt_fast.estimator import LOSS_AGGS, PRESETS, Normalizers, get_estimator, preset_table

F64 = torch.float64
LENGTHS = [5, 3, 4, 1, 0]  # the last row has no valid token at all
B, T = len(LENGTHS), 5
L = 8  # max_response_length


def _mask(lengths=LENGTHS, t=T):
    return torch.tensor([[j < n for j in range(t)] for n in lengths])


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = _mask()
    logp = (-0.05 - 2 * torch.rand(B, T, generator=g, dtype=F64)).requires_grad_(True)
    # old log-probs close to the current ones: every ratio inside [0.8, 1.2]
    old = logp.detach() + 0.15 * (torch.rand(B, T, generator=g, dtype=F64) - 0.5)
    entropy = (0.1 + torch.rand(B, T, generator=g, dtype=F64)).requires_grad_(True)
    adv = torch.tensor([1.5, -0.5, 0.25, -2.0, 0.7], dtype=F64)
    return mask, logp, old, entropy, adv


def _grad(loss, *xs):
    return torch.autograd.grad(loss, xs, allow_unused=True)


def _tokens(mask):
    return [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-13)


MIXED_OFF = torch.tensor([False, True, False, True, False])  # rows 1 and 3 are demonstrations
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
GAMMA = 0.1  # LUFFY's shaping gamma


def _rows_of(name):
    """off_policy to pass, and the demonstration flag of each row, for preset ``name``."""
    if name in ("luffy", "srft", "hpt"):
        return MIXED_OFF, MIXED_OFF.tolist()
    return None, [name == "sft"] * B


def _agg_weight(agg, part_rows, b):
    """Hand-derived per-token weight of row b's tokens in a part made of ``part_rows``."""
    if agg == "token-mean":
        return 1 / sum(LENGTHS[i] for i in part_rows)
    if agg == "seq-mean-token-mean":
        return 1 / (sum(1 for i in part_rows if LENGTHS[i]) * LENGTHS[b])
    assert agg == "token-sum-norm"
    return 1 / L


@pytest.mark.parametrize("agg", LOSS_AGGS)
@pytest.mark.parametrize("name", list(PRESETS))
def test_gradient_matches_the_per_token_formula(name, agg):
    """d loss / d logp of every preset under every aggregation, from hpt.md's per-token losses:
    SFT -logp; REINFORCE -A*logp; PPO family -A*rho (no clip binds here); LUFFY demonstrations
    -A*f(pi), f(p) = p/(p+0.1); SRFT rollouts -w*logp (w = 0.1*exp(H) if correct else -1) and
    demonstrations 0.5*exp(-H)*(-logp) plus the LUFFY term; HPT SFT on demonstrations, -A*rho else."""
    mask, logp, old, entropy, adv = _batch()
    off, demo = _rows_of(name)
    kwargs = {"loss_agg": agg, "max_response_length": L, "entropy_coef": 0.0}
    if name in ("srft", "hpt"):
        kwargs["sft_agg"] = agg
    est = get_estimator(name, **kwargs)
    loss, _ = est(logp, mask, None if name == "sft" else adv, old_logp=old, off_policy=off, entropy=entropy,
                  rewards=REWARDS if name == "srft" else None)

    shaped_demo = name in ("luffy", "srft")
    sft_rows = [b for b in range(B) if demo[b] and name in ("sft", "srft", "hpt")]
    rl_rows = [b for b in range(B) if (not demo[b] and name != "sft") or (demo[b] and shaped_demo)]
    expected = torch.zeros(B, T, dtype=F64)
    for b, t in _tokens(mask):
        p = math.exp(logp[b, t].item())
        rho = math.exp(logp[b, t].item() - old[b, t].item())
        h = sum(entropy[b, j].item() for j in range(LENGTHS[b])) / LENGTHS[b]
        g = 0.0
        if b in rl_rows:
            if demo[b]:
                d = -adv[b].item() * GAMMA * p / (p + GAMMA) ** 2
            elif name == "reinforce":
                d = -adv[b].item()
            elif name == "srft":
                d = -(0.1 * math.exp(h) if REWARDS[b] > 0 else -1.0)
            else:
                d = -adv[b].item() * rho
            g += d * _agg_weight(agg, rl_rows, b)
        if b in sft_rows:
            g += -(0.5 * math.exp(-h) if name == "srft" else 1.0) * _agg_weight(agg, sft_rows, b)
        expected[b, t] = g
    _close(_grad(loss, logp)[0], expected)


DEFAULT_AGG = {"sft": "token-mean", "reinforce": "token-mean", "ppo": "token-mean", "dapo": "token-mean",
               "grpo": "seq-mean-token-mean", "dr_grpo": "token-sum-norm", "luffy": "token-sum-norm"}


@pytest.mark.parametrize("name", list(DEFAULT_AGG))
def test_unified_identity(name):
    """d loss / d pi = -w * 1_stable * A / pi_ref per token (the unified form mask * A / pi_ref * grad pi):
    pi_ref = pi_theta for SFT (A = 1) and REINFORCE, pi_old for the PPO family (no clip binds here),
    1 for LUFFY's demonstrations, whose pi is shaped: -w * A * f'(pi), f'(p) = 0.1 / (p + 0.1)^2."""
    mask, logp, old, _, adv = _batch()
    off, demo = _rows_of(name)
    est = get_estimator(name, **({"max_response_length": L} if DEFAULT_AGG[name] == "token-sum-norm" else {}))
    pi = logp.detach().exp().requires_grad_(True)
    loss, _ = est(pi.log(), mask, None if name == "sft" else adv, old_logp=old, off_policy=off,
                  entropy=torch.ones(B, T, dtype=F64))
    expected = torch.zeros(B, T, dtype=F64)
    for b, t in _tokens(mask):
        p = pi[b, t].item()
        w = _agg_weight(DEFAULT_AGG[name], list(range(B)), b)
        a = 1.0 if name == "sft" else adv[b].item()
        if demo[b] and name == "luffy":
            expected[b, t] = -w * a * GAMMA / (p + GAMMA) ** 2
        elif name in ("sft", "reinforce"):
            expected[b, t] = -w * a / p
        else:
            expected[b, t] = -w * a / math.exp(old[b, t].item())
    _close(_grad(loss, pi)[0], expected)


@pytest.mark.parametrize("name, low, high", [("ppo", 0.2, 0.2), ("dapo", 0.2, 0.28)])
def test_clipping_zeroes_exactly_the_pushed_out_tokens(name, low, high):
    ratios = [0.5, 0.79, 0.81, 1.0, 1.19, 1.21, 1.25, 1.3, 2.0]
    signs = [1.0, -1.0]
    mask = torch.ones(len(signs), len(ratios), dtype=torch.bool)
    old = torch.full((2, len(ratios)), -1.0, dtype=F64)
    logp = (old + torch.tensor(ratios, dtype=F64).log()).requires_grad_(True)
    adv = torch.tensor(signs, dtype=F64)
    loss, stats = get_estimator(name)(logp, mask, adv, old_logp=old)
    n = mask.sum().item()
    expected, expected_value, clipped = torch.zeros_like(old), 0.0, 0
    for b, a in enumerate(signs):
        for t, rho in enumerate(ratios):
            # the clip binds where the ratio left the range in the direction the advantage pushes
            if (a > 0 and rho > 1 + high) or (a < 0 and rho < 1 - low):
                clipped += 1
            else:
                expected[b, t] = -a * rho / n
            expected_value += -min(rho * a, min(max(rho, 1 - low), 1 + high) * a) / n
    _close(_grad(loss, logp)[0], expected)
    _close(loss, torch.tensor(expected_value, dtype=F64))
    assert float(stats["clip_fraction"]) == pytest.approx(clipped / n)
    assert float(stats["ratio_max"]) == pytest.approx(2.0)
    # dapo's clip-higher keeps the A > 0 token at rho 1.25, which ppo clips
    assert (expected[0, ratios.index(1.25)] != 0) == (name == "dapo")


def test_hpt_gradient():
    mask, logp, old, entropy, adv = _batch()
    # a ratio far outside any clip range: HPT's RL half has no clipping
    old = old.clone()
    old[0, 0] = logp[0, 0].item() - 1.0
    est = get_estimator("hpt", max_response_length=L, rl_coef=0.5, sft_coef=2.0)
    loss, stats = est(logp, mask, adv, old_logp=old, off_policy=MIXED_OFF, entropy=entropy)
    n_demo = sum(n for n, off in zip(LENGTHS, MIXED_OFF) if off)
    d_logp, d_ent = torch.zeros(B, T, dtype=F64), torch.zeros(B, T, dtype=F64)
    for b, t in _tokens(mask):
        if MIXED_OFF[b]:
            d_logp[b, t] = -2.0 / n_demo
        else:
            d_logp[b, t] = -0.5 * adv[b] * math.exp(logp[b, t].item() - old[b, t].item()) / L
        d_ent[b, t] = -0.001 / sum(LENGTHS)
    g_logp, g_ent = _grad(loss, logp, entropy)
    _close(g_logp, d_logp)
    _close(g_ent, d_ent)
    assert float(stats["sft_fraction"]) == pytest.approx(2 / 5)
    _close(stats["rl_loss"] + stats["sft_loss"] + stats["entropy_loss"], loss.detach())


def test_entropy_bonus_gradient():
    mask, logp, old, entropy, adv = _batch()
    loss, stats = get_estimator("grpo", entropy_coef=0.01)(logp, mask, adv, old_logp=old, entropy=entropy)
    expected = mask.to(F64) * (-0.01 / sum(LENGTHS))
    _close(_grad(loss, entropy)[0], expected)
    _close(stats["entropy_mean"], entropy.detach()[mask].mean())


def test_per_token_advantages():
    mask, logp, old, _, _ = _batch()
    adv = torch.randn(B, T, dtype=F64, generator=torch.Generator().manual_seed(3))
    loss, _ = get_estimator("ppo", clip_low=None, clip_high=None)(logp, mask, adv, old_logp=old)
    expected = torch.zeros(B, T, dtype=F64)
    for b, t in _tokens(mask):
        expected[b, t] = -adv[b, t] * math.exp(logp[b, t].item() - old[b, t].item()) / sum(LENGTHS)
    _close(_grad(loss, logp)[0], expected)


def test_no_old_logp_means_on_policy_ratio_one():
    mask, logp, _, _, adv = _batch()
    est = get_estimator("grpo")
    loss, stats = est(logp, mask, adv)
    loss_ref, _ = est(logp, mask, adv, old_logp=logp.detach())
    _close(_grad(loss, logp)[0], _grad(loss_ref, logp)[0])
    assert float(stats["ratio_mean"]) == 1.0 and float(stats["clip_fraction"]) == 0.0
    assert "approx_kl" not in stats


def test_padding_values_are_never_read():
    mask, logp, old, entropy, adv = _batch()
    est = get_estimator("hpt", max_response_length=L)
    nan_pad = lambda x: x.detach().masked_fill(~mask, float("nan"))  # noqa: E731
    lp = nan_pad(logp).requires_grad_(True)
    adv_tok = nan_pad(adv[:, None].expand(B, T))
    # demonstrations have no sampling policy: their old_logp is never read either
    old_nan = nan_pad(old).masked_fill(MIXED_OFF[:, None], float("nan"))
    loss, stats = est(lp, mask, adv_tok, old_logp=old_nan, off_policy=MIXED_OFF, entropy=nan_pad(entropy))
    loss_ref, _ = est(logp, mask, adv, old_logp=old, off_policy=MIXED_OFF, entropy=entropy)
    _close(loss, loss_ref)
    assert bool(torch.isfinite(_grad(loss, lp)[0]).all())
    assert all(bool(torch.isfinite(v)) for v in stats.values())


@pytest.mark.parametrize("name", ["hpt", "grpo", "srft"])
def test_normalizers_make_micro_batches_sum_to_the_batch(name):
    mask, logp, old, entropy, adv = _batch()
    est = get_estimator(name, **({} if name == "grpo" else {"max_response_length": L}))
    off = None if name == "grpo" else MIXED_OFF
    args = dict(old_logp=old, off_policy=off, entropy=entropy, rewards=REWARDS if name == "srft" else None)
    full, _ = est(logp, mask, adv, **args)
    norms = est.normalizers(mask, off)
    total = 0
    for part in (slice(0, 2), slice(2, 5)):
        sub = lambda x: None if x is None else x[part]  # noqa: E731
        loss, _ = est(logp[part], mask[part], adv[part], **{k: sub(v) for k, v in args.items()}, normalizers=norms)
        total = total + loss
    _close(total, full)
    _close(_grad(total, logp)[0], _grad(full, logp)[0])


def test_stats_are_detached_scalars():
    mask, logp, old, entropy, adv = _batch()
    _, stats = get_estimator("hpt", max_response_length=L)(logp, mask, adv, old_logp=old, off_policy=MIXED_OFF,
                                                           entropy=entropy)
    expected_keys = {"rl_loss", "sft_loss", "entropy_loss", "sft_fraction", "entropy_mean",
                     "clip_fraction", "ratio_mean", "ratio_max", "approx_kl"}
    assert set(stats) == expected_keys
    for v in stats.values():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad
    rollout = mask & ~MIXED_OFF[:, None]
    ratio = (logp.detach() - old).exp()[rollout]
    _close(stats["ratio_mean"], ratio.mean())
    _close(stats["ratio_max"], ratio.max())
    _close(stats["approx_kl"], (old - logp.detach())[rollout].mean())
    # the entropy is logged whenever it is given, even when the loss does not read it
    _, stats = get_estimator("reinforce")(logp, mask, adv, entropy=entropy)
    assert set(stats) == {"rl_loss", "sft_fraction", "entropy_mean"}
    _close(stats["entropy_mean"], entropy.detach()[mask].mean())


def test_preset_properties():
    est = get_estimator("hpt", max_response_length=8192)
    hp = est.hparams
    assert (hp.clip_low, hp.clip_high, hp.entropy_coef) == (None, None, 0.001)
    assert (hp.loss_agg, hp.sft_agg, hp.rl_coef, hp.sft_coef) == ("token-sum-norm", "token-mean", 1.0, 1.0)
    assert est.needs_entropy and not est.needs_sequence_stats and est.preset.advantage == "dr_grpo"
    assert get_estimator("srft", max_response_length=8).needs_sequence_stats
    assert not get_estimator("grpo").needs_entropy
    assert get_estimator("grpo", entropy_coef=0.01).needs_entropy


def test_preset_table_is_in_the_readme():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert preset_table() in readme
    assert all(f"`{name}`" in preset_table() for name in PRESETS)


@pytest.mark.parametrize(
    "name, kwargs, error, match",
    [
        ("trpo", {}, ValueError,
         "unknown estimator preset 'trpo'; known: sft, reinforce, ppo, grpo, dr_grpo, dapo, luffy, srft, hpt"),
        ("grpo", {"shaping_gamma": 0.2}, TypeError, "grpo does not take shaping_gamma; it takes: loss_agg"),
        ("sft", {"rl_coef": 1.0}, TypeError, "sft does not take rl_coef"),
        ("sft", {"sft_agg": "token-mean"}, TypeError, "sft does not take sft_agg"),
        ("hpt", {"max_response_length": 8, "clip_high": 0.2, "shaping_gamma": 0.2}, TypeError,
         "hpt does not take shaping_gamma; it takes: loss_agg"),
        ("ppo", {"clip_low": -0.1}, ValueError, r"clip_low must be a finite number >= 0.0 and < 1.0, got -0.1"),
        ("ppo", {"clip_low": 1.0}, ValueError, "clip_low must be"),
        ("ppo", {"clip_high": -0.2}, ValueError, "clip_high must be a finite number >= 0.0"),
        ("ppo", {"loss_agg": "mean"}, ValueError,
         "unknown loss_agg 'mean'; known: token-mean, seq-mean-token-mean, token-sum-norm"),
        ("hpt", {"max_response_length": 8, "sft_agg": "sum"}, ValueError, "unknown sft_agg 'sum'"),
        ("hpt", {}, ValueError, "hpt: aggregation 'token-sum-norm' divides by max_response_length, which is not set"),
        ("sft", {"loss_agg": "token-sum-norm"}, ValueError, "divides by max_response_length"),
        ("grpo", {"max_response_length": 0}, ValueError, "max_response_length must be a positive int"),
        ("luffy", {"max_response_length": 8, "shaping_gamma": 0.0}, ValueError,
         "shaping_gamma must be a finite number > 0"),
        ("grpo", {"rl_coef": -1.0}, ValueError, "rl_coef must be"),
        ("hpt", {"max_response_length": 8, "sft_coef": -0.5}, ValueError, "sft_coef must be"),
        ("srft", {"max_response_length": 8, "srft_demo_coef": float("inf")}, ValueError, "srft_demo_coef must be"),
        ("srft", {"max_response_length": 8, "srft_pos_coef": -1.0}, ValueError, "srft_pos_coef must be"),
        ("grpo", {"entropy_coef": float("nan")}, ValueError, "entropy_coef must be a finite number"),
    ],
)
def test_bad_settings(name, kwargs, error, match):
    with pytest.raises(error, match=match):
        get_estimator(name, **kwargs)


def _call_with(**changes):
    mask, logp, old, entropy, adv = _batch()
    args = dict(logp=logp, mask=mask, advantages=adv, old_logp=old, off_policy=None, entropy=entropy, rewards=None)
    if changes.get("name") in ("hpt", "srft"):
        args["off_policy"] = MIXED_OFF
    name = changes.pop("name", "grpo")
    args.update(changes)
    est = get_estimator(name, **({"max_response_length": L} if name in ("hpt", "srft") else {}))
    return est(args.pop("logp"), args.pop("mask"), **args)


@pytest.mark.parametrize(
    "changes, error, match",
    [
        ({"advantages": torch.ones(B + 1)}, ValueError, r"advantages has shape \(6,\) but mask has shape \(5, 5\)"),
        ({"old_logp": torch.zeros(B, T + 1)}, ValueError, r"old_logp has shape \(5, 6\) but mask has shape \(5, 5\)"),
        ({"logp": torch.zeros(B, T - 1)}, ValueError, r"logp has shape \(5, 4\) but mask has shape \(5, 5\)"),
        ({"off_policy": torch.zeros(B + 2, dtype=torch.bool)}, ValueError, r"off_policy has shape \(7,\)"),
        ({"advantages": torch.tensor([1.0, float("nan"), 0, 0, 0])}, ValueError,
         "advantages is nan at row 1, position 0"),
        ({"old_logp": torch.full((B, T), float("inf"))}, ValueError, "old_logp is inf at row 0"),
        ({"advantages": None}, ValueError, "grpo needs advantages"),
        ({"advantages": torch.ones(B, dtype=torch.long)}, TypeError, "advantages must be floating point"),
        ({"off_policy": MIXED_OFF}, ValueError,
         r"grpo is on-policy only, but off_policy marks rows \[1, 3\] as demonstrations"),
        ({"off_policy": MIXED_OFF.float()}, TypeError, "off_policy must be a bool tensor"),
        ({"name": "sft", "off_policy": MIXED_OFF}, ValueError, "sft trains on demonstrations only"),
        ({"name": "srft", "entropy": None}, ValueError, "srft needs entropy"),
        ({"name": "srft"}, ValueError, r"srft needs rewards \[B\]"),
        ({"name": "hpt", "advantages": torch.tensor([[0.0] * T, [float("nan")] * T] + [[0.0] * T] * 3)}, ValueError,
         "advantages is nan at row 1, position 0"),
        ({"name": "hpt", "entropy": None}, ValueError, r"hpt needs entropy \[B, T\] \(entropy_coef=0.001\)"),
        ({"mask": _mask().long() * 2}, ValueError, "mask must be bool or hold only 0 and 1"),
        ({"logp": torch.zeros(B, T, dtype=torch.long)}, TypeError, "logp must be a floating-point"),
    ],
)
def test_bad_inputs(changes, error, match):
    with pytest.raises(error, match=match):
        _call_with(**changes)


def test_normalizers_from_another_batch_are_rejected():
    mask, logp, old, _, adv = _batch()
    est = get_estimator("grpo")
    small = Normalizers(rl_tokens=3, rl_seqs=1, sft_tokens=0, sft_seqs=0, all_tokens=3)
    with pytest.raises(ValueError, match="normalizers.rl_tokens = 3 is smaller than this batch's own count 13"):
        est(logp, mask, adv, old_logp=old, normalizers=small)
