"""DeepSpeed ZeRO-3 partitioned parameters read outside the forward of the module that owns them.

Under ZeRO-3 each rank keeps a slice of every parameter; DeepSpeed gathers the whole of it only
around the forward (and backward) of a module that owns or registers it, and releases it after:
the ``Parameter`` object stays, its data becomes an empty tensor. Three readers work outside those
forwards: the fused op reads the output embedding directly (its caller gathers it for the forward;
the op's backward, which recomputes the logits from it, gathers it again where it was released
since), the weight stream into vLLM, and the gathered state dict a checkpoint saves. DeepSpeed
marks such parameters with ``ds_id`` and ``ds_status``; deepspeed is imported only when a
parameter carries them.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from torch import Tensor


def is_released(t: Optional[Tensor]) -> bool:
    """Whether ``t`` is a ZeRO-3 partitioned parameter whose full data is not in place now."""
    if t is None or not hasattr(t, "ds_id"):
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return t.ds_status != ZeroParamStatus.AVAILABLE


@contextlib.contextmanager
def gathered(*params: Optional[Tensor]) -> Iterator[None]:
    """Inside the block, the released ZeRO-3 parameters among ``params`` hold their full data
    (read-only: an edit is not written back to the partitions), and are released again after.

    Parameters already gathered (by their module's hooks, a caller's ``GatheredParameters``, or
    tied to a module that is running) are left alone: releasing one of those on leaving would
    take it from under its owner. Other tensors and None are ignored.
    """
    # by identity: a tied weight may come twice, and ZeRO-3 mishandles a parameter gathered twice
    released = list({id(p): p for p in params if is_released(p)}.values())
    if not released:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(released, modifier_rank=None):
        yield
