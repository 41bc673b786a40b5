"""The fused op on a head that FSDP2 shards as a unit of its own (``fully_shard(model.lm_head)``).

FSDP2 unshards a unit's parameters only around its module's forward and reduces their gradients
over the data-parallel ranks only after that forward's backward. The fused op reads the head's
weight directly and never runs the head's forward, so on such a head it would meet the sharded
``DTensor`` (refused by the op), and a ``full_tensor()`` of it would give each rank its own,
unreduced gradient (its backward only slices; TRL 1.16's fused head does this, README).
``as_forward`` runs the op as the head's forward instead, inside FSDP2's hooks. A head in its
parent's unit (the root's, as ``fully_shard(model)`` leaves it) needs none of this: it is
unsharded while the parent's forward runs.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn


def is_unit(module: nn.Module) -> bool:
    """Whether FSDP2 shards ``module`` as a unit of its own (``fully_shard(module)``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(module, FSDPModule)


def as_forward(module: nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, run as ``module``'s forward: inside the hooks ``module(*args)`` runs, so
    that FSDP2 unshards ``module``'s parameters for ``fn`` (read them from ``module`` inside it)
    and reduces their gradients after the backward. FSDP2's mixed precision casts the floating
    tensors among ``args``; hooks of other kinds on ``module`` see ``fn``'s result as its output.

    Example, a loss of ``hpt_fast.FusedUnifiedLoss`` on a head of its own unit::

        loss, stats = fsdp2.as_forward(head, lambda h: loss_fn(h, head.weight, targets, mask, adv), hidden)
    """
    own = vars(module).get("forward")
    module.forward = fn
    try:
        return module(*args)
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own
