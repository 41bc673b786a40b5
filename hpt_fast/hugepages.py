"""Large CPU buffers backed by transparent huge pages.

The fused op allocates its logits block and its input gradients (hundreds of MiB at LLM
vocabularies) on every call. A fresh allocation of that size is a new ``mmap``: its first touch
takes one page fault per 4 KiB page, which on the 2-core development CPU cost 5-10% of a whole
forward + backward (a profile whose output was not kept; the README's CPU Benchmarks give the
tables before and after). Asking the kernel for 2 MiB pages before the first
touch (``madvise(MADV_HUGEPAGE)``) cuts the faults 512-fold. PyTorch's own switch,
``THP_MEM_ALLOC_ENABLE``, is read once at its first allocation, so a library cannot turn it on.

Where the kernel has no transparent huge pages (``never``), or off Linux, the advice is a no-op.
"""
from __future__ import annotations

import ctypes
import sys
from typing import Optional

import torch
from torch import Tensor

_HUGE_PAGE = 2 * 2**20  # x86-64 and aarch64 (4 KiB base pages)
# Below this a buffer spans at most one huge page: nothing to gain.
_MIN_BYTES = 2 * _HUGE_PAGE
_MADV_HUGEPAGE = 14  # linux/mman-common.h


def _load_madvise() -> Optional[ctypes._CFuncPtr]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _load_madvise()


def huge_page_range(ptr: int, nbytes: int) -> Optional[tuple[int, int]]:
    """(start, length) of the whole 2 MiB pages inside [ptr, ptr + nbytes), or None if there is none."""
    start = -(-ptr // _HUGE_PAGE) * _HUGE_PAGE
    end = (ptr + nbytes) // _HUGE_PAGE * _HUGE_PAGE
    return (start, end - start) if end > start else None


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``; on CPU, a buffer of 4 MiB or more is
    advised to be backed by huge pages before anything touches it (see the module docstring).

    The advice only changes how the memory is mapped, never its contents or size; a refusal by
    the kernel (huge pages disabled) is ignored.
    """
    out = torch.empty(shape, dtype=dtype, device=device)
    nbytes = out.numel() * out.element_size()
    if _madvise is not None and out.device.type == "cpu" and nbytes >= _MIN_BYTES:
        span = huge_page_range(out.data_ptr(), nbytes)
        if span is not None:
            _madvise(span[0], span[1], _MADV_HUGEPAGE)
    return out
