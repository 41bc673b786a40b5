"""Tile width and warps of the two Triton row kernels, swept on one logits block.

The fused op spends its non-GEMM time in two memory-bound passes over each logits block:
``row_stats`` reads the block once (max, sum of exp, entropy sum per row; with ``--sums`` also
the two sums of mode A's logit mean and log sum p^2), ``grad_logits`` reads it and writes its
gradient over it. This script times both kernels on a [rows, cols] block for
each BLOCK_V and num_warps, beside a plain ``copy_`` of the block (one read and one write, what
the memory system gives an elementwise pass), and prints the achieved bandwidth; the backend's
current choice is marked. On CPU it runs under TRITON_INTERPRET=1 at small sizes, which checks
the script, not the numbers.

    python -m bench.row_kernel_sweep --device cuda                      # 8192 x 21760 bf16
    python -m bench.row_kernel_sweep --device cuda --cols 8000,151936
    python -m bench.row_kernel_sweep --device cuda --sums               # row_stats with and without the sums
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch

from bench.fused_op_table import machine_description
from bench.cli import check_device, cli_description
from bench.implementations import synchronize
from hpt_fast.backends import row_state
from hpt_fast.backends import triton_backend as tb

STATS_BLOCKS = (1024, 2048, 4096, 8192)
GRAD_BLOCKS = (512, 1024, 2048, 4096)
WARPS = (4, 8, 16)


def median_us(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` in microseconds over ``repeats`` calls, after two untimed ones
    (compilation and first touch)."""
    for _ in range(2):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def sweep(rows: int, cols: int, dtype: torch.dtype, device: torch.device, repeats: int, sums: bool = False) -> str:
    """The markdown table of one block shape. Every configuration's result is compared with the
    current one's (same: equal within float32 summation-order rounding); ``sums``: row_stats also
    with the logit sums (``with_sums``), each configuration beside its run without them."""
    gen = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(rows, cols, generator=gen, device=device) * 4).to(dtype)
    work = torch.empty_like(logits)
    targets = torch.randint(0, cols, (rows,), generator=gen, device=device)
    m = logits.float().amax(dim=1)
    norm = torch.stack([m, torch.logsumexp(logits.float() - m[:, None], dim=1)], dim=1)
    entropy = torch.rand(rows, generator=gen, device=device) * 5
    g_logp = torch.randn(rows, generator=gen, device=device)
    g_ent = torch.randn(rows, generator=gen, device=device)
    initial = row_state.empty(rows, device)
    state = initial.clone()
    block_bytes = logits.numel() * logits.element_size()

    def fresh_state():
        state.copy_(initial)

    lines = [f"### rows {rows}, cols {cols}, {str(dtype).replace('torch.', '')} "
             f"({block_bytes / 2**20:.0f} MiB)", "",
             "| kernel | BLOCK_V | warps | us | GB/s | result |", "| --- | --- | --- | --- | --- | --- |"]

    def row(name: str, block: str, warps: str, us: float, moved: int, same: str, current: bool = False) -> None:
        mark = " (current)" if current else ""
        lines.append(f"| {name}{mark} | {block} | {warps} | {us:.1f} | {moved / us / 1e3:.0f} | {same} |")

    def same_as(got: torch.Tensor, want: torch.Tensor) -> str:
        return "same" if torch.allclose(got.double(), want.double(), rtol=1e-5, atol=1e-6) else "DIFFERS"

    row("copy_ (read + write)", "—", "—", median_us(lambda: work.copy_(logits), device, repeats), 2 * block_bytes, "—")
    stats_current = tb._block(cols, tb._STATS_MAX_BLOCK_V)
    want_states = {}
    for with_sums in (False, True) if sums else (False,):
        fresh_state()
        tb.row_stats(logits, targets, 1.0, True, state, with_sums=with_sums)
        want_states[with_sums] = state.clone()
    tb.grad_logits(logits, targets, norm, entropy, g_logp, g_ent, 1.0, work)
    want_grad = work.clone()
    for block_v in sorted(set(STATS_BLOCKS) | {stats_current}):
        split_v = tb._split_size(rows, cols, block_v, logits.device)
        for warps in WARPS:
            for with_sums, want_state in want_states.items():
                def run_stats():
                    fresh_state()
                    tb._row_stats(logits, targets, 1.0, True, state, 0, block_v, split_v, warps, with_sums=with_sums)
                current = block_v == stats_current and warps == tb._STATS_WARPS
                us = median_us(run_stats, device, repeats)
                name = "row_stats (entropy, sums)" if with_sums else "row_stats (entropy)"
                row(name, str(block_v), str(warps), us, block_bytes, same_as(state, want_state), current)
    grad_current = tb._block(cols, tb._GRAD_MAX_BLOCK_V)
    for block_v in sorted(set(GRAD_BLOCKS) | {grad_current}):
        for warps in WARPS:
            # the op writes the gradient over the logits; a separate output moves the same bytes
            # and leaves the input intact for the next call
            def run_grad():
                tb._grad_logits(logits, targets, norm, entropy, g_logp, g_ent, 1.0, work, 0, block_v, warps)
            current = block_v == grad_current and warps == tb._warps(block_v)
            us = median_us(run_grad, device, repeats)
            row("grad_logits (entropy)", str(block_v), str(warps), us, 2 * block_bytes, same_as(work, want_grad),
                current)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=cli_description(__doc__))
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--cols", default="21760", help="comma-separated block widths")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sums", action="store_true", help="also time row_stats with the logit sums")
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--device cpu runs the kernels under Triton's interpreter: set TRITON_INTERPRET=1")
    print(machine_description(args.device) + "\n")
    device = torch.device(args.device)
    for cols in (int(c) for c in args.cols.split(",")):
        print(sweep(args.rows, cols, getattr(torch, args.dtype), device, args.repeats, args.sums) + "\n", flush=True)


if __name__ == "__main__":
    main()
