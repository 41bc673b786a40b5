"""One markdown table per shape: the fused op against its GEMM floor, naive PyTorch, Liger, CCE and TRL.

Usage (from the repository root):
    python -m bench.fused_op_table [--shapes 2048x1024x32768,2048x1024x151936]
        [--dtypes float32,bfloat16] [--repeats N] [--device cpu|cuda]

Every row is forward + backward w.r.t. hidden and weight. Each implementation is first warmed up
once on a few tokens at the same H, V and dtype (library initialisation, CCE's compilation), then
timed over ``--repeats`` full-size rounds and the median reported; within a round the
implementations run one after another (round-robin, the order rotating each round), so drift of a
shared machine hits all of them alike.
Peak memory is measured once per implementation: on CPU in a fresh subprocess (``--memory-child``),
so one implementation's heap cannot hide another's peak; on CUDA in the timing process, after the
rounds, since the caching allocator's peak counts live tensors only.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from bench.cli import check_device, cli_description, implementations_named
from bench.implementations import GEMM_NAMES, SEQ_LEN, Impl, Problem, implementations, make_problem, synchronize
from hpt_fast import op_plan

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SHAPES = "2048x1024x32768,2048x1024x151936"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# Tokens of the warm-up problem: enough for every implementation's code path, cheap at any V.
WARMUP_TOKENS = 64
MEMORY_CHILD_TIMEOUT_S = 900


@dataclass(frozen=True)
class Shape:
    tokens: int
    hidden: int
    vocab: int

    @classmethod
    def parse(cls, text: str) -> "Shape":
        """'2048x1024x32768' -> Shape(tokens=2048, hidden=1024, vocab=32768)."""
        parts = text.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"shape must be TOKENSxHIDDENxVOCAB, got {text!r}")
        tokens = int(parts[0])
        if tokens > SEQ_LEN and tokens % SEQ_LEN:
            # the problems are sequences of SEQ_LEN tokens (Liger's rows take a [B, S] layout)
            raise argparse.ArgumentTypeError(f"{text}: tokens above {SEQ_LEN} must be a multiple of {SEQ_LEN}")
        return cls(*map(int, parts))

    def __str__(self) -> str:
        return f"{self.tokens}x{self.hidden}x{self.vocab}"


@dataclass
class DtypeResult:
    """What one (shape, dtype) case measured, keyed by Impl.name.

    times_ms: the timed rounds. memory: peak extra bytes / naive fp32 logits bytes.
    notes: why a cell has no number ("fails: ...", "skipped: ...").
    """

    times_ms: dict[str, list[float]] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def median(self, name: str) -> Optional[float]:
        times = self.times_ms.get(name)
        return statistics.median(times) if times else None

    def gemm_floor(self, n_gemms: int) -> Optional[float]:
        """The three bare GEMMs' medians summed, plus one more logits GEMM for a 4-GEMM floor."""
        medians = [self.median(name) for name in GEMM_NAMES]
        if any(m is None for m in medians):
            return None
        return sum(medians) + (n_gemms - 3) * medians[0]

    def paired_floor_ratio(self, name: str, n_gemms: int) -> Optional[float]:
        """Median over rounds of ``name``'s time / the floor of ``n_gemms`` GEMMs timed in the same
        round. Each round runs every implementation once within a short interval, so load from
        other jobs on a shared machine hits a time and its floor alike and mostly cancels."""
        series = [self.times_ms.get(g) for g in (name, *GEMM_NAMES)]
        if any(not s for s in series) or len({len(s) for s in series}) != 1:
            return None  # an implementation left the rotation: rounds no longer pair up
        times, logits, dh, dw = series
        return statistics.median(
            t / (lg + h + w + (n_gemms - 3) * lg) for t, lg, h, w in zip(times, logits, dh, dw)
        )


