"""Does the card keep its GEMM rate through a long run of work, and what does the op take per
step in that steady state?

``bench.fused_op_table``'s floor times each bare GEMM alone, after a device sync and the host's
own work (one ~11 ms GEMM at a time on an H200 at 8192 x 3584 x 151936), while a step of the op
keeps the device busy for ~50 ms. Where the card lowers its clock under a sustained load (its
power cap), the floor's GEMMs run faster than any GEMM inside a long step, and "x floor" charges
the op for the card. This script times, per unit of work and with CUDA events between units:

- bare GEMMs (the table's three, cycled) in bursts of 1, 3 and ``--burst`` back to back, each
  burst after the same idle pause;
- ``--steps`` steps of each implementation back to back (a training-like steady state), the
  gradients dropped on the host between steps, as the table does;
- three bare GEMMs as one unit, ``--steps`` units back to back: the floor at the steady state.

Every measurement starts after ``--pause`` seconds of idle device. While it runs, nvidia-smi
(when present) samples the SM clock, power and the clock-limit reasons every 10 ms; each row
gives the samples inside its window. Units' times: first, mean over all, last.

    python -m bench.sustained_rate --device cuda --impls hpt_b_triton,hpt_b_triton_lowp_sum

On CPU (``--device cpu``) the units are timed by the host clock and there is no clock log.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Optional

import torch

from bench.cli import check_device, cli_description, implementations_named
from bench.fused_op_table import DTYPES, Shape, machine_description
from bench.implementations import GEMM_NAMES, Problem, implementations, make_problem, synchronize

# the clock-limit reasons' field was renamed (clocks_throttle_reasons before driver 535)
_SMI_REASONS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")
_SMI_PERIOD_MS = 10
ALONE = "bare GEMM, alone (the table's floor)"


def clock_summary(lines: list[str], start: float, end: float) -> str:
    """'SM MHz min-median, W max, reasons' of the nvidia-smi CSV ``lines`` (timestamp, SM clock,
    power, clock-limit reasons; no header, no units) sampled between wall times start and end."""
    clocks, watts, reasons = [], [], set()
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            at = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            clock, watt = float(parts[1]), float(parts[2])
        except ValueError:
            continue
        if start <= at <= end:
            clocks.append(clock)
            watts.append(watt)
            reasons.add(parts[3])
    if not clocks:
        return "no samples"
    return (f"{min(clocks):.0f}-{statistics.median(clocks):.0f} MHz, {max(watts):.0f} W, "
            f"reasons {'/'.join(sorted(reasons))}")


class ClockLog:
    """nvidia-smi sampling the first GPU every 10 ms into a file (on CUDA, where nvidia-smi
    takes the fields), read back per time window; elsewhere every window reads '—'."""

    def __init__(self, cuda: bool) -> None:
        self.proc: Optional[subprocess.Popen] = None
        self.path = os.path.join(tempfile.mkdtemp(), "smi.csv")
        exe = shutil.which("nvidia-smi") if cuda else None
        fields = next((f"timestamp,clocks.sm,power.draw,{r}" for r in _SMI_REASONS if exe is not None and
                       subprocess.run([exe, f"--query-gpu={r}", "--format=csv", "-i", "0"],
                                      capture_output=True).returncode == 0), None)
        if fields is not None:
            self.file = open(self.path, "w")
            self.proc = subprocess.Popen(
                [exe, f"--query-gpu={fields}", "--format=csv,noheader,nounits", f"-lms={_SMI_PERIOD_MS}", "-i", "0"],
                stdout=self.file, stderr=subprocess.DEVNULL,
            )
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
            self.file.close()

    def window(self, start: float, end: float) -> str:
        """``clock_summary`` of the samples between wall times start and end."""
        if self.proc is None:
            return "—"
        with open(self.path) as f:
            return clock_summary(f.readlines(), start, end)


def timed_units(units: list[Callable[[], None]], pause: float, device: torch.device) -> tuple[list[float], float, float]:
    """Run ``units`` back to back after ``pause`` s idle: (ms of each unit, on CUDA on the
    device's timeline between events, elsewhere by the host clock; wall start, wall end)."""
    synchronize(device)
    time.sleep(pause)
    cuda = device.type == "cuda"
    marks: list = []

    def mark() -> None:
        if cuda:
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()
        else:
            marks.append(time.perf_counter())

    start = time.time()
    mark()
    for unit in units:
        unit()
        mark()
    synchronize(device)
    end = time.time()
    pairs = zip(marks, marks[1:])
    return [a.elapsed_time(b) if cuda else (b - a) * 1e3 for a, b in pairs], start, end


@dataclass
class Measured:
    """One row: ``label``, what one unit is (``unit``), and each unit's milliseconds in order."""

    label: str
    unit: str
    times: list[float]
    clocks: str


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=cli_description(__doc__))
    parser.add_argument("--impls", required=True, type=lambda s: s.split(","))
    parser.add_argument("--shape", default="8192x3584x151936", type=Shape.parse)
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=10, help="steps (or 3-GEMM units) back to back")
    parser.add_argument("--burst", type=int, default=30, help="bare GEMMs in the longest burst (at least 3)")
    parser.add_argument("--pause", type=float, default=0.5, help="idle seconds before each measurement")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.burst < 3 or not args.pause >= 0:
        parser.error(f"need --steps >= 1, --burst >= 3 and --pause >= 0; got {args.steps}, {args.burst}, {args.pause}")
    check_device(parser, args.device)
    args.impls = implementations_named(parser, args.impls, args.device)
    return args


