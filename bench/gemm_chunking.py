"""What cutting the logits into blocks does to the GEMMs alone (no row kernels).

The fused op's three products, hidden [N, H] x weight [V, H], timed as the op runs them in token
order (chunks of C tokens: logits h_c @ W.T, grad_hidden d_c @ W, grad_weight += d_c.T @ h_c)
and, for the logits GEMM, in vocabulary order (slabs of Vs columns over all N tokens: h @ W_s.T).
The outputs are preallocated and warm, so only the GEMMs' own shapes differ between rows. The
products are the op's own (``bench.implementations.bare_mm``: on CPU in float32 oneDNN's); in
float32 each row is timed again with torch's own GEMMs (``torch.mm`` / ``addmm_``, MKL's), which
is what the op ran before it took oneDNN's, side by side in the same run.

    python -m bench.gemm_chunking                    # N 2048, H 1024, V 151936, fp32 and bf16
    python -m bench.gemm_chunking --chunks 220,512,2048 --slabs 16384
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from bench.cli import cli_description
from bench.fused_op_table import machine_description
from bench.implementations import bare_mm, torch_mm

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def best_of(fn: Callable[[], None], repeats: int) -> float:
    """Fastest of ``repeats`` timed calls after one untimed call, in seconds."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _ranges(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + size)) for s in range(0, n, size)]


# the products a row is timed with: the op's own, and torch's
PRODUCTS = {"op's": bare_mm, "torch's": torch_mm}


def token_order(h: torch.Tensor, w: torch.Tensor, chunk: int, repeats: int, mm: Callable = bare_mm) -> tuple[float, float, float]:
    """Seconds for all chunks of: logits, grad_hidden, grad_weight (summed in place), each
    product by ``mm`` (one of ``PRODUCTS``)."""
    n, vocab = h.shape[0], w.shape[0]
    block = torch.randn(chunk, vocab, dtype=h.dtype) * 0.01
    grad_h = torch.empty_like(h)
    grad_w = torch.zeros_like(w)
    ranges = _ranges(n, chunk)

    def logits() -> None:
        for s, e in ranges:
            mm(h[s:e], w.t(), block[: e - s])

    def d_hidden() -> None:
        for s, e in ranges:
            mm(block[: e - s], w, grad_h[s:e])

    def d_weight() -> None:
        for s, e in ranges:
            mm(block[: e - s].t(), h[s:e], grad_w, add=True)

    return best_of(logits, repeats), best_of(d_hidden, repeats), best_of(d_weight, repeats)


def vocab_order_logits(h: torch.Tensor, w: torch.Tensor, slab: int, repeats: int, mm: Callable = bare_mm) -> float:
    """Seconds for the logits GEMM over all vocabulary slabs of ``slab`` columns, by ``mm``."""
    n = h.shape[0]
    storage = torch.empty(n * slab, dtype=h.dtype)
    ranges = _ranges(w.shape[0], slab)

    def logits() -> None:
        for v0, v1 in ranges:
            # a contiguous [n, v1 - v0] block even for the last, narrower slab, as the op's
            mm(h, w[v0:v1].t(), storage[: n * (v1 - v0)].view(n, v1 - v0))

    return best_of(logits, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=cli_description(__doc__))
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunks", default="220,512,2048", help="token chunk sizes (220: the default budget's at fp32)")
    parser.add_argument("--slabs", default="16384", help="vocabulary slab widths for the logits GEMM")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated, of: " + ", ".join(DTYPES))
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row, the fastest kept (default 5: best of 2 moved rows by up to 1.6x)")
    args = parser.parse_args()
    bad = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if bad:
        parser.error(f"unknown dtype(s) {bad}; choose from {list(DTYPES)}")
    gen = torch.Generator().manual_seed(0)
    print(f"## GEMMs of the fused op by block shape: tokens {args.tokens}, H {args.hidden}, V {args.vocab}\n")
    print(machine_description("cpu"))
    print(f"- best of {args.repeats} timed calls after one warm-up call\n")
    print("| dtype | products | blocks | logits s | grad_hidden s | grad_weight s | sum s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        h = torch.randn(args.tokens, args.hidden, generator=gen).to(dtype)
        w = (torch.randn(args.vocab, args.hidden, generator=gen) * 0.02).to(dtype)
        # torch sends low precision to oneDNN itself: the two would be the same products
        for label, mm in PRODUCTS.items() if dtype == torch.float32 else [("op's", bare_mm)]:
            for chunk in (int(c) for c in args.chunks.split(",")):
                a, b, c = token_order(h, w, chunk, args.repeats, mm)
                print(f"| {name} | {label} | token chunks of {chunk} | {a:.3f} | {b:.3f} | {c:.3f} | {a + b + c:.3f} |",
                      flush=True)
            for slab in (int(s) for s in args.slabs.split(",")):
                a = vocab_order_logits(h, w, slab, args.repeats, mm)
                print(f"| {name} | {label} | vocabulary slabs of {slab} (logits only) | {a:.3f} | — | — | — |", flush=True)


if __name__ == "__main__":
    main()
