"""The fused linear + log-prob / entropy op, in two modes, never materialising [tokens x vocab].

Mode A, ``fused_token_logprobs``: per-token log-probabilities (and entropies) with autograd; the
backward recomputes the logits block by block (four GEMMs in all).

Mode B, ``fused_linear_loss``: a scalar sum of an arbitrary per-token loss of (logp, entropy); the
gradients for hidden, weight and bias are computed during the forward pass, block by block, and
backward only scales them (three GEMMs in all).

Both modes share one chunk loop: a block of logits ``[C, V]`` comes from a GEMM into a reused
buffer, a backend's ``row_stats`` reduces it to per-row statistics, ``grad_logits`` turns it into
its own gradient in place, then two GEMMs give the chunk's share of the input gradients. For any
per-token loss, d loss / d logits = (1/T) * [g_logp * (onehot - p) - g_ent * p * (log p + H)], so
the backends only ever need the two per-token scalars g_logp and g_ent.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from hpt_fast import backends

TokenLossFn = Callable[[Tensor, Optional[Tensor], Tensor], Tensor]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# The logits block's budget; the default keeps extra memory well under the naive logits'
# size at LLM vocabularies while leaving the GEMMs large enough to run at full speed.
_DEFAULT_BUDGET_MB = 128
# The torch backend holds about four float32 temporaries of the block's size at once.
_TORCH_BACKEND_EXTRA_BYTES = 16


@dataclass(frozen=True)
class _Plan:
    """How one call runs: backend module, temperature and chunking."""

    backend: object
    inv_temp: float
    chunk: int


def _check_inputs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    temperature: float,
    ignore_index: int,
    chunk_size: Optional[int],
) -> None:
    """Raise a clear error for any argument the op cannot take, before any work starts."""
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16, float16 or float64, got {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., H], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H], got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"hidden size mismatch: hidden is {tuple(hidden.shape)} (H={hidden.shape[-1]}) but "
            f"weight is {tuple(weight.shape)} (H={weight.shape[1]})"
        )
    if weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(f"weight must have V >= 1 and H >= 1, got {tuple(weight.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 (or int32), got {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal hidden's leading shape "
            f"{tuple(hidden.shape[:-1])}"
        )
    devices = {hidden.device, weight.device, targets.device}
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V]=({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from weight dtype {weight.dtype}")
        devices.add(bias.device)
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _valid_rows(targets: Tensor, ignore_index: int, vocab: int) -> Optional[Tensor]:
    """Flat indices of the non-ignored targets, or None when every position is valid.

    Raises for ids outside [0, V): the kernels index by them and must never read out of bounds.
    """
    flat = targets.reshape(-1)
    valid = flat != ignore_index
    bad = valid & ((flat < 0) | (flat >= vocab))
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"target id {int(flat[pos])} at flat position {pos} is outside [0, {vocab}) and is not "
            f"ignore_index ({ignore_index})"
        )
    if bool(valid.all()):
        return None
    return valid.nonzero().squeeze(1)


def _plan(backend: str, hidden: Tensor, vocab: int, n_rows: int, chunk_size: Optional[int], temperature: float) -> _Plan:
    if hidden.dtype == torch.float64:
        # float64 is the reference / gradcheck dtype: only the readable backend computes in it
        if backend not in ("auto", "torch"):
            raise TypeError(f"backend {backend!r} takes float32, bfloat16 or float16; float64 runs on 'torch'")
        backend = "torch"
    name, module = backends.resolve(backend, hidden.device)
    if chunk_size is None:
        budget = float(os.environ.get("HPT_FAST_MEMORY_BUDGET_MB", _DEFAULT_BUDGET_MB)) * 2**20
        per_row = vocab * (hidden.element_size() + (_TORCH_BACKEND_EXTRA_BYTES if name == "torch" else 0))
        chunk_size = max(1, int(budget // per_row))
    return _Plan(backend=module, inv_temp=1.0 / temperature, chunk=max(1, min(chunk_size, n_rows)))


def _logits_block(h: Tensor, weight: Tensor, bias: Optional[Tensor], out: Tensor) -> Tensor:
    """out[C, V] = h @ weight.T (+ bias), in the inputs' dtype with float32 accumulation."""
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