def measure(args: argparse.Namespace) -> list[Measured]:
    """Build the problem and every step, then time the rows (see the module docstring)."""
    shape = args.shape
    problem: Problem = make_problem(shape.tokens, shape.hidden, shape.vocab, DTYPES[args.dtype], args.device)
    gemms = [impl.build(problem) for impl in implementations(args.device) if impl.name in GEMM_NAMES]
    for gemm in gemms:
        gemm()
    steps = {}
    for impl in args.impls:
        step = impl.build(problem)
        step()
        problem.zero_grads()

        def unit(step=step) -> None:
            problem.zero_grads()  # host only: the step allocates fresh gradients, as in the table
            step()

        steps[impl.label] = unit

    def chain() -> None:
        for gemm in gemms:
            gemm()

    rows = [(ALONE, "GEMM", gemms),
            ("bare GEMMs, 3 back to back", "GEMM", gemms),
            (f"bare GEMMs, {args.burst} back to back", "GEMM", [gemms[i % 3] for i in range(args.burst)]),
            (f"3 bare GEMMs as one unit, {args.steps} back to back", "3 GEMMs", [chain] * args.steps)]
    rows += [(f"{label}, {args.steps} steps back to back", "step", [unit] * args.steps) for label, unit in steps.items()]

    log = ClockLog(problem.device.type == "cuda")
    results = []
    try:
        for label, unit_name, units in rows:
            if label == ALONE:
                # one GEMM per measurement, each after its own pause, as the floor's rounds run them
                times, start, end = [], time.time(), 0.0
                for gemm in units * 3:
                    t, _, end = timed_units([gemm], args.pause, problem.device)
                    times += t
            else:
                times, start, end = timed_units(units, args.pause, problem.device)
            results.append(Measured(label, unit_name, times, log.window(start, end)))
    finally:
        log.stop()
    return results


def report(args: argparse.Namespace, results: list[Measured]) -> str:
    """The markdown table of ``results`` (rows in ``measure``'s order) and each step's ratios."""
    lines = [f"### {args.shape} {args.dtype}: ms per unit, {args.pause:g} s idle before each measurement", "",
             "| work | unit | units | first ms | mean ms | last ms | clock and power during it |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r.label} | {r.unit} | {len(r.times)} | {r.times[0]:.2f} | {statistics.mean(r.times):.2f} | "
                     f"{r.times[-1]:.2f} | {r.clocks} |")
    alone = statistics.mean(results[0].times)
    burst = statistics.mean(results[2].times)
    unit3 = statistics.mean(results[3].times)
    lines += ["", f"A GEMM in the {args.burst}-GEMM burst takes {burst / alone:.3f}x one alone; in the 3-GEMM units "
              f"{unit3 / 3 / alone:.3f}x.", "",
              "Each step against three GEMMs (the 6 N H V basis): time / three GEMMs alone, time / three GEMMs of "
              "the burst, and the share of the sustained GEMM rate that is, by the burst and by the 3-GEMM units:", ""]
    for r in results[4:]:
        mean = statistics.mean(r.times)
        lines.append(f"- {r.label}: {mean / (3 * alone):.2f}x, {mean / (3 * burst):.2f}x; "
                     f"{3 * burst / mean:.1%} / {unit3 / mean:.1%}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    results = measure(args)
    print(machine_description(args.device) + "\n")
    print(report(args, results))


if __name__ == "__main__":
    main()
