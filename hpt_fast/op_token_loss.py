"""Mode B's per-token loss: the caller's ``token_loss_fn`` evaluated and differentiated on
per-token tensors [C] (a token chunk, or all N scored tokens at once in vocabulary order), and
the check that its values and gradients are finite.

d loss / d logp and d loss / d entropy per token are all the gradient pass needs of it.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

# (logp [C], entropy [C] or None, rows [C]) -> losses [C]; see ops.fused_linear_loss
TokenLossFn = Callable[[Tensor, Optional[Tensor], Tensor], Tensor]

_DETACHED_LOSS_WARNING = (
    "token_loss_fn returned losses with no autograd graph back to its logp / entropy arguments "
    "(detached, or computed outside torch): they are constant, so the input gradients are zero"
)


def _pack_saved(t: Tensor) -> tuple[Tensor, int]:
    return t, t._version


def _unpack_saved(packed: tuple[Tensor, int]) -> Tensor:
    t, version = packed
    if t._version != version:
        # what autograd itself reports when no hook is installed
        raise RuntimeError("token_loss_fn modified in place a tensor that its loss's gradient needs")
    return t


def _own_saved_tensors() -> contextlib.AbstractContextManager:
    """Saved-tensor hooks that keep token_loss_fn's tensors as they are. The caller's hooks are for
    its own graph; this one is built and differentiated here, chunk by chunk, so under a
    non-reentrant ``torch.utils.checkpoint`` each of its unpacks would rerun the whole checkpointed
    region (once per chunk, in the forward), and ``save_on_cpu`` would copy every chunk's tensors."""
    return torch.autograd.graph.saved_tensors_hooks(_pack_saved, _unpack_saved)


# per-token status codes of token_loss_grads
_LOGITS_NOT_FINITE = 1
_LOSS_NOT_FINITE = 2


def token_loss_grads(
    token_loss_fn: TokenLossFn, logp: Tensor, entropy: Optional[Tensor], rows: Tensor, differentiate: bool
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Tensor]:
    """Evaluate the per-token loss on C tokens (a token chunk, or all N scored tokens in vocabulary
    order) and, with ``differentiate``, differentiate it w.r.t. logp and entropy.

    Returns (losses [C], g_logp [C] or None, g_ent [C] or None) in logp's dtype, and status [C]
    uint8: ``_LOGITS_NOT_FINITE`` where logp or entropy already was (NaN / inf logits), else
    ``_LOSS_NOT_FINITE`` where the loss or a gradient is, else 0. The caller checks it once per
    call of the op, not per chunk: reading it on the host waits for the device. Without
    ``differentiate`` (no input gradient wanted) there is no gradient to compute or check.
    """
    with torch.enable_grad() if differentiate else contextlib.nullcontext(), _own_saved_tensors():
        lp = logp.detach().requires_grad_(differentiate)
        ent = None if entropy is None else entropy.detach().requires_grad_(differentiate)
        # copies, not the leaves: the function may work on its inputs in place, as on any tensor
        try:
            losses = token_loss_fn(lp.clone(), None if ent is None else ent.clone(), rows)
        except (TypeError, AttributeError) as exc:
            if ent is not None or "NoneType" not in str(exc):
                raise
            raise type(exc)(f"token_loss_fn raised {type(exc).__name__}: {exc} (its entropy argument is "
                            "None: pass with_entropy=True for a loss that uses it)") from exc
        if not isinstance(losses, Tensor):
            raise TypeError(f"token_loss_fn must return a Tensor, got {type(losses).__name__}")
        if tuple(losses.shape) != tuple(lp.shape):
            raise ValueError(
                f"token_loss_fn must return per-token losses of shape {tuple(lp.shape)}, "
                f"got {tuple(losses.shape)}"
            )
        if not losses.is_floating_point():
            raise TypeError(f"token_loss_fn must return a float tensor, got {losses.dtype}")
        inputs = [lp] if ent is None else [lp, ent]
        grads = (None, None)
        losses = losses.to(lp.dtype)
        if differentiate and losses.requires_grad:
            grads = torch.autograd.grad(losses.sum(), inputs, allow_unused=True)
        if differentiate and all(g is None for g in grads):
            # e.g. built from .item() / .tolist() / numpy, or detached (a graph through other
            # tensors only): constant in logp / entropy, so zero gradients, which is legitimate
            # but more often a mistake than meant
            warnings.warn(_DETACHED_LOSS_WARNING, stacklevel=2)
    g_logp = None
    if differentiate:
        g_logp = torch.zeros_like(logp) if grads[0] is None else grads[0]
    g_ent = grads[1] if len(grads) > 1 else None
    loss_ok = torch.isfinite(losses)
    for g in (g_logp, g_ent):
        if g is not None:
            loss_ok &= torch.isfinite(g)
    logits_ok = torch.isfinite(logp) if entropy is None else torch.isfinite(logp) & torch.isfinite(entropy)
    status = torch.where(logits_ok, torch.where(loss_ok, 0, _LOSS_NOT_FINITE), _LOGITS_NOT_FINITE)
    return losses.detach(), g_logp, g_ent, status.to(torch.uint8)


def check_finite(status: Tensor, rows: Tensor) -> None:
    """Raise FloatingPointError naming the first rows (indices into the flat targets) whose logits
    or token_loss_fn value or gradient were not finite; status: [N] uint8 from token_loss_grads,
    rows: [N] int64. Non-finite logits are named as the cause first: the loss of a NaN logp is
    NaN whatever token_loss_fn does."""
    if not bool(status.any()):
        return
    for code, what in (
        (_LOGITS_NOT_FINITE, "the logits are not finite (NaN / inf in hidden, weight or bias, or a "
                             "float16 overflow), so logp / entropy are not,"),
        (_LOSS_NOT_FINITE, "token_loss_fn returned a non-finite loss or gradient"),
    ):
        bad = rows[status == code]
        if bad.numel():
            raise FloatingPointError(
                f"{what} for token rows {bad[:8].tolist()}{'...' if bad.numel() > 8 else ''}"
            )
