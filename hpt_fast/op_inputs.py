"""What the fused op takes: its argument checks, the dtype its GEMMs run in, and the scored rows.

Everything is checked before any work starts. ``checked_args`` decides from shapes, dtypes and
devices alone (torch.compile traces it); ``valid_rows`` reads the target ids, the one check that
waits for the device, and gives the rows the op scores (those whose target is not
``ignore_index``), which ``gather_valid`` keeps and ``scatter_rows`` puts back.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import operator
from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from hpt_fast import backends, zero3

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_FLOAT32_MAX = torch.finfo(torch.float32).max
_INT64_MIN, _INT64_MAX = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max
# Loop orders of every pass over logits blocks (see op_plan.auto_order); "auto" lets the plan choose.
GRAD_ORDERS = ("auto", "tokens", "vocab")
# Device types whose torch.autocast the op follows (see compute_dtype): those of its backends.
_AUTOCAST_DEVICES = ("cpu", "cuda")


def _check_inputs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    accum_dtype: Optional[torch.dtype],
) -> None:
    """Raise a clear error for any tensor the op cannot take, or an accum_dtype that does not fit
    them, before any work starts (the numbers: ``_scalar_args``; the other options: ``check_options``).

    The dtype checks are on the dtypes the op computes in (``compute_dtype``): under autocast,
    a float32 weight with bf16 activations is one bf16 op, as for ``F.linear``.
    """
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor{' or None' if name == 'bias' else ''}, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
        if t.is_meta:
            raise ValueError(f"{name} is on the meta device: it has no values to compute with")
        if zero3.is_released(t):
            raise ValueError(
                f"{name} is a DeepSpeed ZeRO-3 partitioned parameter that is not gathered (its data here is "
                f"{tuple(t.shape)}): call the op inside deepspeed.zero.GatheredParameters over it, or in the "
                "forward of a module that owns it or registers it (deepspeed.zero.register_external_parameter)"
            )
        if is_traceable_wrapper_subclass(t):
            # a DTensor's GEMM would meet the op's plain buffers deep inside it, after work started
            raise TypeError(
                f"{name} is a {type(t).__name__}, a tensor subclass (FSDP2 and tensor parallelism shard "
                "parameters as DTensor): the op takes plain tensors. Under FSDP2, call it where the module's "
                "parameters are unsharded: in the forward of a module whose unit holds them, or through "
                "hpt_fast.fsdp2.as_forward for a head sharded as a unit of its own (a full_tensor() would leave "
                "its gradient unreduced over the ranks); under tensor parallelism, with the same tokens on "
                "every rank, pass its full_tensor()"
            )
    autocast = _autocast_dtype(hidden.device)
    dtype = compute_dtype(hidden, autocast)
    # under autocast the dtypes differ only where one is float64, which autocast does not cast
    why = "" if autocast is None else f" (under {autocast} autocast, which leaves float64 as it is)"
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16, float16 or float64, got {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., H], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H], got {tuple(weight.shape)}")
    if compute_dtype(weight, autocast) != dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}{why}")
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
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V]=({weight.shape[0]},), got {tuple(bias.shape)}")
        if compute_dtype(bias, autocast) != dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from weight dtype {weight.dtype}{why}")
        devices.add(bias.device)
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if accum_dtype not in (None, torch.float32, dtype):
        raise ValueError(
            f"accum_dtype must be torch.float32, None or the inputs' dtype ({dtype}), got {accum_dtype!r}"
        )


def _integer(value: object) -> Optional[int]:
    """``value`` as a Python int when it is an integer (a numpy one too), else None; never a bool
    or a tensor (whose reading would wait for its device)."""
    if isinstance(value, (bool, Tensor)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_options(backend: str, chunk_size: Optional[int], grad_order: str,
                  accum_dtype: Optional[torch.dtype] = torch.float32) -> Optional[int]:
    """Raise a clear error for a backend name, chunk size, loop order or sum precision the op cannot
    take (what needs no tensor: a caller can check them before it has any; whether accum_dtype is
    the inputs' own is checked with them); chunk_size as an int or None."""
    backends.check_name(backend)
    if grad_order not in GRAD_ORDERS:
        raise ValueError(f"grad_order must be one of {GRAD_ORDERS}, got {grad_order!r}")
    if accum_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"accum_dtype must be torch.float32, None or the inputs' dtype, got {accum_dtype!r}")
    if chunk_size is None:
        return None
    size = _integer(chunk_size)
    if size is None or size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return size


