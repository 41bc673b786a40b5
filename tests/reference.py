"""Float64 reference of the fused op: materialised logits, log_softmax, gather, entropy."""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor


def backend_device(backend: str) -> torch.device:
    """Where a backend's test tensors live: Triton's on the GPU when there is one (conftest turns
    the interpreter on only without one), the C++ backend's on the CPU, and the torch backend's on
    the device that ``HPT_FAST_TEST_TORCH_DEVICE`` names ("cpu", the default, or "cuda"), so a GPU
    run can check the readable reference on the device too."""
    if backend == "torch":
        name = os.environ.get("HPT_FAST_TEST_TORCH_DEVICE", "cpu")
        if name not in ("cpu", "cuda"):
            raise ValueError(f"HPT_FAST_TEST_TORCH_DEVICE must be 'cpu' or 'cuda', not {name!r}")
        if name == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("HPT_FAST_TEST_TORCH_DEVICE=cuda, but torch sees no GPU")
        return torch.device(name)
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


class _RoundTo(torch.autograd.Function):
    """x rounded to ``dtype`` and back to float64, with a straight-through gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, dtype: torch.dtype) -> Tensor:
        return x.to(dtype).to(torch.float64)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def reference_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    logits_dtype: Optional[torch.dtype] = None,
    softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    """logp and entropy [...] in float64 (0 at ignored positions), differentiable.

    ``logits_dtype``: round the logits to it first, as a GEMM in that dtype rounds its output
    (the gradient passes straight through), so a comparison measures the rest of the arithmetic.
    ``softcap``: the logits become softcap * tanh(logits / softcap) (after that rounding, as in
    the op, whose GEMM output is what it caps), before the temperature.
    """
    h, w = hidden.double(), weight.double()
    logits = h @ w.t()
    if bias is not None:
        logits = logits + bias.double()
    if logits_dtype is not None:
        logits = _RoundTo.apply(logits, logits_dtype)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    valid = targets != ignore_index
    logp = logprobs.gather(-1, targets.clamp(0, weight.shape[0] - 1).unsqueeze(-1)).squeeze(-1)
    # -inf logits (masked vocabulary entries) have p = 0: their term is 0 (clamped, not 0 * -inf)
    entropy = -(logprobs.exp() * logprobs.clamp(min=torch.finfo(logprobs.dtype).min)).sum(-1)
    return logp * valid, entropy * valid


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected| (NaN and inf count as infinitely wrong)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(actual).all():
        return float("inf")
    scale = expected.abs().max().clamp_min(1e-12)
    return float((actual - expected).abs().max() / scale) if actual.numel() else 0.0
