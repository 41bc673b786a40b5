"""How long each phase of one fused-op step takes, on the host and on the device's timeline, without
the profiler.

torch.profiler showed the GPU idle for about 2.8 ms before the op's first kernel
(``results_gpu_h200_profile.md``), but may itself be the cause. This script wraps the op's phases
(functions of ``hpt_fast.op_inputs``, ``op_plan``, ``op_passes`` and ``op_token_loss``, looked up by
name at call time) with a host clock and, on CUDA, a pair of CUDA events, runs plain steps, and
prints per phase the host time and the device-timeline time between its two events (which includes
any time the device waited for the host), beside the whole step's and the step's time outside every
phase. In token order mode B's token_loss_fn runs inside the statistics pass and is counted in both
rows. A phase whose device time far exceeds its kernels' shows where the device sat idle.

    python -m bench.phase_times --impls hpt_b_triton,hpt_a_triton --device cuda
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time
from contextlib import ExitStack
from typing import Callable
from unittest import mock

import torch

from bench.fused_op_table import DTYPES, Shape, machine_description
from bench.cli import check_device, cli_description, implementations_named
from bench.implementations import synchronize
from bench.profile_op import warm_step
from hpt_fast import op_inputs, op_passes, op_plan, op_token_loss

# (label, owner, attribute): the op's phases in call order
PHASES = [
    ("targets check (host syncs)", op_inputs, "valid_rows"),
    ("gather valid rows", op_inputs, "gather_valid"),
    ("plan", op_plan, "make_plan"),
    ("statistics pass", op_passes, "stats_pass"),
    ("token_loss_fn and its gradient", op_token_loss, "token_loss_grads"),
    ("gradient pass (recomputed blocks)", op_passes.GradientPass, "recompute"),
    ("finiteness check (host sync)", op_token_loss, "check_finite"),
    ("gradient results", op_passes.GradientPass, "result"),
]


# the step's time in none of the phases: argument checks, allocation, backward, autograd
OUTSIDE = "outside these phases (checks, allocation, backward)"


class _Clock:
    """Host seconds and, on CUDA, device-timeline milliseconds per phase for one step."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.host: dict[str, float] = {}
        self.events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {}
        # phases may nest (token order's token_loss_fn runs inside the statistics pass): only the
        # outermost calls count towards the time outside every phase
        self.depth = 0
        self.top_host = 0.0
        self.top_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def wrap(self, label: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            pair = None
            if self.cuda:
                pair = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                pair[0].record()
            start = time.perf_counter()
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                took = time.perf_counter() - start
                self.host[label] = self.host.get(label, 0.0) + took
                if pair is not None:
                    pair[1].record()
                    self.events.setdefault(label, []).append(pair)
                if self.depth == 0:
                    self.top_host += took
                    if pair is not None:
                        self.top_events.append(pair)

        return timed

    def device_ms(self, label: str) -> float:
        return sum(a.elapsed_time(b) for a, b in self.events.get(label, []))

    def top_device_ms(self) -> float:
        return sum(a.elapsed_time(b) for a, b in self.top_events)


def time_phases(name: str, shape: Shape, dtype: str, device: str, steps: int) -> str:
    """The markdown table of implementation ``name``'s phases, medians over ``steps`` steps."""
    impl, problem, step = warm_step(name, shape, dtype, device)
    cuda = problem.device.type == "cuda"
    host: dict[str, list[float]] = {}
    dev: dict[str, list[float]] = {}
    for _ in range(steps):
        clock = _Clock(cuda)
        problem.zero_grads()
        synchronize(problem.device)
        with ExitStack() as stack:
            for label, owner, attr in PHASES:
                stack.enter_context(mock.patch.object(owner, attr, clock.wrap(label, getattr(owner, attr))))
            begin = torch.cuda.Event(enable_timing=True) if cuda else None
            end = torch.cuda.Event(enable_timing=True) if cuda else None
            if begin is not None:
                begin.record()
            start = time.perf_counter()
            step()
            if end is not None:
                end.record()
            synchronize(problem.device)
            host.setdefault("whole step", []).append((time.perf_counter() - start) * 1e3)
        if cuda:
            dev.setdefault("whole step", []).append(begin.elapsed_time(end))
        for label, _, _ in PHASES:
            host.setdefault(label, []).append(clock.host.get(label, 0.0) * 1e3)
            if cuda:
                dev.setdefault(label, []).append(clock.device_ms(label))
        host.setdefault(OUTSIDE, []).append(host["whole step"][-1] - clock.top_host * 1e3)
        if cuda:
            dev.setdefault(OUTSIDE, []).append(dev["whole step"][-1] - clock.top_device_ms())
    lines = [f"### {impl.label}: {shape} {dtype}, median of {steps} steps", "",
             "| phase | host ms | device timeline ms |", "| --- | --- | --- |"]
    for label in ["whole step"] + [p[0] for p in PHASES] + [OUTSIDE]:
        d = f"{statistics.median(dev[label]):.2f}" if cuda else "—"
        lines.append(f"| {label} | {statistics.median(host[label]):.2f} | {d} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=cli_description(__doc__))
    parser.add_argument("--impls", required=True, type=lambda s: s.split(","))
    parser.add_argument("--shape", default="8192x3584x151936", type=Shape.parse)
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    implementations_named(parser, args.impls, args.device)
    print(machine_description(args.device) + "\n")
    for name in args.impls:
        print(time_phases(name, args.shape, args.dtype, args.device, args.steps) + "\n", flush=True)


if __name__ == "__main__":
    main()
