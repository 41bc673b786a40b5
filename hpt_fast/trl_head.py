"""hpt_fast's mode A inside TRL's trainers: the op serves TRL's fused LM head.

Since TRL 1.16 its trainers (GRPO, RLOO, the async GRPO, SFT, DPO, KTO, and the reference-model
passes of all of them) get per-token log-probs from ``model(..., labels=labels,
fused_lm_head=True)``, a forward that ``trl.trainer.add_fused_lm_head`` puts on the model. That
forward runs the backbone, picks the scored positions and calls
``trl.trainer.utils._ChunkedLogProbFunction.apply``, TRL's own chunked head.
``patch_trl_fused_head`` puts ``fused_token_logprobs`` behind that name (and has TRL's forward hand
it only the labelled positions on the CPU too, where TRL hands its own head every position), so
every such call made while the patch is in place runs hpt_fast's op instead: on an H200 at 8192 x
3584 x 151936 bf16, 50.4 ms and 0.11x of the naive logits' memory against TRL's 56.0 ms and 0.52x;
on CPU 3.8-7.9x faster (README, "Against TRL's own fused LM head"). Nothing else in TRL changes: the
trainer still picks the positions, masks, sums the loss and adds MoE auxiliary losses.

The op computes every per-token field TRL's head offers: "log_probs" and "entropy" (with gradients),
"is_top1" (from the row maximum its statistics pass keeps; a target tied for the largest logit
counts, where TRL's counts only the first of the tied columns), "mean_logits" and "log_sum_sq_probs"
(two more sums of the statistics pass). That covers GRPO, RLOO, the async GRPO, SFT, KTO, DPO (WPO
weighting included) and every reference-model pass, soft-capped models too. TRL's logits, ``softcap
* tanh(logit_scale * logits / softcap) / temperature``, are the op's soft cap ``softcap /
logit_scale`` at temperature ``temperature / logit_scale`` for a positive scale. Under DeepSpeed
ZeRO-3 TRL's forward gathers the partitioned head around the call, and the op's backward gathers it
again where it was released since (``hpt_fast.zero3``), as TRL's own backward does; under FSDP2 TRL
hands the op a sharded head's ``full_tensor()``. A call the op cannot serve goes to TRL's own head,
with one warning per reason: a logit scale that is not a finite positive number (the op's
temperature cannot express it), and a field TRL 1.16 does not have. TRL's vocabulary tile width
(``chunk_size``) does not apply: the op cuts its blocks from its memory budget, or from this patch's
``chunk_size``.

The names patched are private to TRL, so the patch checks them first and refuses a TRL whose
head takes other arguments or that lacks ``_use_triton``. Tested with TRL 1.16.0.
"""
from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from hpt_fast.logit_head import LogitTransform
from hpt_fast.op_inputs import check_options
from hpt_fast.ops import fused_token_logprobs

# TRL's ChunkedLogProbFunction.forward(ctx, ...) parameters, in order: what its fused forward passes
_TRL_PARAMETERS = ("hidden", "weight", "bias", "targets", "temperature", "chunk_size",
                   "final_logit_softcapping", "logit_scale", "outputs")
# TRL's optional per-token outputs, in the order its head returns them after log_probs
_TRL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# devices on which the op runs eagerly, so that TRL's forward may hand it only the scored positions
_EAGER_DEVICES = frozenset(("cpu", "cuda", "mps", "xpu"))


def _trl_utils():
    try:
        import trl.trainer.utils as utils
    except ImportError as e:
        raise ImportError(f"patch_trl_fused_head needs TRL (pip install trl): {e}") from e
    return utils


def _check_trl_head(utils: Any, head: Any) -> None:
    """Refuse a TRL whose private head does not take the arguments this patch serves, or whose
    fused forward does not ask ``_use_triton`` whether to hand it only the scored positions."""
    if not callable(getattr(utils, "_use_triton", None)):
        import trl

        raise RuntimeError(f"TRL {trl.__version__} has no trl.trainer.utils._use_triton(device), which TRL 1.16's "
                           "fused forward asks whether to score only the labelled positions: patch_trl_fused_head "
                           "cannot serve it")
    forward = getattr(head, "forward", None)
    names = () if forward is None else tuple(inspect.signature(forward).parameters)[1:]
    if names != _TRL_PARAMETERS:
        import trl

        raise RuntimeError(
            f"TRL {trl.__version__}'s trl.trainer.utils._ChunkedLogProbFunction takes ({', '.join(names)}), "
            f"not ({', '.join(_TRL_PARAMETERS)}) as TRL 1.16 does: patch_trl_fused_head cannot serve it"
        )


