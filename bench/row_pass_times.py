"""How long the row passes of one logits block take on the CPU, per backend, without the GEMMs.

Times each CPU backend's ``row_stats`` (with and without the entropy's sum) and ``grad_logits``
(with an entropy term, written in place) on one ``[tokens, vocab]`` logits block, float32 and
bf16: the part of the op's step that the backends themselves own, which a whole step's time
(``bench.fused_op_table``) hides under its GEMMs and their run-to-run noise. Each figure is the
fastest and the median of ``--repeats`` calls after one untimed call.

    python -m bench.row_pass_times                      # 512 x 32768
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time
from typing import Callable, Optional

import torch

from bench.cli import cli_description
from bench.fused_op_table import machine_description
from hpt_fast import backends
from hpt_fast.backends import row_state

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def timings(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(fastest, median) of ``repeats`` timed calls after one untimed call, in ms."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times), statistics.median(times)


def passes(module, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The timed calls of one backend on ``logits`` [C, V] (left unchanged by every call)."""
    rows = logits.shape[0]
    state = row_state.empty(rows, logits.device)
    module.row_stats(logits, targets, 1.0, True, state)
    _, norm, entropy = row_state.finish(state, True)
    g = torch.Generator().manual_seed(1)
    g_logp, g_ent = torch.randn(rows, generator=g), torch.randn(rows, generator=g)
    out = torch.empty_like(logits)
    fresh = functools.partial(row_state.empty, rows, logits.device)
    return {
        "row_stats": lambda: module.row_stats(logits, targets, 1.0, False, fresh()),
        "row_stats, entropy": lambda: module.row_stats(logits, targets, 1.0, True, fresh()),
        "grad_logits, entropy": lambda: module.grad_logits(logits, targets, norm, entropy, g_logp, g_ent, 1.0, out),
    }


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=cli_description(__doc__))
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.vocab < 1 or args.repeats < 1:
        parser.error("--tokens, --vocab and --repeats must be >= 1")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    names = [b for b in ("cpu", "torch") if b in backends.available()]
    print(f"## Row passes of one logits block, {args.tokens} x {args.vocab}, on the CPU\n")
    print(machine_description("cpu"))
    print(f"- fastest and median of {args.repeats} calls after one untimed call\n")
    print("| backend | pass | " + " | ".join(f"{d} ms (median)" for d in DTYPES) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in DTYPES) + " |")
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(args.tokens, args.vocab, generator=g) * 3
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    for name in names:
        module = backends.load(name)
        cells: dict[str, list[str]] = {}
        for dtype in DTYPES.values():
            for label, fn in passes(module, raw.to(dtype), targets).items():
                fastest, median = timings(fn, args.repeats)
                cells.setdefault(label, []).append(f"{fastest:.2f} ({median:.2f})")
        for label, row in cells.items():
            print(f"| {name} | {label} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
