"""FusedUnifiedLoss: hidden states + lm_head -> fused log-probs -> the estimator's loss.

A drop-in loss module for any trainer: it never builds the [tokens x vocab] logits. Estimators that
work token by token run in the fused op's mode B (``fused_linear_loss``: three GEMMs, the input
gradients computed during the forward), with the estimator's ``TokenLoss`` as the per-token loss.
Estimators that need whole-sequence statistics first (SRFT: ``needs_sequence_stats``) run in
mode A (``fused_token_logprobs``, whose backward recomputes the logits: four GEMMs) followed by
the estimator on the per-token outputs. Entropy is computed only when the estimator reads it.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from hpt_fast.estimator import Estimator, Normalizers, get_estimator
from hpt_fast.ops import fused_linear_loss, fused_token_logprobs

IGNORE_INDEX = -100


def _check_batch(hidden: Tensor, targets: Tensor, mask: Tensor) -> None:
    """Shapes of the [B, T] batch, and targets ignored exactly where the mask is 0."""
    for name, t in (("hidden", hidden), ("targets", targets), ("mask", mask)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"targets has shape {tuple(targets.shape)} but hidden is {tuple(hidden.shape)}; "
            f"expected [B, T] = {tuple(hidden.shape[:2])}"
        )
    if tuple(mask.shape) != tuple(targets.shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but targets has shape {tuple(targets.shape)}")
    if not (hidden.device == targets.device == mask.device):
        raise ValueError(
            f"hidden, targets and mask must be on one device, got {hidden.device}, {targets.device}, {mask.device}"
        )
    scored = targets != IGNORE_INDEX
    mismatch = scored != (mask != 0)
    if bool(mismatch.any()):
        b, t = (int(i) for i in mismatch.nonzero()[0])
        raise ValueError(
            f"targets must be {IGNORE_INDEX} exactly where mask is 0; at row {b}, position {t} the "
            f"target is {int(targets[b, t])} and the mask is {mask[b, t].item()}"
        )


class FusedUnifiedLoss(nn.Module):
    """The unified estimator's loss straight from hidden states and the output embedding.

    Runs the fused op's mode B with the estimator's ``TokenLoss`` as ``token_loss_fn`` (three GEMMs
    for the loss and all its gradients); an estimator with ``needs_sequence_stats`` (SRFT) runs on
    mode A's per-token outputs instead (four GEMMs).

    Args:
        estimator: an ``Estimator`` (``get_estimator(...)``) or a preset name taking no settings.
        temperature: logits are ``(hidden @ weight.T + bias) / temperature`` (the sampling temperature).
        chunk_size: tokens per logits block; None: chosen from the fused op's memory budget.
        backend: the fused op's backend: "auto", "torch", "cpu" or "triton".
        grad_order: the fused op's loop order: "auto", "tokens" or "vocab".
        accum_dtype: how a bfloat16 / float16 grad_weight is summed over token chunks:
            torch.float32 (a float32 [V, H] buffer) or None (in grad_weight itself); see
            ``fused_token_logprobs``.
        softcap: None, or the model's logit soft cap c (logits ``c * tanh(logits / c)`` before the
            temperature: Gemma 2's ``final_logit_softcapping``).
    """

    def __init__(
        self,
        estimator: Union[Estimator, str],
        temperature: float = 1.0,
        chunk_size: Optional[int] = None,
        backend: str = "auto",
        grad_order: str = "auto",
        accum_dtype: Optional[torch.dtype] = torch.float32,
        softcap: Optional[float] = None,
    ) -> None:
        super().__init__()
        self.estimator = get_estimator(estimator) if isinstance(estimator, str) else estimator
        if not isinstance(self.estimator, Estimator):
            raise TypeError(f"estimator must be an Estimator or a preset name, got {type(estimator).__name__}")
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.backend = backend
        self.grad_order = grad_order
        self.accum_dtype = accum_dtype
        self.softcap = softcap

    def extra_repr(self) -> str:
        return (
            f"{self.estimator!r}, temperature={self.temperature}, chunk_size={self.chunk_size}, "
            f"backend={self.backend!r}, grad_order={self.grad_order!r}, accum_dtype={self.accum_dtype}, "
            f"softcap={self.softcap}"
        )

    # one opaque call under torch.compile, as mode B: tracing into the batch checks and the
    # estimator's input checks broke a compiled step's graph 12-18 times per call
    @torch.compiler.disable
    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        mask: Tensor,
        advantages: Optional[Tensor] = None,
        *,
        bias: Optional[Tensor] = None,
        old_logp: Optional[Tensor] = None,
        off_policy: Optional[Tensor] = None,
        rewards: Optional[Tensor] = None,
        normalizers: Optional[Normalizers] = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one batch of responses.

        Args:
            hidden: [B, T, H] float32 / bfloat16 / float16 (float64 with backend "torch"), the
                final hidden state at each position that predicts ``targets``.
            weight: [V, H], the output embedding (lm_head.weight), hidden's dtype (under
                ``torch.autocast`` any float dtype, e.g. float32 with bf16 hidden: see
                ``fused_token_logprobs``).
            targets: [B, T] int64, the next token ids; -100 exactly where ``mask`` is 0.
            mask: [B, T] bool (or 0/1), the response tokens that count.
            advantages: float [B] or [B, T]; old_logp: float [B, T]; off_policy: bool [B];
                rewards: float [B] (SRFT); normalizers: mini-batch counts. See ``Estimator.prepare``.
            bias: [V] or None, the output bias (lm_head.bias), hidden's dtype.
        Returns:
            loss: 0-d float32 (float64 for float64 hidden), differentiable w.r.t. hidden, weight, bias;
            stats: dict of detached 0-d tensors (see ``Estimator.__call__``).
        """
        _check_batch(hidden, targets, mask)
        est = self.estimator
        op_args = dict(
            bias=bias, temperature=self.temperature, ignore_index=IGNORE_INDEX,
            backend=self.backend, chunk_size=self.chunk_size, grad_order=self.grad_order,
            accum_dtype=self.accum_dtype, softcap=self.softcap,
        )
        batch = dict(old_logp=old_logp, off_policy=off_policy, rewards=rewards, normalizers=normalizers)
        if est.needs_sequence_stats:
            # mode A runs the GEMMs before the estimator sees the batch: check it first
            est.check_inputs(mask, advantages, **batch)
            logp, entropy = fused_token_logprobs(hidden, weight, targets, return_entropy=True, **op_args)
            return est(logp, mask, advantages, entropy=entropy, **batch)
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        token_loss = est.prepare(mask, advantages, dtype=dtype, **batch)
        loss, logp, entropy = fused_linear_loss(
            hidden, weight, targets, token_loss, with_entropy=est.needs_entropy, **op_args
        )
        rows = token_loss.rows
        valid_entropy = None if entropy is None else entropy.reshape(-1).index_select(0, rows)
        return loss, token_loss.stats(logp.reshape(-1).index_select(0, rows), valid_entropy)
