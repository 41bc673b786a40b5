"""How a bf16 GEMM product bound for a float32 sum should leave a CPU GEMM: whole, or in pieces.

PyTorch's CPU GEMMs write bf16 products, so the op's float32 sums (token order's weight gradient,
vocabulary order's hidden gradient, a float32 gradient under autocast) take each block's product
through a bf16 scratch and add it with the backend's ``accumulate_`` (``op_passes.matmul_into``). This
times one token chunk's weight-gradient product, ``[V, C] @ [C, H]`` added into a float32
``[V, H]`` sum, as one whole product (a ``[V, H]`` scratch, then one pass) and in row pieces of
several sizes (``op_passes.PIECE_BYTES``), each added while it is still in cache.

    python -m bench.product_pieces                      # V 151936, C 441, H 1024 (the default budget's chunk)
"""
from __future__ import annotations

import argparse

import torch

from bench.cli import cli_description
from bench.fused_op_table import machine_description
from bench.gemm_chunking import best_of
from hpt_fast import backends, op_passes


def main() -> None:
    parser = argparse.ArgumentParser(description=cli_description(__doc__))
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunk", type=int, default=441)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--pieces-mib", default="2,4,8,16,32,64", help="comma-separated piece sizes in MiB")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    backend = backends.load("cpu" if "cpu" in backends.available() else "torch")
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(args.chunk, args.vocab, generator=gen).bfloat16()
    hidden = torch.randn(args.chunk, args.hidden, generator=gen).bfloat16()
    total = torch.zeros(args.vocab, args.hidden)
    whole = torch.empty(args.vocab, args.hidden, dtype=torch.bfloat16)

    def whole_product() -> None:
        torch.mm(logits.t(), hidden, out=whole)
        backend.accumulate_(total, whole)

    def pieces() -> None:
        op_passes.matmul_into(total, logits.t(), hidden, True, backend)

    print(f"## One chunk's weight-gradient product into a float32 sum: [{args.vocab}, {args.chunk}] @ "
          f"[{args.chunk}, {args.hidden}], bf16\n")
    print(machine_description("cpu"))
    print(f"- backend {backend.__name__.rsplit('.', 1)[-1]}, fastest of {args.repeats} timed calls after one untimed call\n")
    print("| product | rows per piece | scratch MiB | ms |")
    print("| --- | --- | --- | --- |")
    whole_mib = args.vocab * args.hidden * 2 / 2**20
    print(f"| whole, then one pass | {args.vocab} | {whole_mib:.0f} | {best_of(whole_product, args.repeats) * 1e3:.1f} |",
          flush=True)
    default = op_passes.PIECE_BYTES
    try:
        for mib in (float(x) for x in args.pieces_mib.split(",")):
            op_passes.PIECE_BYTES = int(mib * 2**20)
            rows = min(op_passes.piece_rows(args.hidden, torch.bfloat16), args.vocab)
            mark = " (default)" if op_passes.PIECE_BYTES == default else ""
            print(f"| pieces{mark} | {rows} | {mib:g} | {best_of(pieces, args.repeats) * 1e3:.1f} |", flush=True)
    finally:
        op_passes.PIECE_BYTES = default


if __name__ == "__main__":
    main()