def _short_error(exc: BaseException) -> str:
    """'fails: <Type>: <first line>' short enough for a table cell (pipes would break the row)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"fails: {type(exc).__name__}: {first[:80]}".replace("|", "/")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _timed(step, problem: Problem) -> float:
    """Milliseconds of one step; gradient reset and device sync are outside the interval."""
    problem.zero_grads()
    synchronize(problem.device)
    start = time.perf_counter()
    step()
    synchronize(problem.device)
    return (time.perf_counter() - start) * 1e3


def warm_up(impl: Impl, problem: Problem) -> None:
    """One step on the problem's first few tokens: library initialisation and compilation (CCE
    compiles with dynamic shapes) happen there, at the same H, V and dtype, not in the numbers."""
    impl.build(problem.head(WARMUP_TOKENS))()
    problem.zero_grads()


def time_round_robin(impls: list[Impl], shape: Shape, dtype: str, device: str, repeats: int, result: DtypeResult) -> None:
    """Warm up, then time every implementation ``repeats`` times, interleaved, into ``result``.

    An implementation that raises is recorded as failing and leaves the rotation; the others go on.
    """
    steps = {}
    problem = make_problem(shape.tokens, shape.hidden, shape.vocab, DTYPES[dtype], device)
    for impl in impls:
        try:
            warm_up(impl, problem)
            steps[impl.name] = impl.build(problem)
            # one untimed step at full size: first touches of preallocated outputs (the GEMM
            # floor's), kernels specialised or autotuned for this shape; not in the numbers
            _timed(steps[impl.name], problem)
        except Exception as exc:  # a library that rejects this setup is a result, not a crash
            result.notes[impl.name] = _short_error(exc)
    names = list(steps)
    for round_ in range(repeats):
        shift = round_ % max(1, len(names))
        for name in names[shift:] + names[:shift]:
            if name in result.notes:
                continue
            try:
                result.times_ms.setdefault(name, []).append(_timed(steps[name], problem))
            except Exception as exc:
                result.notes[name] = _short_error(exc)
        _log(f"  round {round_ + 1}/{repeats} done")
    if device == "cuda":
        for impl in impls:
            if impl.floor is not None and impl.name in steps and impl.name not in result.notes:
                extra = _peak_extra_bytes(steps[impl.name], problem, impl.grad_bytes(problem))
                result.memory[impl.name] = extra / problem.naive_logits_bytes()


# ---- peak memory, in a fresh subprocess per implementation ----

def proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not found in /proc/self/status")


def reset_peak_rss() -> int:
    """Return freed heap pages to the OS, restart the RSS high-water mark there, return the RSS.

    The high-water mark is VmHWM, not getrusage's ru_maxrss: ru_maxrss cannot be reset, and a child
    that Python spawns with vfork starts with its parent's peak in it (a large benchmark parent
    would hide the child's whole peak).
    """
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return proc_status_bytes("VmRSS")


def _peak_extra_bytes(step, problem: Problem, grad_bytes: int) -> int:
    """Peak bytes one step needs beyond its inputs and the ``grad_bytes`` of gradients it leaves behind."""
    problem.zero_grads()
    if problem.device.type == "cuda":
        synchronize(problem.device)
        torch.cuda.reset_peak_memory_stats(problem.device)
        base = torch.cuda.memory_allocated(problem.device)
        step()
        synchronize(problem.device)
        peak = torch.cuda.max_memory_allocated(problem.device)
    else:
        base = reset_peak_rss()
        step()
        peak = proc_status_bytes("VmHWM")
    return peak - base - grad_bytes


def memory_child(name: str, shape: Shape, dtype: str, device: str) -> dict:
    """Run in the child process: warm up on a few tokens, then measure one full-size step."""
    impl = next(i for i in implementations(device) if i.name == name)
    try:
        problem = make_problem(shape.tokens, shape.hidden, shape.vocab, DTYPES[dtype], device)
        warm_up(impl, problem)
        extra = _peak_extra_bytes(impl.build(problem), problem, impl.grad_bytes(problem))
    except Exception as exc:
        return {"error": _short_error(exc)}
    return {"fraction": extra / problem.naive_logits_bytes()}


def measure_memory(name: str, shape: Shape, dtype: str, device: str, result: DtypeResult) -> None:
    """Spawn ``memory_child`` for one implementation and store its answer in ``result``."""
    cmd = [sys.executable, "-m", "bench.fused_op_table", "--memory-child", name,
           "--shapes", str(shape), "--dtypes", dtype, "--device", device]
    try:
        out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=MEMORY_CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        result.notes.setdefault(name, f"memory run timed out after {MEMORY_CHILD_TIMEOUT_S} s")
        return
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        result.notes.setdefault(name, f"fails: memory run exited {out.returncode}: {tail[:80]}".replace("|", "/"))
        return
    answer = json.loads(lines[-1])
    if "error" in answer:
        result.notes.setdefault(name, answer["error"])
    else:
        result.memory[name] = answer["fraction"]


# ---- one (shape, dtype) case and the table ----

def selected_implementations(device: str, names: Optional[list[str]]) -> list[Impl]:
    """The bare GEMMs and the implementations named in ``names`` (checked by ``parse_args``; for
    None, all but the mixed-precision rows, which only low-precision tables take, and the rows
    run only by name)."""
    impls = implementations(device)
    if names is None:
        return [impl for impl in impls if not (impl.mixed or impl.by_name)]
    return [impl for impl in impls if impl.name in GEMM_NAMES or impl.name in names]


def run_case(shape: Shape, dtype: str, device: str, repeats: int, impls: list[Impl]) -> DtypeResult:
    """Time ``impls`` on one shape and dtype, then measure their peak memory."""
    result = DtypeResult()
    runnable = []
    for impl in impls:
        reason = impl.missing(device)
        if reason:
            result.notes[impl.name] = f"skipped: {reason}"
        else:
            runnable.append(impl)
    _log(f"{shape} {dtype}: timing {len(runnable)} implementations, {repeats} rounds")
    # the problem lives inside: its tensors (several GB at large V) are freed before the children run
    time_round_robin(runnable, shape, dtype, device, repeats, result)
    gc.collect()
    if device == "cuda":
        return result  # measured in the timing process
    for impl in runnable:
        if impl.floor is not None and impl.name not in result.notes:
            _log(f"{shape} {dtype}: peak memory of {impl.name}")
            measure_memory(impl.name, shape, dtype, device, result)
    return result


def _ratio(num: Optional[float], den: Optional[float]) -> str:
    return "—" if num is None or den is None else f"{num / den:.2f}x"


def _ms_cell(res: DtypeResult, name: str) -> str:
    times = res.times_ms.get(name)
    if not times:
        return "—"
    spread = (max(times) / min(times) - 1) * 100
    return f"{statistics.median(times):.1f} ({spread:.0f}%)"


def _impl_cells(impl: Impl, res: DtypeResult) -> list[str]:
    """ms, x floor (paired by round), x naive, memory for one implementation in one dtype."""
    if impl.name in res.notes and impl.name not in res.times_ms:
        return [res.notes[impl.name], "—", "—", "—"]
    med = res.median(impl.name)
    paired = res.paired_floor_ratio(impl.name, impl.floor) if impl.floor else None
    naive = res.median("naive") if impl.floor else None
    mem = res.memory.get(impl.name)
    mem_cell = f"{mem:.2f}x" if mem is not None else res.notes.get(impl.name, "—")
    return [_ms_cell(res, impl.name), "—" if paired is None else f"{paired:.2f}x", _ratio(med, naive), mem_cell]


def _floor_cells(n_gemms: int, res: DtypeResult) -> list[str]:
    floor = res.gemm_floor(n_gemms)
    return ["—" if floor is None else f"{floor:.1f}", "1.00x" if floor else "—", _ratio(floor, res.median("naive")), "—"]


def format_table(shape: Shape, impls: list[Impl], results: dict[str, DtypeResult]) -> str:
    """The markdown table of one shape, dtypes side by side."""
    header = ["implementation", "floor"]
    for dtype in results:
        s = SHORT[dtype]
        header += [f"{s} ms (spread)", f"{s} x floor", f"{s} x naive", f"{s} mem"]
    rows = [header, ["---"] * len(header)]
    for impl in impls:
        cells = [impl.label, "—" if impl.floor is None else f"{impl.floor} GEMMs"]
        for res in results.values():
            cells += _impl_cells(impl, res)
        rows.append(cells)
        if impl.name == GEMM_NAMES[-1]:
            for n in (3, 4):
                label = "3 GEMMs (sum of the above)" if n == 3 else "4 GEMMs (3 + one more logits GEMM)"
                rows.append([label, f"{n} GEMMs"] + [c for res in results.values() for c in _floor_cells(n, res)])
    title = f"### tokens {shape.tokens}, H {shape.hidden}, V {shape.vocab}"
    return "\n".join([title, ""] + ["| " + " | ".join(r) + " |" for r in rows])


FOOTNOTES = """\
- Each row is forward + backward w.r.t. hidden and weight. ms: median of the timed rounds, (spread)
  = slowest / fastest - 1. x floor: the median over rounds of time / the summed times of that many
  bare GEMMs on the same shape and dtype in the same round (4 for hpt_fast mode A and TRL's head,
  whose backwards recompute the logits, 3 for every other row); the floor rows show the summed
  medians. The bare GEMMs are those the op's default backend runs: on CPU in float32 oneDNN's,
  through ATen's ``mkldnn_matmul`` (``cpu_backend.gemm_into``), as the op's own; torch.mm sends
  float32 to MKL, which took 1.6-2.6x their time on the AMD EPYC development machine
  (bench/results_gemm_chunking_cpu.md); low precision goes to oneDNN either way. x naive: median
  time / naive PyTorch's median time in the same dtype (its GEMMs torch's own).
