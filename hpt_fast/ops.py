"""The fused linear + log-prob / entropy op, in two modes, never materialising [tokens x vocab].

Mode A, ``fused_token_logprobs``: per-token log-probabilities (and entropies) with autograd; the
backward recomputes the logits block by block (four GEMMs in all). Its forward and backward are
torch.library custom ops, so torch.compile takes it into a graph whole.

Mode B, ``fused_linear_loss``: a scalar sum of an arbitrary per-token loss of (logp, entropy); the
gradients for hidden, weight and bias are computed during the forward pass, block by block, and
backward only scales them (three GEMMs in all, or nearly four in vocabulary order; see
``op_plan.auto_order``).

The parts, a module each: the argument checks and scored rows (``op_inputs``), the plan of one
call (``op_plan``), the statistics and gradient passes over logits blocks (``op_passes``), and
mode B's per-token loss (``op_token_loss``). Mode A's forward is a statistics pass and its
backward a gradient pass that recomputes the logits, block for block as the forward computed
them; mode B's token order runs the gradient pass on the statistics pass's own blocks.
For any per-token loss, d loss / d logits = (1/T) * [g_logp * (onehot - p) - g_ent * p * (log p + H)],
so the backends only ever need the two per-token scalars g_logp and g_ent (times the soft cap's
1 - tanh^2 of the raw logits, when there is one).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hpt_fast import op_inputs, op_passes, op_plan, op_token_loss, zero3


def _dtypes(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor]
) -> tuple[torch.dtype, torch.dtype, Optional[torch.dtype]]:
    """The inputs' own dtypes, those of their gradients (None: no bias)."""
    return hidden.dtype, weight.dtype, None if bias is None else bias.dtype


