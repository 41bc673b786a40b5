"""Float64 reference of the fused op: materialised logits, log_softmax, gather, entropy."""
from __future__ import annotations

import os
from typing import Callable, Optional

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


def _logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], logits_dtype: Optional[torch.dtype]) -> Tensor:
    """hidden @ weight.T + bias in float64, rounded to ``logits_dtype`` (straight-through gradient)."""
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    return logits if logits_dtype is None else _RoundTo.apply(logits, logits_dtype)


def _logprobs(logits: Tensor, targets: Tensor, temperature: float, ignore_index: int,
              softcap: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, entropy, z) of float64 logits: z the capped logits over the temperature."""
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    z = logits / temperature
    logprobs = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    logp = logprobs.gather(-1, targets.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    # -inf logits (masked vocabulary entries) have p = 0: their term is 0 (clamped, not 0 * -inf)
    entropy = -(logprobs.exp() * logprobs.clamp(min=torch.finfo(logprobs.dtype).min)).sum(-1)
    return logp * valid, entropy * valid, z


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
    logp, entropy, _ = _logprobs(_logits(hidden, weight, bias, logits_dtype), targets, temperature, ignore_index,
                                 softcap)
    return logp, entropy


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected| (NaN and inf count as infinitely wrong)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(actual).all():
        return float("inf")
    scale = expected.abs().max().clamp_min(1e-12)
    return float((actual - expected).abs().max() / scale) if actual.numel() else 0.0


def float32_error_scales(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    terms: Callable[[Tensor, Tensor], Tensor],
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    logits_dtype: Optional[torch.dtype] = None,
    softcap: Optional[float] = None,
) -> dict[str, tuple[float, float, float]]:
    """What the fused op's errors are measured against, per output: ``(scale, floor, fan)``,
    where an error within ``tol * scale + k * eps * floor + u * fan`` is the inputs' rounding
    (``tol``, by dtype), the float32 arithmetic's (``eps``) or, for a 16-bit dtype, its subnormal
    spacing ``u``, not a defect.

    ``terms(logp [N], entropy [N]) -> [M]``: the objective whose gradient is checked, as a sum of
    per-token terms (float64). Outputs: ``logp``, ``entropy``, ``loss`` (the terms' sum),
    ``hidden``, ``weight``, ``bias``. The scales (maxima over the output's elements):
    - values: their own magnitude; the floor of logp and entropy is ``1 + max |z|`` (z the scaled
      logits: float32 holds z to eps * |z|), the loss's the terms' magnitudes plus their
      sensitivity to that error.
    - gradients: the products of magnitudes (``|dL/dlogits| @ |weight|``, ...), which bound what
      rounding the gradient block (bf16 GEMM inputs) or summing it costs, where ``|G @ W|``
      cancels. The floor is float32's resolution of the block near p = 1, where ``1 - p`` and
      ``log p + H`` are differences of nearly equal numbers: ``(|dL/dlogp| + 2 |dL/dH|) * p``,
      times the cap's and temperature's factor, through the same products. The fan is what
      one unit in each element of the gradient block adds up to through the same products: a
      block element rounded to a 16-bit subnormal is off by up to its spacing (values: 1).
    """
    h = hidden.detach().double().reshape(-1, hidden.shape[-1])
    w = weight.detach().double()
    x = _logits(h, w, None if bias is None else bias.detach(), logits_dtype).requires_grad_()
    t = targets.reshape(-1)
    logp, entropy, z = _logprobs(x, t, temperature, ignore_index, softcap)
    per_term = terms(logp, entropy)
    g_logits, g_logp, g_ent = torch.autograd.grad(per_term.sum(), [x, logp, entropy], allow_unused=True,
                                                 retain_graph=True)
    g_logp = torch.zeros_like(logp) if g_logp is None else g_logp
    g_ent = torch.zeros_like(entropy) if g_ent is None else g_ent
    chain = torch.autograd.grad(z.sum(), x)[0]  # dz / dx, elementwise: the cap's and temperature's factor

    with torch.no_grad():
        valid = t != ignore_index
        reach = 1 + z.abs().amax(-1) * valid
        g_abs = g_logits.abs()
        g_floor = (g_logp.abs() + 2 * g_ent.abs()).unsqueeze(-1) * torch.softmax(z, dim=-1) * chain.abs()
        w_abs, h_abs = w.abs(), h.abs()

        def most(x: Tensor) -> float:
            return float(x.max()) if x.numel() else 0.0

        return {
            "logp": (most(logp.abs()), most(reach), 1.0),
            "entropy": (most(entropy.abs()), most(reach), 1.0),
            "loss": (abs(float(per_term.sum())),
                     float(per_term.abs().sum() + ((g_logp.abs() + g_ent.abs()) * reach).sum()), 1.0),
            "hidden": (most(g_abs @ w_abs), most(g_floor @ w_abs), max(1.0, most(w_abs.sum(0)))),
            "weight": (most(g_abs.t() @ h_abs), most(g_floor.t() @ h_abs), max(1.0, most(h_abs[valid].sum(0)))),
            "bias": (most(g_abs.sum(0)), most(g_floor.sum(0)), max(1.0, float(valid.sum()))),
        }