- mem: peak memory beyond the inputs and the gradients left behind, measured once (on CPU VmHWM in a
  fresh process, on CUDA torch.cuda.max_memory_allocated after the timed rounds), as a multiple of
  the naive float32 logits (tokens x V x 4 bytes). The bare GEMM rows use preallocated outputs: no
  memory figure.
- hpt_fast mode A: per-token logp and entropy, backward with random upstream gradients. Mode B and
  naive: the per-token loss -adv * exp(logp - old) - 0.001 * entropy, summed. The hpt_fast rows
  without an order run the plan's choice (``grad_order="auto"``): mode A in vocabulary order (both
  passes) when tokens < V; mode B in token order (three GEMMs) unless low precision with several
  token chunks would need a float32 [V, H] weight-gradient buffer larger than the memory budget (a
  quarter of a budget above 128 MiB), then a statistics pass and a gradient pass in vocabulary order
  (four GEMMs less one slab's logits GEMM, still divided by the three-GEMM floor). The "token order"
  rows force ``grad_order="tokens"``, the "vocabulary order" row ``grad_order="vocab"``; the "one
  token chunk" row also puts all tokens in one logits block (``chunk_size=tokens``), about the
  memory of cut-cross-entropy's row, where the others keep to the block budget ({budget}). The
  "accum_dtype=None" row sums a bf16 grad_weight over the token chunks in grad_weight itself instead
  of a float32 [V, H] buffer, so ``"auto"`` keeps token order at the block budget's memory (float32:
  the same as the default). The "softcap 30" rows cap the logits at 30 * tanh(logits / 30), Gemma
  2's ``final_logit_softcapping``: hpt_fast's otherwise the default rows, the others' (named with
  ``--impls``) by each one's own cap (naive: on its float32 logits; TRL: its
  ``final_logit_softcapping``; Liger's fused linear cross-entropy and cut-cross-entropy: their
  ``softcap``). Buffers of 4 MiB or more are backed by transparent huge pages
  (``hpt_fast.hugepages``). Liger: GRPO loss (loss_type "dapo", beta 0, no reference model,
  sequences of 512 tokens, its default chunk of one sequence, compiled=False), which computes no
  entropy. Liger's fused linear cross-entropy (CUDA only) and cut-cross-entropy: mean cross-entropy
  only (no entropy, no per-token output), with their default grad_weight sums in the inputs' dtype.
  TRL: ``trl.kernels.ChunkedLogProbFunction``, the fused LM head TRL's GRPOTrainer runs (logp and
  entropy, as mode A; 32768 vocabulary columns per tile, as the trainer passes; float32 input
  gradients, rounded to the inputs' dtype at the end; on CPU its row folding is torch ops, on CUDA
  Triton kernels). Rows with "float32 leaves, autocast" (named with ``--impls``, bf16 / fp16 only)
  are torch AMP's mixed precision: float32 hidden and weight holding the same values, the forward
  under ``torch.autocast`` in the table's dtype, the backward outside it; their mem also leaves out
  those leaves and their float32 gradients. The op takes the float32 leaves itself and writes their
  gradients in float32; "cast to the dtype first" hands it bf16 / fp16 casts instead, whose
  gradients autograd casts back."""


def _budget_text(shapes: list[Shape]) -> str:
    """The logits block budget of each shape's calls, for the footnotes."""
    sizes = ", ".join(f"{op_plan.budget_bytes(s.tokens, s.vocab) / 2**20:g} MiB at {s}" for s in shapes)
    how = "HPT_FAST_MEMORY_BUDGET_MB" if "HPT_FAST_MEMORY_BUDGET_MB" in os.environ else "the default"
    return f"{how}: {sizes}"


