"""Triton kernels behind the ``triton`` backend (``hpt_fast.backends.triton_backend``)."""
from .grad_logits import grad_logits_kernel
from .row_stats import row_stats_combine_kernel, row_stats_kernel

__all__ = ["grad_logits_kernel", "row_stats_combine_kernel", "row_stats_kernel"]