class _ParamGrads:
    """Accumulates grad_weight [V, H] and grad_bias [V] over token chunks.

    Float32 inputs accumulate in place through the GEMM itself (beta = 1). Low-precision inputs
    with several chunks accumulate in a float32 buffer, so the sum is rounded once at the end
    instead of once per chunk.
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor], n_chunks: int, want_w: bool, want_b: bool, backend) -> None:
        self.backend = backend
        self.want_w, self.want_b = want_w, want_b
        self.lowp = weight.dtype in (torch.bfloat16, torch.float16) and n_chunks > 1
        self.first = True
        self.grad_w = torch.empty_like(weight) if want_w else None
        self.acc_w = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if want_w and self.lowp else None
        self.tmp_w = self.grad_w if self.lowp else None
        self.acc_b = torch.zeros(weight.shape[0], dtype=_stat_dtype(weight), device=weight.device) if want_b else None
        self.bias_dtype = None if bias is None else bias.dtype

    def add(self, dlogits: Tensor, h: Tensor) -> None:
        """Add one chunk's dlogits[C, V].T @ h[C, H] (and its column sum for the bias)."""
        if self.want_w:
            if self.lowp:
                # the bf16 GEMM writes its own rounded block; the float32 sum happens here
                torch.mm(dlogits.t(), h, out=self.tmp_w)
                if self.first:
                    self.acc_w.copy_(self.tmp_w)
                else:
                    self.backend.accumulate_(self.acc_w, self.tmp_w)
            elif self.first:
                torch.mm(dlogits.t(), h, out=self.grad_w)
            else:
                self.grad_w.addmm_(dlogits.t(), h)
        if self.want_b:
            self.acc_b += torch.sum(dlogits, dim=0, dtype=self.acc_b.dtype)
        self.first = False

    def result(self) -> tuple[Optional[Tensor], Optional[Tensor]]:
        grad_w = self.grad_w
        if self.want_w and self.first:  # no token was scored
            grad_w.zero_()
        elif self.want_w and self.lowp:
            grad_w.copy_(self.acc_w)
        grad_b = self.acc_b.to(self.bias_dtype) if self.want_b else None
        return grad_w, grad_b


