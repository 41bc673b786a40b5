"""The Unified Policy Gradient Estimator: four components, an aggregation, and the presets built from them.

Per token, every preset's gradient is ``1_stable * (1 / pi_ref) * A_hat * grad pi_theta``:

- stabilization mask ``1_stable``: ``stable_mask`` (PPO's clip; 1 when both clip bounds are None);
- reference denominator ``pi_ref``: ``REFERENCES``, each a per-token surrogate ``s(logp)`` whose
  gradient is ``grad pi_theta / pi_ref``: ``"pi_theta"`` (sg(pi_theta): ``s = logp``),
  ``"pi_old"`` (``s = rho = exp(logp - old_logp)``) and ``"shaped"`` (pi_ref = 1 with LUFFY's
  policy shaping: ``s = f(pi) = pi / (pi + shaping_gamma)``);
- advantage ``A_hat``: given per row or per token (``hpt_fast.compute_advantages``), 1 for SFT,
  SRFT's entropy weights for SRFT's rollouts;
- likelihood gradient ``grad pi_theta``: the same for every preset, autograd through ``logp``.

A ``Preset`` names the reference of its rollout rows and of its demonstration rows and whether
demonstrations also get an SFT part. Its per-token loss, with ``w`` the per-token weights of each
part (coefficient times aggregation, computed from the mask up front, ``aggregation_weights``):

    loss_t = w_rl_t * (-A_t * s_t) + w_sft_t * (-logp_t) - w_ent_t * entropy_t

so ``est(logp, ...)`` is the sum of ``TokenLoss`` over the valid tokens, and the very same
``TokenLoss`` is the ``token_loss_fn`` that ``FusedUnifiedLoss`` hands to the fused op's mode B.
Each part is aggregated over its own rows' tokens; the entropy bonus is a token-mean over all
valid tokens. For a mixed preset the loss is thus ``rl_coef * L_RL + sft_coef * L_SFT``.

SRFT weights its terms by the stop-grad mean entropy H of each sequence: rollouts use
``A = srft_pos_coef * exp(H)`` if correct, ``-1`` if wrong, and the SFT part is scaled by
``srft_demo_coef * exp(-H)``. Those weights need every token's entropy before any token's loss,
so SRFT sets ``needs_sequence_stats`` and ``FusedUnifiedLoss`` runs it on mode A's per-token outputs.

Row kinds: ``off_policy[b]`` True marks a demonstration row. Without ``off_policy`` every row is a
rollout, except for ``sft``, whose rows are all demonstrations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
from torch import Tensor

from hpt_fast.advantages import is_correct

# The aggregations, as the per-token weight of a token of row i in a part with n_tok valid tokens
# over n_seq rows (rows with at least one valid token), len_i valid tokens in row i, and
# L = max_response_length. token-sum-norm is hpt.md's "sum / max_response_length" (the HPT code's
# loss_remove_token_mean).
AGG_WEIGHTS = {
    "token-mean": "1 / n_tok",
    "seq-mean-token-mean": "1 / (n_seq * len_i)",
    "token-sum-norm": "1 / L",
}
LOSS_AGGS = tuple(AGG_WEIGHTS)


# ---- the components ----------------------------------------------------------------------------


def stable_mask(ratio: Tensor, adv: Tensor, clip_low: Optional[float], clip_high: Optional[float]) -> Tensor:
    """1_stable: False where PPO's clip stops a token's gradient, i.e. where the ratio has left
    [1 - clip_low, 1 + clip_high] in the direction the advantage pushes it (None: no bound).

    Args:
        ratio, adv: float [N], the tokens' pi_theta / pi_old (detached) and advantages.
    Returns:
        bool [N].
    """
    clipped = torch.zeros_like(ratio, dtype=torch.bool)
    if clip_high is not None:
        clipped |= (adv > 0) & (ratio > 1 + clip_high)
    if clip_low is not None:
        clipped |= (adv < 0) & (ratio < 1 - clip_low)
    return ~clipped


def _surrogate_pi_theta(logp: Tensor, old_logp: Optional[Tensor], shaping_gamma: float) -> Tensor:
    return logp


def _surrogate_pi_old(logp: Tensor, old_logp: Optional[Tensor], shaping_gamma: float) -> Tensor:
    # no old log-probs: pi_old = sg(pi_theta), one update per batch, ratio 1 with grad log pi
    return torch.exp(logp - (logp.detach() if old_logp is None else old_logp))


def _surrogate_shaped(logp: Tensor, old_logp: Optional[Tensor], shaping_gamma: float) -> Tensor:
    p = logp.exp()
    return p / (p + shaping_gamma)


# pi_ref -> per-token surrogate s(logp [N], old_logp [N] or None, shaping_gamma) -> [N], with
# grad s = grad pi_theta / pi_ref (for "shaped": grad f(pi_theta), pi_ref = 1)
REFERENCES = {"pi_theta": _surrogate_pi_theta, "pi_old": _surrogate_pi_old, "shaped": _surrogate_shaped}


def aggregation_weights(
    agg: str, mask: Tensor, part: Tensor, n_tok: int, n_seq: int, L: Optional[int], dtype: torch.dtype
) -> Tensor:
    """Per-token weights [B, T] of one part under aggregation ``agg`` (``AGG_WEIGHTS``).

    Args:
        mask: bool [B, T]; part: bool [B], the part's rows; n_tok, n_seq: the part's valid tokens
            and non-empty rows (of the whole mini-batch, see ``Normalizers``); L: max_response_length.
    """
    m = (mask & part[:, None]).to(dtype)
    if agg == "token-mean":
        return m / max(n_tok, 1)
    if agg == "seq-mean-token-mean":
        return m / (m.sum(1, keepdim=True).clamp_min(1) * max(n_seq, 1))
    return m / L


# ---- presets -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hparams:
    """Tunable settings; each preset uses a subset (``Preset.accepted``) and sets its own defaults.

    Attributes:
        clip_low, clip_high: PPO clip range [1 - clip_low, 1 + clip_high] of the ratio; None: no
            bound on that side. clip_low in [0, 1), clip_high >= 0.
        loss_agg: aggregation of each part (``LOSS_AGGS``).
        sft_agg: aggregation of the SFT part of a preset that also has an RL part; None: loss_agg.
        max_response_length: L of ``token-sum-norm`` (the HPT paper: 8192).
        rl_coef, sft_coef: coefficients of the RL and SFT parts (HPT's alpha and beta are applied
            per prompt by the gate; these scale whole parts).
        entropy_coef: coefficient of the entropy bonus (subtracted; not detached).
        shaping_gamma: gamma of LUFFY's policy shaping f(p) = p / (p + gamma).
        srft_demo_coef, srft_pos_coef: SRFT's 0.5 (SFT scale) and 0.1 (correct-rollout scale).
    """

    clip_low: Optional[float] = None
    clip_high: Optional[float] = None
    loss_agg: str = "token-mean"
    sft_agg: Optional[str] = None
    max_response_length: Optional[int] = None
    rl_coef: float = 1.0
    sft_coef: float = 1.0
    entropy_coef: float = 0.0
    shaping_gamma: float = 0.1
    srft_demo_coef: float = 0.5
    srft_pos_coef: float = 0.1


@dataclass(frozen=True)
class Preset:
    """One algorithm, as its components per row kind, and its default settings.

    Attributes:
        rollout: reference denominator (``REFERENCES``) of the RL term on rollout rows; the PPO
            stabilization mask applies with "pi_old". None: rollouts not accepted.
        demo: reference denominator of the RL term on demonstration rows ("shaped") or None.
        sft: whether demonstration rows get the SFT part (A_hat = 1, pi_ref = sg(pi_theta)).
        advantage: the ``compute_advantages`` kind the algorithm pairs with ("gae": supplied per
            token by the caller's critic; None: no advantage input).
        defaults: the preset's settings.
        srft: SRFT's entropy-dependent advantages and SFT weights.
    """

    rollout: Optional[str]
    demo: Optional[str]
    sft: bool
    advantage: Optional[str]
    defaults: Hparams
    srft: bool = False

    @property
    def has_rl(self) -> bool:
        return self.rollout is not None or self.demo is not None

    @property
    def takes_demos(self) -> bool:
        return self.demo is not None or self.sft

    @property
    def accepted(self) -> tuple[str, ...]:
        """The Hparams fields this preset uses."""
        names = ["loss_agg", "max_response_length", "entropy_coef"]
        if self.has_rl:
            names += ["rl_coef"]
        if self.rollout == "pi_old":
            names += ["clip_low", "clip_high"]
        if self.demo == "shaped":
            names += ["shaping_gamma"]
        if self.sft:
            names += ["sft_coef"] + (["sft_agg"] if self.has_rl else [])
        if self.srft:
            names += ["srft_demo_coef", "srft_pos_coef"]
        return tuple(names)


# The mixed presets follow the HPT repository's runs (exp_scripts/train*.sh: grpo_use_std=False,
# loss_remove_clip, loss_remove_token_mean, entropy_coeff 0.001), and SFT token-mean (hpt.md).
_MIXED = Hparams(loss_agg="token-sum-norm", sft_agg="token-mean", entropy_coef=0.001)
PRESETS: dict[str, Preset] = {
    "sft": Preset(rollout=None, demo=None, sft=True, advantage=None, defaults=Hparams()),
    "reinforce": Preset(rollout="pi_theta", demo=None, sft=False, advantage="reinforce", defaults=Hparams()),
    "ppo": Preset(
        rollout="pi_old", demo=None, sft=False, advantage="gae", defaults=Hparams(clip_low=0.2, clip_high=0.2)
    ),
    "grpo": Preset(
        rollout="pi_old", demo=None, sft=False, advantage="grpo",
        defaults=Hparams(clip_low=0.2, clip_high=0.2, loss_agg="seq-mean-token-mean"),
    ),
    "dr_grpo": Preset(
        rollout="pi_old", demo=None, sft=False, advantage="dr_grpo",
        defaults=Hparams(clip_low=0.2, clip_high=0.2, loss_agg="token-sum-norm"),
    ),
    "dapo": Preset(
        rollout="pi_old", demo=None, sft=False, advantage="grpo", defaults=Hparams(clip_low=0.2, clip_high=0.28)
    ),
    "luffy": Preset(rollout="pi_old", demo="shaped", sft=False, advantage="dr_grpo", defaults=_MIXED),
    "srft": Preset(rollout="pi_theta", demo="shaped", sft=True, advantage="dr_grpo", defaults=_MIXED, srft=True),
    "hpt": Preset(rollout="pi_old", demo=None, sft=True, advantage="dr_grpo", defaults=_MIXED),
}


def _check_number(name: str, value, low: float, low_inclusive: bool = True, high: Optional[float] = None) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= low if low_inclusive else value > low) and (high is None or value < high)
    if not ok:
        bound = f"{'>=' if low_inclusive else '>'} {low}" + ("" if high is None else f" and < {high}")
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def _check_hparams(name: str, preset: Preset, hp: Hparams) -> None:
    for field in ("clip_low", "clip_high"):
        value = getattr(hp, field)
        if value is not None:
            _check_number(field, value, 0.0, True, 1.0 if field == "clip_low" else None)
    for field in ("loss_agg", "sft_agg"):
        value = getattr(hp, field)
        if value not in LOSS_AGGS and not (field == "sft_agg" and value is None):
            raise ValueError(f"unknown {field} {value!r}; known: {', '.join(LOSS_AGGS)}")
    for field in ("rl_coef", "sft_coef", "srft_demo_coef", "srft_pos_coef"):
        _check_number(field, getattr(hp, field), 0.0)
    _check_number("shaping_gamma", hp.shaping_gamma, 0.0, low_inclusive=False)
    if isinstance(hp.entropy_coef, bool) or not (
        isinstance(hp.entropy_coef, (int, float)) and math.isfinite(hp.entropy_coef)
    ):
        raise ValueError(f"entropy_coef must be a finite number, got {hp.entropy_coef!r}")
    L = hp.max_response_length
    if L is not None and (isinstance(L, bool) or not isinstance(L, int) or L < 1):
        raise ValueError(f"max_response_length must be a positive int, got {L!r}")
    used = {hp.loss_agg} | ({_sft_agg(hp)} if preset.sft else set())
    if "token-sum-norm" in used and L is None:
        raise ValueError(
            f"{name}: aggregation 'token-sum-norm' divides by max_response_length, which is not set; pass "
            f"max_response_length=<the rollout length limit> (the HPT paper: 8192) or another loss_agg"
        )


def _sft_agg(hp: Hparams) -> str:
    return hp.loss_agg if hp.sft_agg is None else hp.sft_agg


# ---- per-token loss ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Normalizers:
    """Token and sequence counts the aggregations divide by, per part.

    Computed by ``Estimator.normalizers`` on a whole mini-batch and passed to each micro-batch's
    call, they make the sum of the micro-batch losses equal the mini-batch loss exactly.
    Sequences count only rows with at least one valid token.
    """

    rl_tokens: int
    rl_seqs: int
    sft_tokens: int
    sft_seqs: int
    all_tokens: int


@dataclass(frozen=True)
class TokenInputs:
    """A batch's per-token inputs, flat [B*T] (float of the loss's dtype unless said); None where
    the preset has no such input or part.

    Attributes:
        demo: bool, the token belongs to a demonstration row.
        adv: A_hat of the RL part; old_logp: log pi_old (0 on demonstrations and padding).
        w_rl, w_sft, w_ent: per-token weights of the RL part, SFT part and entropy bonus,
            coefficients and aggregation included.
    """

    demo: Tensor
    adv: Optional[Tensor] = None
    old_logp: Optional[Tensor] = None
    w_rl: Optional[Tensor] = None
    w_sft: Optional[Tensor] = None
    w_ent: Optional[Tensor] = None


class TokenLoss:
    """The per-token loss of one batch: ``token_loss_fn`` for ``hpt_fast.fused_linear_loss``.

    Built by ``Estimator.prepare``; its ``TokenInputs`` are gathered by ``rows`` (indices into the
    flattened [B, T] batch) chunk by chunk.

    Attributes:
        rows: int64 [Nv], the valid tokens' flat indices, ascending.
        sft_fraction: 0-d, the fraction of the batch's rows that are demonstrations.
    """

    def __init__(self, est: "Estimator", rows: Tensor, inputs: TokenInputs, sft_fraction: Tensor) -> None:
        self.est = est
        self.rows = rows
        self.inputs = inputs
        self.sft_fraction = sft_fraction

    def _get(self, key: str, rows: Tensor, dtype: torch.dtype) -> Optional[Tensor]:
        t = getattr(self.inputs, key)
        return None if t is None else t.index_select(0, rows).to(dtype)

    def _rl_term(self, logp: Tensor, rows: Tensor) -> Tensor:
        """-A * s per token [C], s the row kind's reference surrogate, stabilized on "pi_old" rows."""
        preset, hp = self.est.preset, self.est.hparams
        adv = self._get("adv", rows, logp.dtype)
        old = self._get("old_logp", rows, logp.dtype)
        s = None
        if preset.rollout is not None:
            s = REFERENCES[preset.rollout](logp, old, hp.shaping_gamma)
            if preset.rollout == "pi_old":
                # -min(rho*A, clip(rho)*A): a clipped token's value is the constant clip(rho)*A
                lo = -math.inf if hp.clip_low is None else 1 - hp.clip_low
                hi = math.inf if hp.clip_high is None else 1 + hp.clip_high
                keep = stable_mask(s.detach(), adv, hp.clip_low, hp.clip_high)
                s = torch.where(keep, s, s.detach().clamp(lo, hi))
        if preset.demo is not None:
            s_demo = REFERENCES[preset.demo](logp, old, hp.shaping_gamma)
            s = s_demo if s is None else torch.where(self._get("demo", rows, torch.bool), s_demo, s)
        return -adv * s

    def parts(self, logp: Tensor, entropy: Optional[Tensor], rows: Tensor) -> dict[str, Tensor]:
        """Per-token contributions [C] of each part: "rl", "sft", "entropy" (where present)."""
        out = {}
        if self.inputs.w_rl is not None:
            out["rl"] = self._get("w_rl", rows, logp.dtype) * self._rl_term(logp, rows)
        if self.inputs.w_sft is not None:
            out["sft"] = self._get("w_sft", rows, logp.dtype) * -logp
        if self.inputs.w_ent is not None:
            out["entropy"] = -self._get("w_ent", rows, logp.dtype) * entropy
        return out

    def __call__(self, logp: Tensor, entropy: Optional[Tensor], rows: Tensor) -> Tensor:
        """Per-token losses [C] for tokens ``rows`` [C] with log-probs ``logp`` [C] (and entropies [C])."""
        return sum(self.parts(logp, entropy, rows).values(), torch.zeros_like(logp))

    def stats(self, logp: Tensor, entropy: Optional[Tensor]) -> dict[str, Tensor]:
        """Detached 0-d statistics from the valid tokens' logp [Nv] (and entropy [Nv] or None), in
        ``self.rows`` order. Tensors, not floats, so a GPU trainer only syncs when it logs.
        """
        with torch.no_grad():
            logp = logp.detach()
            entropy = None if entropy is None else entropy.detach()
            out = {f"{k}_loss": v.sum() for k, v in self.parts(logp, entropy, self.rows).items()}
            out["sft_fraction"] = self.sft_fraction
            if entropy is not None and entropy.numel():
                out["entropy_mean"] = entropy.mean()
            if self.est.preset.rollout == "pi_old":
                out.update(self._ratio_stats(logp))
        return out

    def _ratio_stats(self, logp: Tensor) -> dict[str, Tensor]:
        rollout = ~self._get("demo", self.rows, torch.bool)
        if not bool(rollout.any()):
            return {}
        rows = self.rows[rollout]
        lp = logp[rollout]
        old = self._get("old_logp", rows, lp.dtype)
        ratio = _surrogate_pi_old(lp, old, 0.0)
        hp = self.est.hparams
        stable = stable_mask(ratio, self._get("adv", rows, lp.dtype), hp.clip_low, hp.clip_high)
        out = {
            "clip_fraction": (~stable).to(lp.dtype).mean(),
            "ratio_mean": ratio.mean(),
            "ratio_max": ratio.max(),
        }
        if old is not None:
            out["approx_kl"] = (old - lp).mean()
        return out