def machine_description(device: str) -> str:
    """CPU or GPU model, torch version and thread count, as a markdown list."""
    if device == "cuda":
        where = f"GPU: {torch.cuda.get_device_name()}"
    else:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = next((l.split(":", 1)[1].strip() for l in cpuinfo.splitlines() if l.startswith("model name")), "unknown")
        flags = next((l.split(":", 1)[1].split() for l in cpuinfo.splitlines() if l.startswith("flags")), [])
        isa = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)
        where = f"CPU: {model}, {os.cpu_count()} logical cores ({isa})"
    return "\n".join([
        f"- {where}",
        f"- torch {torch.__version__}, {torch.get_num_threads()} threads, python {sys.version.split()[0]}",
        f"- {_versions()}",
    ])


def load_average() -> str:
    """The machine's load averages, as `uptime` prints them: other jobs on a shared machine show here."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for dist in ("liger-kernel", "cut-cross-entropy", "trl", "triton"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} not installed")
    return ", ".join(parts)


def default_repeats(shape: Shape, device: str) -> int:
    """Fewer rounds for bigger problems, so the default run stays within half an hour on a 2-core
    CPU: 5 below 1e10 multiply-adds per GEMM, else 3 (V = 151936 has 3.2e11), never 2, whose
    median is a mean. A GPU step takes milliseconds: 20 rounds, 10 above 1e12."""
    macs = shape.tokens * shape.hidden * shape.vocab
    if device == "cuda":
        return 20 if macs < 1e12 else 10
    return 5 if macs < 1e10 else 3


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=cli_description(__doc__))
    parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                        type=lambda s: [Shape.parse(x) for x in s.split(",")],
                        help="comma-separated TOKENSxHIDDENxVOCAB (default %(default)s)")
    parser.add_argument("--dtypes", default="float32,bfloat16", type=lambda s: s.split(","),
                        help="comma-separated, of: " + ", ".join(DTYPES))
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds (default on CPU: 5, or 3 from 1e10 multiply-adds per GEMM; on CUDA 20, or 10 from 1e12)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--impls", default=None, type=lambda s: s.split(","),
                        help="comma-separated implementation names to time beside the bare GEMMs "
                             "(default: all of them)")
    parser.add_argument("--memory-child", metavar="IMPL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad:
        parser.error(f"unknown dtype(s) {bad}; choose from {list(DTYPES)}")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    check_device(parser, args.device)
    if args.impls is not None:
        implementations_named(parser, args.impls, args.device)
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.shapes[0], args.dtypes[0], args.device)))
        return
    print("## hpt_fast fused op: forward + backward against the GEMM floor\n")
    print(machine_description(args.device) + "\n")
    started = time.perf_counter()
    for shape in args.shapes:
        repeats = args.repeats if args.repeats is not None else default_repeats(shape, args.device)
        load_before = load_average()
        impls = selected_implementations(args.device, args.impls)
        results = {dtype: run_case(shape, dtype, args.device, repeats, impls) for dtype in args.dtypes}
        print(format_table(shape, impls, results))
        print(f"\n{repeats} timed rounds per implementation, after one warm-up step on {WARMUP_TOKENS} tokens and one untimed step at full size. "
              f"Load average (1, 5, 15 min) before: {load_before}; after: {load_average()}.\n", flush=True)
    print(FOOTNOTES.format(budget=_budget_text(args.shapes)))
    print(f"\nWhole run: {(time.perf_counter() - started) / 60:.1f} min.")


if __name__ == "__main__":
    main()