class TrlFusedHead:
    """Stands in for TRL's ``_ChunkedLogProbFunction`` (its ``apply``), running ``fused_token_logprobs``.

    Made by ``patch_trl_fused_head``; ``restore()`` (or leaving its ``with`` block) puts back what
    was there before. ``backend``, ``chunk_size``, ``grad_order`` and ``accum_dtype`` are the op's.
    """

    def __init__(self, previous: Any, previous_compacts: Callable[[torch.device], bool], trl_head: Any,
                 backend: str, chunk_size: Optional[int], grad_order: str, accum_dtype: Optional[torch.dtype]) -> None:
        self.previous = previous  # what restore() puts back
        self.previous_compacts = previous_compacts
        self.trl_head = trl_head  # TRL's own, for the calls the op does not serve
        self.op_kwargs = dict(backend=backend, chunk_size=chunk_size, grad_order=grad_order, accum_dtype=accum_dtype)
        self._warned: set[str] = set()

    def apply(
        self,
        hidden: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        targets: Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: Optional[float] = None,
        logit_scale: float = 1.0,
        outputs: tuple[str, ...] = ("log_probs",) + _TRL_OUTPUTS,
    ) -> tuple[Optional[Tensor], ...]:
        """TRL's head's call: hidden [N, H], weight [V, H], bias [V] or None, targets [N] int64 in
        [0, V). Returns (log_probs [N], entropy [N] or None, log_sum_sq_probs [N] or None,
        mean_logits [N] or None, is_top1 [N] bool or None), the float ones float32 (float64 for
        float64 inputs), log_probs and entropy differentiable w.r.t. hidden, weight and bias, the
        others detached."""
        why = self._unserved(logit_scale, outputs)
        if why is not None:
            if why not in self._warned:
                self._warned.add(why)
                warnings.warn(f"hpt_fast's TRL head: {why}, so TRL's own head runs this call", stacklevel=2)
            return self.trl_head.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                        final_logit_softcapping, logit_scale, outputs)
        if not torch.is_autocast_enabled(hidden.device.type) and weight.dtype != hidden.dtype:
            # TRL's cast_lm_head_to_fp32: float32 hidden states, autocast off, the head in bf16; TRL
            # casts each weight tile, the op takes the whole weight in hidden's dtype
            weight = weight.to(hidden.dtype)
            bias = None if bias is None else bias.to(hidden.dtype)
        transform = LogitTransform(scale=float(logit_scale), softcap=final_logit_softcapping)
        logp, entropy, *extras = fused_token_logprobs(
            hidden, weight, targets, bias=bias, **transform.op_args(temperature),
            return_entropy="entropy" in outputs, return_top1="is_top1" in outputs,
            return_logit_mean="mean_logits" in outputs, return_log_sum_sq_probs="log_sum_sq_probs" in outputs,
            **self.op_kwargs,
        )
        # the op returns the extras asked for in this order
        got = dict(zip([name for name in ("is_top1", "mean_logits", "log_sum_sq_probs") if name in outputs], extras))
        return logp, entropy, got.get("log_sum_sq_probs"), got.get("mean_logits"), got.get("is_top1")

    @staticmethod
    def _unserved(logit_scale: float, outputs: tuple[str, ...]) -> Optional[str]:
        """Why the op cannot serve this call, or None when it can."""
        unknown = sorted(set(outputs) - {"log_probs", *_TRL_OUTPUTS})
        if unknown:  # a later TRL's field
            return f"the trainer asks for {', '.join(unknown)}, which the op does not compute"
        if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)) or not (
                math.isfinite(logit_scale) and logit_scale > 0):
            return f"the model's logit scale is {logit_scale!r}, not a finite number > 0"
        return None

    def compacts(self, device: torch.device) -> bool:
        """Stands in for the ``_use_triton(device)`` TRL's fused forward asks whether to hand its
        head only the scored positions (TRL does on Triton devices; elsewhere it hands every
        position, prompts and padding included, so that XLA-like devices see one shape). The op
        runs eagerly on the CPU too, where scoring the prompts and padding would only cost time."""
        return device.type in _EAGER_DEVICES or self.previous_compacts(device)

    def restore(self) -> None:
        """Put back the head that was in place before this patch."""
        utils = _trl_utils()
        if utils._ChunkedLogProbFunction is not self or utils._use_triton != self.compacts:
            raise RuntimeError("another head replaced this patch since: restore the patches in reverse order")
        utils._ChunkedLogProbFunction = self.previous
        utils._use_triton = self.previous_compacts

    def __enter__(self) -> "TrlFusedHead":
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def patch_trl_fused_head(
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    grad_order: str = "auto",
    accum_dtype: Optional[torch.dtype] = torch.float32,
) -> TrlFusedHead:
    """Serve TRL's fused LM head (``trl.trainer.add_fused_lm_head``) with ``fused_token_logprobs``.

    Affects every call from then on, in every TRL trainer of this process, whether its model got
    the head before or after. Usable as a context manager, or undone with ``.restore()``.

    Args:
        backend, chunk_size, grad_order, accum_dtype: the op's (see ``fused_token_logprobs``);
            ``chunk_size`` is tokens per block, unrelated to TRL's vocabulary tile width.
    Returns:
        The patch (a ``TrlFusedHead``).
    Raises:
        ValueError for a bad option; ImportError without TRL; RuntimeError when TRL's head takes
        other arguments than TRL 1.16's.
    """
    chunk_size = check_options(backend, chunk_size, grad_order, accum_dtype)
    utils = _trl_utils()
    previous = utils._ChunkedLogProbFunction
    trl_head = previous.trl_head if isinstance(previous, TrlFusedHead) else previous
    _check_trl_head(utils, trl_head)
    head = TrlFusedHead(previous, utils._use_triton, trl_head, backend, chunk_size, grad_order, accum_dtype)
    utils._ChunkedLogProbFunction, utils._use_triton = head, head.compacts
    return head