def _scalar_args(
    temperature: float, ignore_index: int, softcap: Optional[float] = None
) -> tuple[float, int, Optional[float]]:
    """(temperature, ignore_index, softcap) as float, int and float or None, or a clear error.

    Any real number / integer is taken (numpy scalars included); tensors are not, since reading
    one on the host would wait for its device.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        # torch.compile traces a numpy scalar as a 0-d ndarray, which is no numbers.Real there
        hint = " (torch.compile traces numpy scalars as arrays: pass float(temperature))" if (
            type(temperature).__module__ == "numpy") else ""
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}{hint}")
    temperature = float(temperature)
    if not 0 < temperature < math.inf:  # NaN fails it too (comparisons, as torch.compile traces them)
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if 1.0 / temperature > _FLOAT32_MAX:
        # the kernels scale by 1 / T in float32: inf would turn every logit into inf or NaN
        raise ValueError(f"temperature must be at least 1 / {_FLOAT32_MAX:.4g} (its inverse is a float32), got {temperature}")
    index = _integer(ignore_index)
    if index is None:
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not _INT64_MIN <= index <= _INT64_MAX:
        raise ValueError(f"ignore_index must fit in int64, got {index}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
            raise TypeError(f"softcap must be a number or None, got {type(softcap).__name__}")
        softcap = float(softcap)
        # softcap * (1 / T) is the kernels' float32 scale: a finite float32 keeps the logits finite
        if not 0 < softcap < math.inf or softcap / temperature > _FLOAT32_MAX:
            raise ValueError(f"softcap must be a finite number > 0 with softcap / temperature a finite "
                             f"float32, got softcap {softcap} at temperature {temperature}")
    return temperature, index, softcap


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """torch.autocast's dtype on ``device`` when autocast is on there (cpu, cuda), else None."""
    if device.type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def compute_dtype(t: Tensor, autocast: Optional[torch.dtype]) -> torch.dtype:
    """The dtype the op's GEMMs take ``t`` in: ``autocast`` (see ``_autocast_dtype``) for a
    floating-point tensor other than float64, as autocast casts ``F.linear``'s inputs (the usual
    mixed precision case: bf16 activations, float32 lm_head weight), else t's own.

    The op casts its inputs to it itself and gives each input its gradient in the input's own
    dtype: a float32 weight's gradient is summed over the logits blocks in float32 straight into
    it, with no rounding to bf16 in between (on CUDA; see ``op_passes.matmul_into``) and no bf16 gradient
    or float32 buffer beside it.
    """
    if autocast is not None and t.is_floating_point() and t.dtype != torch.float64:
        return autocast
    return t.dtype


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast disabled on ``device``: the op's GEMMs already run in the inputs' dtype, and its
    per-token math (row statistics, ``token_loss_fn``) is float32 by contract."""
    if device.type not in _AUTOCAST_DEVICES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def valid_rows(targets: Tensor, ignore_index: int, vocab: int) -> Optional[Tensor]:
    """Flat indices int64 [Nv] of the non-ignored targets [...] (int64 or int32), or None when
    every position is valid.

    Raises for ids outside [0, V): the kernels index by them and must never read out of bounds.
    """
    # compared as int64: against int32 targets torch would wrap an ignore_index outside int32's
    # range onto a real id, dropping its positions without a word
    flat = targets.reshape(-1).long()
    valid = flat != ignore_index
    bad = valid & ((flat < 0) | (flat >= vocab))
    # both answers in one device-to-host read: each read waits for the device (a GPU profile
    # showed 50-150 us gaps around each of these checks before the first GEMM)
    any_bad, all_valid = torch.stack((bad.any(), valid.all())).tolist()
    if any_bad:
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"target id {int(flat[pos])} at flat position {pos} is outside [0, {vocab}) and is not "
            f"ignore_index ({ignore_index})"
        )
    if all_valid:
        return None
    return valid.nonzero().squeeze(1)


def scatter_rows(values: Tensor, index: Optional[Tensor], n_total: int, shape: tuple) -> Tensor:
    """Place per-valid-row values [Nv, ...] back at their rows of [n_total, ...], reshaped to
    ``shape`` (0 elsewhere)."""
    if index is None:
        return values.reshape(shape)
    full = values.new_zeros((n_total, *values.shape[1:]))
    return full.index_copy(0, index, values).reshape(shape)


def gather_rows(values: Tensor, index: Optional[Tensor]) -> Tensor:
    """The rows ``index`` of values [n, ...] (all of them, contiguous, when index is None)."""
    return values.contiguous() if index is None else values.index_select(0, index)


def gather_valid(hidden: Tensor, targets: Tensor, index: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """hidden [..., H] -> [Nv, H] and targets [...] -> int64 [Nv] of the scored positions ``index``
    (differentiable: autograd scatters mode B's grad_hidden back)."""
    return gather_rows(hidden.reshape(-1, hidden.shape[-1]), index), gather_rows(targets.reshape(-1).long(), index)


def checked_args(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    temperature: float,
    ignore_index: int,
    backend: str,
    chunk_size: Optional[int],
    grad_order: str,
    accum_dtype: Optional[torch.dtype],
    softcap: Optional[float] = None,
) -> tuple[float, int, Optional[int], Optional[float], torch.dtype]:
    """Check every argument that can be checked without reading a tensor's values (which would
    wait for its device; the target ids are checked by ``valid_rows``), before any work starts.

    Returns (temperature, ignore_index, chunk_size, softcap) as float, int, int or None and float
    or None, and the GEMMs' dtype, the one autocast would give ``F.linear`` (see ``compute_dtype``). Runs under
    torch.compile's tracing too: everything here is decided by shapes, dtypes and devices.
    """
    temperature, ignore_index, softcap = _scalar_args(temperature, ignore_index, softcap)
    chunk_size = check_options(backend, chunk_size, grad_order)
    _check_inputs(hidden, weight, targets, bias, accum_dtype)
    return temperature, ignore_index, chunk_size, softcap, compute_dtype(hidden, _autocast_dtype(hidden.device))
