"""Where one implementation's step spends its time: torch.profiler's table of the kernels and ops.

Usage (from the repository root):
    python -m bench.profile_op --impls hpt_a_triton,hpt_b_triton [--shape 8192x3584x151936]
        [--dtype bfloat16] [--device cuda] [--rows 20]

Each implementation (names as in ``bench.fused_op_table``) is warmed up on its full-size problem,
then one step runs under the profiler; the table is sorted by device time (CPU time on CPU) and
ends with the step's wall-clock time, so a gap between the two shows time the device sat idle.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.fused_op_table import DTYPES, Shape, machine_description
from bench.implementations import implementations, make_problem, synchronize


def profile_step(name: str, shape: Shape, dtype: str, device: str, rows: int) -> str:
    """The profiler's table for one step of implementation ``name``, and the step's wall time."""
    impl = next(i for i in implementations(device) if i.name == name)
    problem = make_problem(shape.tokens, shape.hidden, shape.vocab, DTYPES[dtype], device)
    step = impl.build(problem)
    step()  # warm-up at full size: compilation, autotuning, allocator
    problem.zero_grads()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    synchronize(problem.device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        step()
        synchronize(problem.device)
        wall_ms = (time.perf_counter() - start) * 1e3
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60)
    return f"### {impl.label}: {shape} {dtype}\n\n```\n{table}\n```\nstep wall time under the profiler: {wall_ms:.1f} ms\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impls", required=True, type=lambda s: s.split(","))
    parser.add_argument("--shape", default="8192x3584x151936", type=Shape.parse)
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args()
    print(machine_description(args.device) + "\n")
    for name in args.impls:
        print(profile_step(name, args.shape, args.dtype, args.device, args.rows), flush=True)


if __name__ == "__main__":
    main()