def _cast(dtype: torch.dtype, *tensors: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """The tensors in ``dtype``, contiguous: themselves when they already are (None stays None)."""
    return tuple(None if t is None else t.to(dtype).contiguous() for t in tensors)


def _refuse_double_backward() -> None:
    """Raise in a backward run with ``create_graph=True``: the op's gradients are computed by
    GEMMs into preallocated outputs, not by differentiable operations, so a second-order term
    would be silently missing."""
    if torch.is_grad_enabled():
        raise RuntimeError("the fused op is differentiable once: a backward with create_graph=True "
                           "(double backward, e.g. a gradient penalty) is not supported")


# Mode A is a pair of torch.library custom ops, its forward and its backward, joined by a
# registered autograd formula: torch.compile puts each in its graph as one node (fullgraph=True
# takes them), where an autograd.Function calling C++ / Triton could only break the graph. The
# forward takes the whole [..., H] batch and keeps its scored rows itself; it hands the backward
# their indices and statistics in tensors of the batch's size (no shape in a graph depends on
# the targets' values) and their count on the CPU, so the backward reads nothing from the device.
_MODE_A = "hpt_fast::token_logprobs"


@torch.library.custom_op(_MODE_A, mutates_args=())
def _token_logprobs(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, temperature: float,
    ignore_index: int, with_entropy: bool, backend: str, chunk_size: Optional[int], grad_order: str,
    accum_dtype: Optional[torch.dtype], dtype: torch.dtype, softcap: Optional[float] = None,
    with_top1: bool = False, with_sums: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Mode A's forward on checked arguments (``op_inputs.checked_args``), ``dtype`` the GEMMs' dtype.

    Returns logp [...] and entropy [...] (or [0] without ``with_entropy``) at targets' shape, 0
    at ignored positions, float32 (float64 for float64 inputs); and for the backward, of the Nv
    scored positions among the n = targets.numel(): their statistics [2 or 3, n] (the log-sum-exp's
    two parts m and log s, then entropy, in the first Nv columns: the returned entropy may be
    edited by the caller), their flat indices int64 [n] (the first Nv entries), and int64 [3] on
    the CPU: (tokens per chunk, 1 for vocabulary order, Nv), so that the backward recomputes the
    forward's blocks bit for bit; then bool [...] (or [0] without ``with_top1``): the target's
    logit is its row's largest; last, [2, ...] (or [0] without ``with_sums``): each position's
    mean scaled logit over the vocabulary and log sum_v p_v^2 (``row_state.logit_sums``), 0 at
    ignored positions.
    """
    h, t, index, plan = _prepare(
        hidden, weight, targets, bias, temperature, ignore_index, backend, chunk_size, "A", grad_order,
        accum_dtype, dtype, softcap,
    )
    with op_inputs.autocast_off(h.device):
        h, w, b = _cast(plan.dtype, h, weight, bias)
        rows = op_passes.RowData.empty(h, with_entropy, with_top1, vocab=weight.shape[0] if with_sums else 0)
        op_passes.stats_pass(plan, h, w, b, t, rows, op_passes.block_buffer(plan, h, w.shape[0]))
    shape, n, n_scored = tuple(targets.shape), targets.numel(), h.shape[0]
    kept = [*rows.norm.t()] + ([] if rows.entropy is None else [rows.entropy])
    stats = rows.norm.new_zeros((len(kept), n))
    stats[:, :n_scored] = torch.stack(kept)
    scored = t.new_zeros(n)
    scored[:n_scored] = torch.arange(n, device=t.device) if index is None else index
    # outputs of their own: autograd forbids editing a custom op's output that is a view in place
    logp = op_inputs.scatter_rows(rows.logp, index, n, shape).clone()
    entropy = op_inputs.scatter_rows(rows.entropy, index, n, shape).clone() if with_entropy else logp.new_zeros(0)
    cut = torch.tensor([plan.chunk, plan.order == "vocab", n_scored], dtype=torch.int64)
    top1 = op_inputs.scatter_rows(rows.top1, index, n, shape) if with_top1 else t.new_zeros(0, dtype=torch.bool)
    sums = (torch.stack([op_inputs.scatter_rows(col, index, n, shape) for col in rows.sums.unbind(1)])
            if with_sums else logp.new_zeros(0))
    return logp, entropy, stats, scored, cut, top1, sums


@_token_logprobs.register_fake
def _token_logprobs_fake(hidden, weight, bias, targets, temperature, ignore_index, with_entropy, backend,
                         chunk_size, grad_order, accum_dtype, dtype, softcap=None, with_top1=False, with_sums=False):
    stat = op_passes.stat_dtype(hidden)
    logp = targets.new_empty(targets.shape, dtype=stat)
    entropy = targets.new_empty(targets.shape if with_entropy else (0,), dtype=stat)
    stats = targets.new_empty((3 if with_entropy else 2, targets.numel()), dtype=stat)
    scored = targets.new_empty((targets.numel(),), dtype=torch.int64)
    top1 = targets.new_empty(targets.shape if with_top1 else (0,), dtype=torch.bool)
    sums = targets.new_empty((2, *targets.shape) if with_sums else (0,), dtype=stat)
    return logp, entropy, stats, scored, torch.empty(3, dtype=torch.int64, device="cpu"), top1, sums


@torch.library.custom_op(f"{_MODE_A}_backward", mutates_args=())
def _token_logprobs_backward(
    g_logp: Tensor, g_ent: Optional[Tensor], hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
    targets: Tensor, stats: Tensor, scored: Tensor, cut: Tensor, temperature: float, backend: str,
    accum_dtype: Optional[torch.dtype], dtype: torch.dtype, want: list[bool], softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Mode A's backward: the gradients of hidden, weight and bias (``want``: which), each in its
    input's dtype, [0] where not wanted; g_logp [...] and g_ent [...] or None (no entropy term)
    at targets' shape, stats, scored and cut from the forward."""
    chunk, vocab_order, n_scored = cut.tolist()
    index = None if n_scored == targets.numel() else scored[:n_scored]
    h, t = op_inputs.gather_valid(hidden, targets, index)
    order = "vocab" if vocab_order else "tokens"
    plan = op_plan.make_plan(
        "A", backend, hidden, weight.shape[0], h.shape[0], chunk, temperature, order, accum_dtype, dtype, weight.dtype,
        softcap,
    )
    norm, entropy = stats[:2, :n_scored].t(), (stats[2, :n_scored] if stats.shape[0] > 2 else None)
    g_logp = op_inputs.gather_rows(g_logp.reshape(-1).to(norm.dtype), index)
    if g_ent is not None and entropy is not None:
        g_ent = op_inputs.gather_rows(g_ent.reshape(-1).to(norm.dtype), index)
    else:
        g_ent = None
    want_h, want_w, want_b = want
    dtypes = _dtypes(hidden, weight, bias if want_b else None)
    with op_inputs.autocast_off(h.device):
        h, w, b = _cast(plan.dtype, h, weight, bias)
        rows = op_passes.RowData(None, norm, entropy, g_logp, g_ent)
        grads = op_passes.GradientPass(plan, h, w, t, rows, dtypes, want_h, want_w)
        grads.recompute(b, op_passes.block_buffer(plan, h, w.shape[0]))
    grad_h, grad_w, grad_b = grads.result()
    if grad_h is not None:
        grad_h = op_inputs.scatter_rows(grad_h, index, targets.numel(), tuple(hidden.shape))
    likes = _gradient_likes(hidden, weight, bias, stats)
    return tuple(x.new_empty(0) if g is None else g for g, x in zip((grad_h, grad_w, grad_b), likes))


def _gradient_likes(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], stats: Tensor) -> tuple[Tensor, ...]:
    """The tensors whose shape, dtype and device mode A's three gradients take (an empty one of
    that dtype where not wanted): hidden, weight and bias, or stats when there is no bias."""
    return hidden, weight, stats if bias is None else bias


@_token_logprobs_backward.register_fake
def _token_logprobs_backward_fake(g_logp, g_ent, hidden, weight, bias, targets, stats, scored, cut, temperature,
                                  backend, accum_dtype, dtype, want, softcap=None):
    likes = _gradient_likes(hidden, weight, bias, stats)
    return tuple(x.new_empty(x.shape if w else (0,)) for x, w in zip(likes, want))


def _token_logprobs_setup(ctx, inputs, output) -> None:
    hidden, weight, bias, targets, temperature, _, _, backend, _, _, accum_dtype, dtype, softcap, _, _ = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, *output[2:5])
    # the logit mean and log sum p^2 are metrics: no gradient, not a silent zero one
    ctx.mark_non_differentiable(output[6])
    ctx.args = (temperature, backend, accum_dtype, dtype)
    ctx.softcap = softcap
    # an output that no loss uses gets None, not zeros: an unused entropy adds no term
    ctx.set_materialize_grads(False)


