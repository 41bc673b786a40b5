"""How exact mode B's bf16 gradients are, by how the op sums grad_weight over token chunks.

In bfloat16 / float16, token order sums grad_weight over the token chunks either in a float32
[V, H] buffer, rounded once at the end (``accum_dtype=torch.float32``, the default), or in
grad_weight itself, each chunk's GEMM adding into it (``accum_dtype=None``: one rounding of the
running sum per chunk). On CPU each chunk's product leaves the GEMM in bf16 either way, because
no CPU GEMM in PyTorch takes bf16 inputs and writes float32; on CUDA the float32 sum takes each
product in float32 (cuBLAS with a float32 output). This script measures both, beside the
default's vocabulary order at this shape (grad_weight written once per slab, grad_hidden summed
over the slabs in float32) and all tokens in one block (nothing summed), against a float64
computation of the same loss from the same bf16 inputs, and beside the error of that float64
result rounded once to bf16 (the floor of any bf16 gradient). A last row runs torch AMP's mixed
precision: float32 leaves holding the same values, the forward under autocast in bf16, where the
op writes float32 gradients (below that floor: they are not rounded to bf16 at the end).

    python -m bench.accum_precision                          # tokens 2048, H 1024, V 151936
    python -m bench.accum_precision --tokens 8192            # more token chunks
    python -m bench.accum_precision --device cuda            # on a GPU
"""
from __future__ import annotations

import argparse
import time
from typing import Optional

import torch
from torch import Tensor

from bench.cli import cli_description
from bench.fused_op_table import machine_description
from bench.implementations import Problem, forward_inputs, grpo_token_loss, make_problem, synchronize
from hpt_fast import fused_linear_loss

# the float64 reference's token chunk: a [chunk, V] float64 block at a time
REFERENCE_CHUNK = 256

# (row label, grad_order, chunk_size: None = the memory budget's / "all" = every token, accum_dtype,
# mixed: float32 leaves under autocast)
VARIANTS = [
    ("accum_dtype=float32, auto order", "auto", None, torch.float32, False),
    ("accum_dtype=float32, token order", "tokens", None, torch.float32, False),
    ("accum_dtype=None, auto order", "auto", None, None, False),
    ("one token chunk (nothing summed over blocks)", "tokens", "all", torch.float32, False),
    ("float32 leaves under autocast (float32 gradients), auto order", "auto", None, torch.float32, True),
]


def reference_grads(p: Problem) -> tuple[Tensor, Tensor]:
    """d loss / d hidden [T, H] and d loss / d weight [V, H], float64, of the benchmark's per-token
    loss on the float64 values of the problem's inputs (naive: logits, log_softmax, gather,
    entropy, autograd), a token chunk at a time."""
    hidden, weight = p.hidden.detach().double(), p.weight.detach().double().requires_grad_(True)
    loss_fn = grpo_token_loss(p)
    grad_h = torch.empty_like(hidden)
    grad_w = torch.zeros_like(weight)
    for s in range(0, p.tokens, REFERENCE_CHUNK):
        e = min(p.tokens, s + REFERENCE_CHUNK)
        h = hidden[s:e].requires_grad_(True)
        logp_all = torch.log_softmax(h @ weight.t(), dim=-1)
        logp = logp_all.gather(1, p.targets[s:e, None]).squeeze(1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        rows = torch.arange(s, e, device=p.device)
        loss = loss_fn(logp, entropy, rows).sum()
        gh, gw = torch.autograd.grad(loss, [h, weight])
        grad_h[s:e] = gh
        grad_w += gw
    return grad_h, grad_w


def errors(got: Tensor, want: Tensor) -> tuple[float, float]:
    """(max |got - want| / max |want|, mean |got - want| / mean |want|); inf for non-finite."""
    if not torch.isfinite(got).all():
        return float("inf"), float("inf")
    diff = (got.double() - want).abs()
    return float(diff.max() / want.abs().max()), float(diff.mean() / want.abs().mean())


def run_variant(
    p: Problem, order: str, chunk: Optional[str], accum: Optional[torch.dtype], mixed: bool
) -> tuple[Tensor, Tensor, float]:
    """Mode B's (grad_hidden, grad_weight) and its wall time in seconds; ``mixed``: on the
    problem's float32 leaves (the same values), the forward under autocast in p's dtype."""
    q, forward = forward_inputs(p, mixed)
    p.zero_grads()
    synchronize(p.device)
    start = time.perf_counter()
    with forward():
        loss, _, _ = fused_linear_loss(q.hidden, q.weight, q.targets, grpo_token_loss(q), with_entropy=True,
                                       grad_order=order, chunk_size=q.tokens if chunk == "all" else None,
                                       accum_dtype=accum)
    loss.backward()
    synchronize(p.device)
    seconds = time.perf_counter() - start
    return q.hidden.grad, q.weight.grad, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=cli_description(__doc__))
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    p = make_problem(args.tokens, args.hidden, args.vocab, dtype, args.device)
    want_h, want_w = reference_grads(p)
    print(f"## Mode B gradient error by how blocks are summed: {args.dtype}, tokens {args.tokens}, "
          f"H {args.hidden}, V {args.vocab}\n")
    print(machine_description(args.device))
    print("- error: max |got - float64| / max |float64| and mean |got - float64| / mean |float64| over "
          "each gradient's elements; one call per row (seconds: that call, for orientation only)\n")
    print("| variant | grad_hidden max | grad_hidden mean | grad_weight max | grad_weight mean | s |")
    print("| --- | --- | --- | --- | --- | --- |")
    h_floor, w_floor = errors(want_h.to(dtype), want_h), errors(want_w.to(dtype), want_w)
    print(f"| float64 reference rounded once to {args.dtype} | {h_floor[0]:.2e} | "
          f"{h_floor[1]:.2e} | {w_floor[0]:.2e} | {w_floor[1]:.2e} | — |", flush=True)
    for label, order, chunk, accum, mixed in VARIANTS:
        gh, gw, seconds = run_variant(p, order, chunk, accum, mixed)
        (hm, ha), (wm, wa) = errors(gh, want_h), errors(gw, want_w)
        print(f"| {label} | {hm:.2e} | {ha:.2e} | {wm:.2e} | {wa:.2e} | {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
