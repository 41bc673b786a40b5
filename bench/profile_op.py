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
import json
import os
import statistics
import tempfile
import time
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from bench.fused_op_table import DTYPES, Shape, _timed, machine_description
from bench.cli import check_device, cli_description, implementations_named
from bench.implementations import Impl, Problem, implementations, make_problem, synchronize


# unprofiled steps timed before the profiled one, for the profiler's own overhead
PLAIN_STEPS = 5
STEP_LABEL = "profiled step"
# trace categories of device work
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def warm_step(name: str, shape: Shape, dtype: str, device: str) -> tuple[Impl, Problem, Callable[[], None]]:
    """Implementation ``name``'s step on a fresh problem, run once at full size (compilation,
    autotuning, the allocator's first sizes), with its gradients dropped again."""
    impl = next(i for i in implementations(device) if i.name == name)
    problem = make_problem(shape.tokens, shape.hidden, shape.vocab, DTYPES[dtype], device)
    step = impl.build(problem)
    step()
    problem.zero_grads()
    return impl, problem, step


def profile_step(name: str, shape: Shape, dtype: str, device: str, rows: int, gaps: int = 0) -> str:
    """The profiler's table for one step of implementation ``name``, the step's wall time with and
    without the profiler and, on CUDA with ``gaps`` > 0, the device's idle gaps (``idle_gaps``)."""
    impl, problem, step = warm_step(name, shape, dtype, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    plain_ms = [_timed(step, problem) for _ in range(PLAIN_STEPS)]
    problem.zero_grads()
    synchronize(problem.device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        with record_function(STEP_LABEL):
            step()
            synchronize(problem.device)
        wall_ms = (time.perf_counter() - start) * 1e3
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60)
    text = (f"### {impl.label}: {shape} {dtype}\n\n```\n{table}\n```\nstep wall time under the profiler: "
            f"{wall_ms:.1f} ms; without it, median of {PLAIN_STEPS}: {statistics.median(plain_ms):.1f} ms\n")
    if device == "cuda" and gaps:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(path)
            with open(path) as f:
                text += "\n" + idle_gaps(json.load(f)["traceEvents"], gaps) + "\n"
    return text


def _interval(e: dict) -> tuple[float, float]:
    return float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))


def idle_gaps(events: list[dict], top: int, min_gap_us: float = 20.0) -> str:
    """Where the device sat idle during the profiled step: the step's span, the device's busy time
    (union of kernels, copies and memsets), and the ``top`` longest gaps of at least
    ``min_gap_us`` between device work, each with the device work on either side and the host
    calls (ops, CUDA runtime calls) that ran during most of it. ``events``: a Chrome trace's
    traceEvents as torch.profiler exports them (timestamps in microseconds)."""
    done = [e for e in events if e.get("ph") == "X"]
    device = sorted((e for e in done if e.get("cat") in DEVICE_CATS), key=lambda e: float(e["ts"]))
    steps = [e for e in done if e.get("name") == STEP_LABEL and e.get("cat") == "user_annotation"]
    if not device or not steps:
        return "no device activity or step range in the trace"
    s0, s1 = _interval(steps[0])
    host = [e for e in done if e.get("cat") in ("cpu_op", "cuda_runtime", "cuda_driver")]
    busy, gaps, end, prev = 0.0, [], s0, "(step start)"
    for e in device:
        a, b = _interval(e)
        if a - end >= min_gap_us:
            gaps.append((a - end, end, a, prev, e["name"]))
        busy += max(0.0, b - max(a, end))
        if b > end:
            end, prev = b, e["name"]
    if s1 - end >= min_gap_us:
        gaps.append((s1 - end, end, s1, prev, "(step end)"))
    idle = sum(g[0] for g in gaps)
    lines = [f"Device busy {busy / 1e3:.2f} ms of the step's {(s1 - s0) / 1e3:.2f} ms; "
             f"{len(gaps)} gaps of {min_gap_us:g} us or more, {idle / 1e3:.2f} ms in all. The longest:", "",
             "| gap us | at ms | after | before | host calls during most of it |", "| --- | --- | --- | --- | --- |"]
    for length, a, b, before, after in sorted(gaps, reverse=True)[:top]:
        during = sorted(((min(b, _interval(h)[1]) - max(a, _interval(h)[0]), h["name"]) for h in host
                         if _interval(h)[0] < b and _interval(h)[1] > a), reverse=True)
        names = ", ".join([f"{n[:40]} {o:.0f}" for o, n in during if o >= 0.5 * length][:4]) or "—"
        lines.append(f"| {length:.0f} | {(a - s0) / 1e3:.2f} | {before[:40]} | {after[:40]} | {names} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=cli_description(__doc__))
    parser.add_argument("--impls", required=True, type=lambda s: s.split(","))
    parser.add_argument("--shape", default="8192x3584x151936", type=Shape.parse)
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--gaps", type=int, default=12, help="longest device idle gaps to list (CUDA)")
    args = parser.parse_args()
    check_device(parser, args.device)
    implementations_named(parser, args.impls, args.device)
    print(machine_description(args.device) + "\n")
    for name in args.impls:
        print(profile_step(name, args.shape, args.dtype, args.device, args.rows, args.gaps), flush=True)


if __name__ == "__main__":
    main()