def _token_logprobs_grad(ctx, g_logp, g_ent, *_g_rest):
    _refuse_double_backward()
    hidden, weight, bias, targets, stats, scored, cut = ctx.saved_tensors
    want = [bool(w) for w in ctx.needs_input_grad[:3]]
    want[2] = want[2] and bias is not None
    if g_logp is None:
        g_logp = stats.new_zeros(targets.shape)
    # a ZeRO-3 head released since the forward (its module's hooks gathered it only around it)
    with zero3.gathered(weight, bias):
        grads = _token_logprobs_backward(
            g_logp, g_ent, hidden, weight, bias, targets, stats, scored, cut, *ctx.args, want, ctx.softcap
        )
    return (*(g if w else None for g, w in zip(grads, want)), *([None] * 12))


_token_logprobs.register_autograd(_token_logprobs_grad, setup_context=_token_logprobs_setup)


class _LinearLoss(torch.autograd.Function):
    """Mode B on valid rows only: the loss and its input gradients in one pass over token chunks
    (token order), or a statistics pass, the loss, then a gradient pass, both over vocabulary
    slabs (vocabulary order; see ``op_plan.auto_order``)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, index, token_loss_fn, plan: op_plan.Plan, with_entropy: bool):
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        dtypes = _dtypes(hidden, weight, bias if want_b else None)
        hidden, weight, bias = _cast(plan.dtype, hidden, weight, bias)  # the GEMMs' dtype
        rows = op_passes.RowData.empty(hidden, with_entropy)
        rows.g_logp = torch.empty_like(rows.logp)
        rows.g_ent = torch.empty_like(rows.logp) if with_entropy else None
        total = rows.logp.new_zeros(())
        status = torch.empty(hidden.shape[0], dtype=torch.uint8, device=hidden.device)
        buffer = op_passes.block_buffer(plan, hidden, weight.shape[0])
        grads = None
        if want_h or want_w or dtypes[2] is not None:
            grads = op_passes.GradientPass(plan, hidden, weight, targets, rows, dtypes, want_h, want_w)

        def chunk_loss(s: int, e: int) -> None:
            ent = None if rows.entropy is None else rows.entropy[s:e]
            losses, g_logp, g_ent, status[s:e] = op_token_loss.token_loss_grads(
                token_loss_fn, rows.logp[s:e], ent, index[s:e], grads is not None
            )
            total.add_(losses.sum())
            if grads is None:
                return
            rows.g_logp[s:e] = g_logp
            if rows.g_ent is not None:
                # a loss that ignores the entropy has no gradient for it
                rows.g_ent[s:e] = 0.0 if g_ent is None else g_ent

        if plan.order == "tokens":
            def on_chunk(s: int, e: int, logits: Tensor) -> None:
                chunk_loss(s, e)
                if grads is not None:
                    grads.step(logits, slice(s, e), slice(0, logits.shape[1]))

            op_passes.stats_pass(plan, hidden, weight, bias, targets, rows, buffer, on_chunk)
        else:
            op_passes.stats_pass(plan, hidden, weight, bias, targets, rows, buffer)
            # every token's statistics are ready: one call on all of them (per-token tensors
            # only), where chunk-sized calls cost the GPU an idle launch gap each; none on no
            # token at all, as in token order
            if hidden.shape[0]:
                chunk_loss(0, hidden.shape[0])
            if grads is not None:
                grads.recompute(bias, buffer, after_stats=True)
        saved = (None, None, None) if grads is None else grads.result()
        # one host sync per call, after all the work (the gradients' final rounding included) is
        # queued, so the device does not wait on the host for it; nothing is returned before it
        op_token_loss.check_finite(status, index)
        ctx.save_for_backward(*saved)
        ent_out = rows.logp.new_zeros(0) if rows.entropy is None else rows.entropy
        ctx.mark_non_differentiable(rows.logp, ent_out)
        return total, rows.logp, ent_out

    @staticmethod
    @torch.compiler.disable
    def backward(ctx, grad_loss, _g_logp, _g_ent):
        _refuse_double_backward()
        # Saved tensors, so autograd frees the [V, H] gradient right after backward. They are
        # handed out, not copied (a copy would cost the memory the op saves), and autograd may
        # make one a parameter's .grad through a view without copying it: adding into that .grad
        # in place (a later backward, zero_grad without set_to_none) changes the saved tensor,
        # which autograd's version check then reports here.
        if hasattr(ctx, "private"):
            grads = ctx.private
        else:
            try:
                grads = ctx.saved_tensors
            except RuntimeError as err:
                raise RuntimeError(
                    "fused_linear_loss: backward through a retained graph after the gradient it handed "
                    "out was changed in place (accumulated into or zeroed as .grad, or edited by the "
                    f"caller); call the op again for another backward ({err})"
                ) from None
            if getattr(ctx, "handed_out", False):
                # a backward through a retained graph after the saved tensors were handed out:
                # they are .grad now and will be added into, so the gradients come from a private
                # copy from here on, taken while the check above vouches for them (one gradient's
                # memory, for repeated backwards only)
                ctx.private = tuple(None if g is None else g.clone() for g in grads)
                grads = ctx.private
        scale = float(grad_loss) != 1.0
        if scale or hasattr(ctx, "private"):
            # new tensors, never the saved or private ones (a 0-d float32 factor: bf16 / fp16
            # gradients are scaled in float32, then rounded)
            grads = tuple(None if g is None else (g * grad_loss if scale else g.clone()) for g in grads)
        else:
            ctx.handed_out = True
        return (*grads, None, None, None, None, None)


def _prepare(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    temperature: float,
    ignore_index: int,
    backend: str,
    chunk_size: Optional[int],
    mode: str,
    grad_order: str,
    accum_dtype: Optional[torch.dtype],
    dtype: torch.dtype,
    softcap: Optional[float],
) -> tuple[Tensor, Tensor, Optional[Tensor], op_plan.Plan]:
    """Check the target ids, keep the scored rows and plan the blocks for mode ``mode`` ("A" /
    "B"), the GEMMs in ``dtype``; the other arguments as ``op_inputs.checked_args`` returned them.

    Returns (hidden [N, H] in its own dtype (the callers cast it) and targets [N] int64 of the N
    non-ignored positions, their flat indices or None when none is ignored, the plan).
    """
    index = op_inputs.valid_rows(targets, ignore_index, weight.shape[0])
    h, t = op_inputs.gather_valid(hidden, targets, index)
    plan = op_plan.make_plan(
        mode, backend, hidden, weight.shape[0], h.shape[0], chunk_size, temperature, grad_order, accum_dtype,
        dtype, weight.dtype, softcap,
    )
    return h, t, index, plan


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
    grad_order: str = "auto",
    accum_dtype: Optional[torch.dtype] = torch.float32,
    softcap: Optional[float] = None,
    return_top1: bool = False,
    return_logit_mean: bool = False,
    return_log_sum_sq_probs: bool = False,
) -> tuple[Optional[Tensor], ...]:
    """Per-token log-probabilities (and entropies) of ``targets`` under softmax(logits / T).

    Args:
        hidden: [..., H] float32 / bfloat16 / float16 (float64 for reference checks: torch backend).
        weight: [V, H], the same dtype and device as ``hidden``. Under ``torch.autocast`` for
            hidden's device type (cpu, cuda), the GEMMs take hidden, weight and bias in the
            autocast dtype, as ``F.linear`` would (float64 excepted), so float32 weights with
            bf16 activations work; each gradient comes back in its input's own dtype, a float32
            weight's summed over the logits blocks in float32 straight into it (on CUDA no
            block's product is rounded to bf16; on CPU each is, as any CPU bf16 GEMM's output),
            so mode B needs no float32 buffer and keeps token order. Inside, the op runs with
            autocast off.
        targets: [...] int64, the leading shape of ``hidden``; ids in [0, V) or ``ignore_index``.
        bias: [V] or None. Logits are ``(hidden @ weight.T + bias) / temperature``, or with
            ``softcap`` c, ``c * tanh((hidden @ weight.T + bias) / c) / temperature``.
        temperature: finite, > 0, with 1 / temperature a finite float32 (T >= about 2.9e-39).
        ignore_index: positions with this target give logp = 0, entropy = 0 and no gradient.
        return_entropy: also return the entropy of each position's distribution.
        backend: "auto" (triton on CUDA, cpu elsewhere, torch as fallback), "torch", "cpu", "triton".
        chunk_size: tokens per logits block [chunk_size, V]; by default chosen from a memory
            budget for the block: ``HPT_FAST_MEMORY_BUDGET_MB`` MiB when set, else 1/12 of the
            naive float32 logits of the N scored tokens, within 128 MiB - 1 GiB. Vocabulary
            order uses blocks [N, slab] of the N scored tokens instead, slab at most
            ``chunk_size * V // N`` (at least one column): no more elements.
        grad_order: loop order of the forward's statistics pass and the backward's gradient
            pass alike: "tokens" (over token chunks, summing grad_weight over them), "vocab"
            (over vocabulary slabs of all tokens, summing grad_hidden) or "auto": "vocab" when
            there are fewer scored tokens than V (the smaller sum, the larger GEMMs). Both run
            four GEMMs; the choice changes speed and memory, not the result beyond rounding.
        accum_dtype: how grad_weight is summed over token chunks (token order, more than one
            chunk) when the inputs are bfloat16 / float16. ``torch.float32`` (default): in a
            float32 [V, H] buffer, rounded once at the end. ``None`` or the inputs' dtype: each
            chunk's GEMM adds into grad_weight itself (float32 inside the GEMM), rounding the
            running sum once per chunk, as Liger's fused linear cross-entropy (its default
            ``accum_dtype=None``) and cut-cross-entropy's CUDA kernel do: no buffer, and no pass
            over it. On CPU each chunk's product leaves the GEMM in bf16 either way, and that
            rounding dominates: measured at H 1024, V 151936, the mean error of grad_weight is
            the same at 2048 tokens (5 chunks) and about 1% larger at 8192 (7 chunks; 5% at 19
            chunks under an earlier budget)
            (``bench/results_accum_precision_cpu.md``). On CUDA the float32 sum takes each
            chunk's product in float32 (cuBLAS, bf16 inputs, float32 output), so no chunk is
            rounded to bf16 before the end. Vocabulary order's grad_hidden sum is
            always float32 (its buffer is [N, H]); float32 / float64 inputs always sum in their
            own dtype.
        softcap: None, or the soft cap c > 0 of models that cap their logits with a tanh (Gemma 2
            and later: the config's ``final_logit_softcapping``), applied before the temperature;
            softcap / temperature must be a finite float32. Costs a tanh per logit in each pass.
        return_top1: also return whether each target is its row's most likely token (a
            token-accuracy metric), from the row maximum the statistics pass keeps anyway.
        return_logit_mean: also return each position's mean logit over the vocabulary, of the
            logits as the softmax sees them (capped, divided by T), summed in the statistics pass.
        return_log_sum_sq_probs: also return log sum_v p_v^2 of each position's distribution (the
            log collision probability; DPO's WPO weighting), from a sum the statistics pass keeps
            beside the softmax's. Both sums cost an add and a multiply-add per logit.
    Returns:
        logp: float32 [...] (<= 0), entropy: float32 [...] or None. Both differentiable w.r.t.
        hidden, weight and bias; the backward recomputes the logits block by block. With
        ``return_top1``, a third output: bool [...], the target's logit equals the row's largest
        (a target tied for the largest counts; False at ignored positions), no gradient. Then,
        each where asked for, [...] in logp's dtype (0 at ignored positions), no gradient: the
        logit mean, then log sum p^2. Under torch.compile the forward and the backward are one
        graph node each (custom ops ``hpt_fast::token_logprobs`` and
        ``hpt_fast::token_logprobs_backward``), so ``fullgraph=True`` takes the op.
    """
    temperature, ignore_index, chunk_size, softcap, dtype = op_inputs.checked_args(
        hidden, weight, targets, bias, temperature, ignore_index, backend, chunk_size, grad_order, accum_dtype,
        softcap,
    )
    with_sums = bool(return_logit_mean or return_log_sum_sq_probs)
    logp, entropy, *_, top1, sums = _token_logprobs(
        hidden, weight, bias, targets, temperature, ignore_index, bool(return_entropy), backend, chunk_size,
        grad_order, accum_dtype, dtype, softcap, bool(return_top1), with_sums,
    )
    extras = [(return_top1, top1), (return_logit_mean, sums[0] if with_sums else None),
              (return_log_sum_sq_probs, sums[1] if with_sums else None)]
    return (logp, entropy if return_entropy else None, *(x for asked, x in extras if asked))


@torch.compiler.disable
def fused_linear_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    token_loss_fn: op_token_loss.TokenLossFn,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    grad_order: str = "auto",
    accum_dtype: Optional[torch.dtype] = torch.float32,
    softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Sum over tokens of ``token_loss_fn(logp, entropy, rows)``, gradients computed in the forward.

    Args:
        hidden, weight, targets, bias, temperature, ignore_index, backend, chunk_size, softcap: as
            in ``fused_token_logprobs``.
        token_loss_fn: ``(logp [C] float32, entropy [C] float32 or None, rows [C] int64) ->
            losses [C]``, called on the non-ignored tokens only, chunk by chunk in token order
            and once on all of them in vocabulary order (never on zero tokens); ``rows`` are
            their indices into ``targets.reshape(-1)``. It is differentiated w.r.t. logp and
            entropy only, and only when an input gradient is wanted: any other tensor it uses is
            treated as a constant, and losses with no autograd graph back to logp / entropy
            give zero gradients with a warning. A non-finite loss or gradient raises
            FloatingPointError naming the rows, before the op returns; so do non-finite logits
            (NaN / inf inputs, a float16 overflow), named as the cause.
        with_entropy: compute the entropy and pass it to ``token_loss_fn``.
        grad_order: "tokens": one pass over token chunks computes the loss and the gradients
            (three GEMMs); "vocab": a statistics pass, then a gradient pass, both over
            vocabulary slabs of all tokens (four GEMMs less one slab's logits GEMM, which the
            gradient pass takes from the statistics pass), whose grad_weight needs no float32
            [V, H] buffer in bfloat16 / float16; "auto": "vocab" only when that buffer (low
            precision with ``accum_dtype=torch.float32``, several chunks) would exceed the block
            budget (see ``fused_token_logprobs``' chunk_size) if that is at most 128 MiB, or a
            quarter of a larger one, and there are fewer scored tokens than V, else "tokens".
        accum_dtype: as in ``fused_token_logprobs``. ``None`` keeps bfloat16 / float16 mode B in
            token order (three GEMMs) at the memory of one logits block.
    Returns:
        loss: float32 scalar, differentiable w.r.t. hidden, weight and bias (under
        ``torch.no_grad`` / ``inference_mode`` the op computes the loss only, no gradients);
        logp: float32 [...] detached (0 at ignored positions); entropy: float32 [...] detached, or None.
    """
    if not callable(token_loss_fn):
        raise TypeError(f"token_loss_fn must be callable, got {type(token_loss_fn).__name__}")
    temperature, ignore_index, chunk_size, softcap, dtype = op_inputs.checked_args(
        hidden, weight, targets, bias, temperature, ignore_index, backend, chunk_size, grad_order, accum_dtype,
        softcap,
    )
    h, t, index, plan = _prepare(
        hidden, weight, targets, bias, temperature, ignore_index, backend, chunk_size, "B", grad_order,
        accum_dtype, dtype, softcap,
    )
    w, b = weight, bias
    if not torch.is_grad_enabled():
        # autograd records nothing (no_grad, inference_mode), yet needs_input_grad follows
        # requires_grad: detached, the forward skips the gradient pass (an evaluation loss)
        h, w, b = h.detach(), w.detach(), None if b is None else b.detach()
    shape, n_total = tuple(targets.shape), targets.numel()
    rows = index if index is not None else torch.arange(n_total, device=hidden.device)
    with op_inputs.autocast_off(h.device):
        loss, logp, entropy = _LinearLoss.apply(h, w, b, t, rows, token_loss_fn, plan, with_entropy)
    logp = op_inputs.scatter_rows(logp, index, n_total, shape)
    return loss, logp, (op_inputs.scatter_rows(entropy, index, n_total, shape) if with_entropy else None)