# ---- input checks ------------------------------------------------------------------------------


def _as_mask(mask: Tensor) -> Tensor:
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a [B, T] tensor, got {got}")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must be bool or hold only 0 and 1")
        mask = mask != 0
    return mask


def _check_tensor(name: str, t, shapes: tuple[tuple[int, ...], ...], mask_shape) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) not in shapes:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)} but mask has shape {tuple(mask_shape)}; expected "
            + " or ".join(str(s) for s in shapes)
        )


def _check_finite(name: str, t: Tensor, where: Tensor) -> None:
    """Raise if ``t`` [B, T] is NaN or inf at any position where ``where`` [B, T] is True."""
    bad = where & ~torch.isfinite(t)
    if bool(bad.any()):
        b, s = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} is {float(t[b, s])} at row {b}, position {s} (a valid token)")


def _flat(t: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, T] -> contiguous [B*T] of ``dtype``, ready for per-chunk gathers."""
    return t.reshape(-1).to(dtype).contiguous()


# ---- the estimator -----------------------------------------------------------------------------


class Estimator:
    """A preset with its settings; callable as the loss on per-token log-probs.

    Attributes:
        name: the preset's name; preset: its ``Preset``; hparams: its ``Hparams``.
        needs_entropy: whether the per-token entropy is an input (entropy bonus or SRFT).
        needs_sequence_stats: whether the loss needs whole-sequence statistics before any token's
            loss (SRFT): such an estimator cannot run in the fused op's mode B.
    """

    def __init__(self, name: str, preset: Preset, hparams: Hparams) -> None:
        self.name, self.preset, self.hparams = name, preset, hparams
        self.needs_sequence_stats = preset.srft
        self.needs_entropy = preset.srft or hparams.entropy_coef != 0

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={getattr(self.hparams, k)!r}" for k in self.preset.accepted)
        return f"Estimator({self.name!r}, {settings})"

    def _row_kinds(self, mask: Tensor, off_policy: Optional[Tensor]) -> Tensor:
        """bool [B]: True for demonstration rows, after checking this preset accepts them."""
        B = mask.shape[0]
        if off_policy is None:
            return torch.full((B,), self.preset.rollout is None, dtype=torch.bool, device=mask.device)
        _check_tensor("off_policy", off_policy, ((B,),), mask.shape)
        if off_policy.dtype != torch.bool:
            raise TypeError(f"off_policy must be a bool tensor [B], got {off_policy.dtype}")
        off_policy = off_policy.to(mask.device)
        if not self.preset.takes_demos and bool(off_policy.any()):
            raise ValueError(
                f"{self.name} is on-policy only, but off_policy marks rows "
                f"{off_policy.nonzero().squeeze(1).tolist()[:8]} as demonstrations; use a mixed preset "
                f"(hpt, luffy, srft) or sft"
            )
        if self.preset.rollout is None and not bool(off_policy.all()):
            raise ValueError(f"{self.name} trains on demonstrations only, but off_policy has rollout (False) rows")
        return off_policy

    def _rl_rows(self, demo: Tensor) -> Tensor:
        """bool [B]: rows in the RL part (rollouts under a rollout term, demonstrations under a demo term)."""
        rows = torch.zeros_like(demo)
        if self.preset.rollout is not None:
            rows |= ~demo
        if self.preset.demo is not None:
            rows |= demo
        return rows

    def normalizers(self, mask: Tensor, off_policy: Optional[Tensor] = None) -> Normalizers:
        """Counts of a (mini-)batch for the aggregations; mask [B, T], off_policy bool [B] or None."""
        mask = _as_mask(mask)
        demo = self._row_kinds(mask, off_policy)
        rl = self._rl_rows(demo)
        has_tok = mask.any(1)
        return Normalizers(
            rl_tokens=int(mask[rl].sum()),
            rl_seqs=int((has_tok & rl).sum()),
            sft_tokens=int(mask[demo].sum()) if self.preset.sft else 0,
            sft_seqs=int((has_tok & demo).sum()) if self.preset.sft else 0,
            all_tokens=int(mask.sum()),
        )

    def check_inputs(
        self,
        mask: Tensor,
        advantages: Optional[Tensor] = None,
        *,
        old_logp: Optional[Tensor] = None,
        off_policy: Optional[Tensor] = None,
        rewards: Optional[Tensor] = None,
        normalizers: Optional[Normalizers] = None,
    ) -> tuple[Tensor, Tensor, Normalizers]:
        """Raise a clear error for any batch input this preset cannot take (arguments as in ``prepare``).

        Returns:
            mask: bool [B, T]; demo: bool [B], the demonstration rows; the normalizers to use.
        """
        mask = _as_mask(mask)
        B, T = mask.shape
        demo = self._row_kinds(mask, off_policy)
        local = self.normalizers(mask, demo)
        norm = local if normalizers is None else self._check_normalizers(normalizers, local)
        if self.preset.has_rl:
            if advantages is None:
                raise ValueError(f"{self.name} needs advantages [B] or [B, T]")
            _check_tensor("advantages", advantages, ((B,), (B, T)), mask.shape)
            if not advantages.is_floating_point():
                raise TypeError(f"advantages must be floating point, got {advantages.dtype}")
            _check_finite("advantages", advantages if advantages.dim() == 2 else advantages[:, None].expand(B, T), mask)
        if self.preset.rollout == "pi_old" and old_logp is not None:
            _check_tensor("old_logp", old_logp, ((B, T),), mask.shape)
            _check_finite("old_logp", old_logp, mask & ~demo[:, None])
        if self.preset.srft:
            if rewards is None:
                raise ValueError(f"{self.name} needs rewards [B] to tell correct rollouts (reward > 0) from wrong ones")
            _check_tensor("rewards", rewards, ((B,),), mask.shape)
        return mask, demo, norm

    def _check_normalizers(self, given: Normalizers, local: Normalizers) -> Normalizers:
        if not isinstance(given, Normalizers):
            raise TypeError(f"normalizers must be a Normalizers from Estimator.normalizers, got {type(given).__name__}")
        for f in fields(Normalizers):
            if getattr(given, f.name) < getattr(local, f.name):
                raise ValueError(
                    f"normalizers.{f.name} = {getattr(given, f.name)} is smaller than this batch's own "
                    f"count {getattr(local, f.name)}: they were computed on a different batch"
                )
        return given

    def prepare(
        self,
        mask: Tensor,
        advantages: Optional[Tensor] = None,
        *,
        old_logp: Optional[Tensor] = None,
        off_policy: Optional[Tensor] = None,
        entropy: Optional[Tensor] = None,
        rewards: Optional[Tensor] = None,
        normalizers: Optional[Normalizers] = None,
        dtype: torch.dtype = torch.float32,
    ) -> TokenLoss:
        """Check the batch's inputs and build its per-token loss.

        Args:
            mask: [B, T] bool (or 0/1), True at the response tokens that count.
            advantages: float [B] (per sequence) or [B, T] (per token, e.g. GAE); needed by every
                preset but sft. For demonstration rows: used by the shaped term, ignored by the SFT part.
            old_logp: float [B, T], log-probs of the policy that sampled the rollouts; used by the
                "pi_old" presets only. None: pi_old = sg(pi_theta) (ratio 1, one update per batch).
            off_policy: bool [B], True for demonstration rows (see module docstring for None).
            entropy: float [B, T], per-token entropy; read here by SRFT only (its sequence weights).
            rewards: float [B]; SRFT only: a rollout is correct when its reward is > 0.
            normalizers: counts from ``normalizers`` over a whole mini-batch; None: this batch's.
            dtype: float32 or float64, the dtype of the per-token inputs.
        Returns:
            TokenLoss, the ``token_loss_fn`` for mode B.
        """
        mask, demo, norm = self.check_inputs(
            mask, advantages, old_logp=old_logp, off_policy=off_policy, rewards=rewards, normalizers=normalizers
        )
        B, T = mask.shape
        hp, preset = self.hparams, self.preset
        seq_h = self._sequence_entropy(mask, entropy, dtype) if preset.srft else None
        found: dict[str, Tensor] = {}
        if preset.has_rl:
            found["adv"] = self._advantages(advantages, mask, demo, rewards, seq_h, dtype)
            found["w_rl"] = hp.rl_coef * aggregation_weights(
                hp.loss_agg, mask, self._rl_rows(demo), norm.rl_tokens, norm.rl_seqs, hp.max_response_length, dtype
            )
        if preset.rollout == "pi_old" and old_logp is not None:
            # demonstrations have no sampling policy: 0 keeps their unused ratio finite
            found["old_logp"] = old_logp.to(mask.device).masked_fill(demo[:, None] | ~mask, 0.0)
        if preset.sft:
            w_sft = hp.sft_coef * aggregation_weights(
                _sft_agg(hp), mask, demo, norm.sft_tokens, norm.sft_seqs, hp.max_response_length, dtype
            )
            found["w_sft"] = w_sft * (hp.srft_demo_coef * torch.exp(-seq_h))[:, None] if preset.srft else w_sft
        if hp.entropy_coef != 0:
            every_row = torch.ones_like(demo)
            found["w_ent"] = hp.entropy_coef * aggregation_weights(
                "token-mean", mask, every_row, norm.all_tokens, 0, None, dtype
            )
        inputs = TokenInputs(
            demo=demo[:, None].expand(B, T).reshape(-1), **{k: _flat(v, dtype) for k, v in found.items()}
        )
        rows = mask.reshape(-1).nonzero().squeeze(1)
        return TokenLoss(self, rows, inputs, demo.to(dtype).mean())

    def _sequence_entropy(self, mask: Tensor, entropy: Optional[Tensor], dtype) -> Tensor:
        """SRFT's H: stop-grad mean entropy of each row's valid tokens, [B]."""
        if entropy is None:
            raise ValueError(f"{self.name} weights its terms by each sequence's mean entropy: pass entropy [B, T]")
        _check_tensor("entropy", entropy, (tuple(mask.shape),), mask.shape)
        _check_finite("entropy", entropy, mask)
        m = mask.to(dtype)
        return (entropy.detach().to(dtype) * m).sum(1) / m.sum(1).clamp_min(1)

    def _advantages(self, advantages: Tensor, mask: Tensor, demo: Tensor, rewards, seq_h, dtype) -> Tensor:
        """A_hat per token [B, T]: the given advantages, or SRFT's weights on its rollout rows."""
        B, T = mask.shape
        adv = advantages.to(mask.device, dtype)
        adv = adv[:, None].expand(B, T) if adv.dim() == 1 else adv
        if not self.preset.srft:
            return adv
        w = torch.where(is_correct(rewards.to(mask.device)), self.hparams.srft_pos_coef * torch.exp(seq_h), -1.0)
        return torch.where(demo[:, None], adv, w.to(dtype)[:, None])

    def __call__(
        self,
        logp: Tensor,
        mask: Tensor,
        advantages: Optional[Tensor] = None,
        *,
        old_logp: Optional[Tensor] = None,
        off_policy: Optional[Tensor] = None,
        entropy: Optional[Tensor] = None,
        rewards: Optional[Tensor] = None,
        normalizers: Optional[Normalizers] = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss from per-token log-probs: the sum over valid tokens of ``TokenLoss``.

        Args:
            logp: float [B, T], log pi_theta of each target token (e.g. from fused_token_logprobs),
                differentiable; values at masked positions are never read.
            entropy: float [B, T], differentiable; required when ``needs_entropy``, else only logged.
            mask, advantages, old_logp, off_policy, rewards, normalizers: as in ``prepare``.
        Returns:
            loss: 0-d, float64 for float64 logp, else float32; stats: dict of detached 0-d tensors:
            the part losses "rl_loss" / "sft_loss" / "entropy_loss" (summing to the loss),
            "sft_fraction", "entropy_mean" (when entropy is given), and for "pi_old" presets
            "clip_fraction", "ratio_mean", "ratio_max", "approx_kl" (with old_logp).
        """
        mask = _as_mask(mask)
        if not isinstance(logp, Tensor) or not logp.is_floating_point():
            got = logp.dtype if isinstance(logp, Tensor) else type(logp).__name__
            raise TypeError(f"logp must be a floating-point torch.Tensor, got {got}")
        _check_tensor("logp", logp, (tuple(mask.shape),), mask.shape)
        if entropy is None and self.needs_entropy:
            raise ValueError(f"{self.name} needs entropy [B, T] (entropy_coef={self.hparams.entropy_coef})")
        if entropy is not None:
            _check_tensor("entropy", entropy, (tuple(mask.shape),), mask.shape)
        dtype = torch.float64 if logp.dtype == torch.float64 else torch.float32
        token_loss = self.prepare(
            mask, advantages, old_logp=old_logp, off_policy=off_policy,
            entropy=entropy, rewards=rewards, normalizers=normalizers, dtype=dtype,
        )
        rows = token_loss.rows
        lp = logp.reshape(-1).index_select(0, rows).to(dtype)
        ent = None if entropy is None else entropy.reshape(-1).index_select(0, rows).to(dtype)
        loss = token_loss(lp, ent, rows).sum()
        return loss, token_loss.stats(lp, ent)


def get_estimator(name: str, **hparams) -> Estimator:
    """The preset ``name`` (one of ``PRESETS``) with some ``Hparams`` fields overridden.

    Raises ValueError for an unknown preset or a bad setting, TypeError for a setting the preset
    does not use.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown estimator preset {name!r}; known: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    unused = sorted(set(hparams) - set(preset.accepted))
    if unused:
        raise TypeError(f"{name} does not take {', '.join(unused)}; it takes: {', '.join(preset.accepted)}")
    hp = replace(preset.defaults, **hparams)
    _check_hparams(name, preset, hp)
    return Estimator(name, preset, hp)


# ---- the README's table ------------------------------------------------------------------------

_ADVANTAGE_TEXT = {
    "grpo": "(r - mean) / std over the prompt's group",
    "dr_grpo": "r - mean over the prompt's group",
    "reinforce": "r",
    "gae": "GAE from a critic (per token, supplied)",
}
_REFERENCE_TEXT = {"pi_theta": "sg(pi_theta)", "pi_old": "pi_old", "shaped": "1, shaped: f(pi) = pi / (pi + {gamma:g})"}
_LOSS_TEXT = {"pi_theta": "-A * logp", "pi_old": "-A * rho", "shaped": "-A * f(pi)"}


def _clip_text(hp: Hparams) -> str:
    if hp.clip_low is None and hp.clip_high is None:
        return "1"
    lo = "0" if hp.clip_low is None else f"{1 - hp.clip_low:g}"
    hi = "inf" if hp.clip_high is None else f"{1 + hp.clip_high:g}"
    return f"PPO clip: rho in [{lo}, {hi}] in the direction A pushes"


def _agg_text(agg: str, coef: float) -> str:
    scale = "" if coef == 1 else f"{coef:g} * "
    return f"{scale}{agg} (w = {AGG_WEIGHTS[agg]})"


def describe(name: str) -> list[tuple[str, ...]]:
    """The components of preset ``name`` at its defaults, one tuple per row kind and part:
    (rows, stabilization mask, reference denominator, advantage, per-token loss, aggregation)."""
    preset = PRESETS[name]
    hp = preset.defaults
    rl = []
    if preset.rollout is not None:
        stable = _clip_text(hp) if preset.rollout == "pi_old" else "1"
        loss = "-min(rho * A, clip(rho) * A)" if stable != "1" else _LOSS_TEXT[preset.rollout]
        if preset.srft:
            adv = f"{hp.srft_pos_coef:g} * exp(H) if correct, else -1"
        else:
            adv = _ADVANTAGE_TEXT[preset.advantage]
        rl.append(("rollouts", stable, _REFERENCE_TEXT[preset.rollout], adv, loss))
    if preset.demo is not None:
        adv = _ADVANTAGE_TEXT[preset.advantage].replace("group", "group (demonstration included)")
        rl.append((
            "demonstrations", "1", _REFERENCE_TEXT[preset.demo].format(gamma=hp.shaping_gamma), adv,
            _LOSS_TEXT[preset.demo],
        ))
    rows = [r + (_agg_text(hp.loss_agg, hp.rl_coef),) for r in rl]
    if preset.sft:
        adv = f"{hp.srft_demo_coef:g} * exp(-H)" if preset.srft else "1"
        part = "demonstrations (SFT part)" if preset.has_rl else "demonstrations"
        rows.append((part, "1", "sg(pi_theta)", adv, "-A * logp", _agg_text(_sft_agg(hp), hp.sft_coef)))
    return rows


def preset_table() -> str:
    """Markdown table of every preset's components at its defaults (the README's preset table)."""
    head = ("preset", "rows", "stabilization mask", "reference denominator pi_ref", "advantage A_hat",
            "per-token loss", "aggregation", "entropy bonus")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, preset in PRESETS.items():
        for i, row in enumerate(describe(name)):
            first = (f"`{name}`" if i == 0 else "",)
            bonus = (f"{preset.defaults.entropy_coef:g}" if i == 0 else "",)
            lines.append("| " + " | ".join(first + row + bonus) + " |")
    return "\n".join(lines)