def _stat_dtype(hidden: Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _chunks(n_rows: int, chunk: int):
    for start in range(0, n_rows, chunk):
        yield start, min(start + chunk, n_rows)


def _backprop_chunk(
    plan: _Plan,
    block: Tensor,
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    lse: Tensor,
    entropy: Optional[Tensor],
    g_logp: Tensor,
    g_ent: Optional[Tensor],
    grad_h: Optional[Tensor],
    params: _ParamGrads,
) -> None:
    """Turn one logits block into its gradient in place, then run the two gradient GEMMs."""
    plan.backend.grad_logits(block, targets, lse, entropy, g_logp, g_ent, plan.inv_temp, block)
    if grad_h is not None:
        torch.mm(block, weight, out=grad_h)
    params.add(block, h)


class _TokenLogprobs(torch.autograd.Function):
    """Mode A on valid rows only: hidden [N, H], targets [N] -> logp [N], entropy [N]."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, plan: _Plan, with_entropy: bool):
        n, vocab = hidden.shape[0], weight.shape[0]
        logp = torch.empty(n, dtype=_stat_dtype(hidden), device=hidden.device)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp) if with_entropy else None
        block = torch.empty(plan.chunk, vocab, dtype=hidden.dtype, device=hidden.device)
        for s, e in _chunks(n, plan.chunk):
            logits = _logits_block(hidden[s:e], weight, bias, block[: e - s])
            lp, ls, ent = plan.backend.row_stats(logits, targets[s:e], plan.inv_temp, with_entropy)
            logp[s:e], lse[s:e] = lp, ls
            if with_entropy:
                entropy[s:e] = ent
        ctx.plan = plan
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        if entropy is None:
            return logp, logp.new_zeros(0)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        plan: _Plan = ctx.plan
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        g_logp = g_logp.to(lse.dtype).contiguous()
        g_ent = None if (entropy is None or g_ent is None) else g_ent.to(lse.dtype).contiguous()
        n, vocab = hidden.shape[0], weight.shape[0]
        grad_h = torch.empty_like(hidden) if want_h else None
        params = _ParamGrads(weight, bias, math.ceil(n / plan.chunk), want_w, want_b and bias is not None, plan.backend)
        block = torch.empty(plan.chunk, vocab, dtype=hidden.dtype, device=hidden.device)
        for s, e in _chunks(n, plan.chunk):
            logits = _logits_block(hidden[s:e], weight, bias, block[: e - s])
            _backprop_chunk(
                plan, logits, hidden[s:e], weight, targets[s:e], lse[s:e],
                None if g_ent is None else entropy[s:e], g_logp[s:e],
                None if g_ent is None else g_ent[s:e],
                None if grad_h is None else grad_h[s:e], params,
            )
        grad_w, grad_b = params.result()
        return grad_h, grad_w, grad_b, None, None, None


def _token_loss_grads(
    token_loss_fn: TokenLossFn, logp: Tensor, entropy: Optional[Tensor], rows: Tensor
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Evaluate the per-token loss on one chunk and differentiate it w.r.t. logp and entropy.

    Returns (losses [C], g_logp [C], g_ent [C] or None), in logp's dtype.
    """
    with torch.enable_grad():
        lp = logp.detach().requires_grad_(True)
        ent = None if entropy is None else entropy.detach().requires_grad_(True)
        losses = token_loss_fn(lp, ent, rows)
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
        if losses.requires_grad:
            grads = torch.autograd.grad(losses.sum(), inputs, allow_unused=True)
    g_logp = torch.zeros_like(logp) if grads[0] is None else grads[0]
    g_ent = grads[1] if len(grads) > 1 else None
    finite = torch.isfinite(losses).all() & torch.isfinite(g_logp).all()
    if g_ent is not None:
        finite &= torch.isfinite(g_ent).all()
    if not bool(finite):
        raise FloatingPointError(
            f"token_loss_fn returned a non-finite loss or gradient for token rows "
            f"{rows[:8].tolist()}{'...' if rows.numel() > 8 else ''}"
        )
    return losses.detach(), g_logp, g_ent


class _LinearLoss(torch.autograd.Function):
    """Mode B on valid rows only: the loss and its input gradients in one pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, token_loss_fn, plan: _Plan, with_entropy: bool):
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        want_b = want_b and bias is not None
        n, vocab = hidden.shape[0], weight.shape[0]
        logp = torch.empty(n, dtype=_stat_dtype(hidden), device=hidden.device)
        entropy = torch.empty_like(logp) if with_entropy else None
        total = logp.new_zeros(())
        grad_h = torch.empty_like(hidden) if want_h else None
        params = _ParamGrads(weight, bias, math.ceil(n / plan.chunk), want_w, want_b, plan.backend)
        block = torch.empty(plan.chunk, vocab, dtype=hidden.dtype, device=hidden.device)
        for s, e in _chunks(n, plan.chunk):
            logits = _logits_block(hidden[s:e], weight, bias, block[: e - s])
            lp, lse, ent = plan.backend.row_stats(logits, targets[s:e], plan.inv_temp, with_entropy)
            logp[s:e] = lp
            if with_entropy:
                entropy[s:e] = ent
            losses, g_logp, g_ent = _token_loss_grads(token_loss_fn, lp, ent, rows[s:e])
            total += losses.sum()
            if want_h or want_w or want_b:
                _backprop_chunk(
                    plan, logits, hidden[s:e], weight, targets[s:e], lse, ent, g_logp, g_ent,
                    None if grad_h is None else grad_h[s:e], params,
                )
        grad_w, grad_b = params.result()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ent_out = entropy if with_entropy else logp.new_zeros(0)
        ctx.mark_non_differentiable(logp, ent_out)
        return total, logp, ent_out

    @staticmethod
    def backward(ctx, grad_loss, _g_logp, _g_ent):
        # saved tensors, so autograd frees the [V, H] gradient right after backward
        grads = ctx.saved_tensors
        if float(grad_loss) != 1.0:
            grads = tuple(None if g is None else g * grad_loss.to(g.dtype) for g in grads)
        return (*grads, None, None, None, None, None)


def _scatter_rows(values: Tensor, index: Optional[Tensor], n_total: int, shape: tuple) -> Tensor:
    """Place per-valid-row values [Nv] back at their positions of the full [...] shape (0 elsewhere)."""
    if index is None:
        return values.reshape(shape)
    full = values.new_zeros(n_total)
    return full.index_copy(0, index, values).reshape(shape)


def _gather_valid(hidden: Tensor, targets: Tensor, index: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = targets.reshape(-1).long()
    if index is None:
        return flat_h.contiguous(), flat_t.contiguous()
    # the gather is differentiable, so autograd scatters grad_hidden back for free
    return flat_h.index_select(0, index), flat_t.index_select(0, index)


def _prepare(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    temperature: float,
    ignore_index: int,
    backend: str,
    chunk_size: Optional[int],
) -> tuple[Tensor, Tensor, Optional[Tensor], _Plan]:
    """Check the arguments, keep the scored rows, plan the chunks.

    Returns (hidden [N, H] and targets [N] of the N non-ignored positions, their flat indices or
    None when none is ignored, the plan).
    """
    _check_inputs(hidden, weight, targets, bias, temperature, ignore_index, chunk_size)
    index = _valid_rows(targets, ignore_index, weight.shape[0])
    h, t = _gather_valid(hidden, targets, index)
    return h, t, index, _plan(backend, hidden, weight.shape[0], h.shape[0], chunk_size, temperature)


def fused_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Per-token log-probabilities (and entropies) of ``targets`` under softmax(logits / T).

    Args:
        hidden: [..., H] float32 / bfloat16 / float16 (float64 for reference checks: torch backend).
        weight: [V, H], the same dtype and device as ``hidden``.
        targets: [...] int64, the leading shape of ``hidden``; ids in [0, V) or ``ignore_index``.
        bias: [V] or None. Logits are ``(hidden @ weight.T + bias) / temperature``.
        temperature: finite, > 0.
        ignore_index: positions with this target give logp = 0, entropy = 0 and no gradient.
        return_entropy: also return the entropy of each position's distribution.
        backend: "auto" (triton on CUDA, cpu elsewhere, torch as fallback), "torch", "cpu", "triton".
        chunk_size: tokens per logits block; by default chosen from a memory budget of
            ``HPT_FAST_MEMORY_BUDGET_MB`` (128) MiB.
    Returns:
        logp: float32 [...] (<= 0), entropy: float32 [...] or None. Both differentiable w.r.t.
        hidden, weight and bias; the backward recomputes the logits block by block.
    """
    h, t, index, plan = _prepare(hidden, weight, targets, bias, temperature, ignore_index, backend, chunk_size)
    shape, n_total = tuple(targets.shape), targets.numel()
    logp, entropy = _TokenLogprobs.apply(h, weight.contiguous(), bias, t, plan, return_entropy)
    logp = _scatter_rows(logp, index, n_total, shape)
    return logp, (_scatter_rows(entropy, index, n_total, shape) if return_entropy else None)


def fused_linear_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    token_loss_fn: TokenLossFn,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Sum over tokens of ``token_loss_fn(logp, entropy, rows)``, gradients computed in the forward.

    Args:
        hidden, weight, targets, bias, temperature, ignore_index, backend, chunk_size: as in
            ``fused_token_logprobs``.
        token_loss_fn: ``(logp [C] float32, entropy [C] float32 or None, rows [C] int64) ->
            losses [C]``, called chunk by chunk on the non-ignored tokens only; ``rows`` are their
            indices into ``targets.reshape(-1)``. It is differentiated w.r.t. logp and entropy
            only: any other tensor it uses is treated as a constant.
        with_entropy: compute the entropy and pass it to ``token_loss_fn``.
    Returns:
        loss: float32 scalar, differentiable w.r.t. hidden, weight and bias;
        logp: float32 [...] detached (0 at ignored positions); entropy: float32 [...] detached, or None.
    """
    if not callable(token_loss_fn):
        raise TypeError(f"token_loss_fn must be callable, got {type(token_loss_fn).__name__}")
    h, t, index, plan = _prepare(hidden, weight, targets, bias, temperature, ignore_index, backend, chunk_size)
    shape, n_total = tuple(targets.shape), targets.numel()
    rows = index if index is not None else torch.arange(n_total, device=hidden.device)
    loss, logp, entropy = _LinearLoss.apply(
        h, weight.contiguous(), bias, t, rows, token_loss_fn, plan, with_entropy
    )
    logp = _scatter_rows(logp, index, n_total, shape)
    return loss, logp, (_scatter_rows(entropy, index, n_total, shape) if with_entropy else None)
