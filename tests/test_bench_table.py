"""The fused op's benchmark scripts run end to end on a tiny shape: the table (timing, memory
children) keeps to the implementations asked for; the precision table's errors are plausible."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpt_fast import backends

REPO = Path(__file__).resolve().parents[1]


def _table_rows(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("| ") and not line.startswith("| implementation") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_table_for_selected_implementations():
    if "cpu" not in backends.available():
        pytest.skip("the cpu backend is not built")
    out = subprocess.run(
        [sys.executable, "-m", "bench.fused_op_table", "--shapes", "48x16x301", "--dtypes", "float32",
         "--repeats", "2", "--impls", "hpt_b_cpu,hpt_b_cpu_vocab,naive"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = _table_rows(out.stdout)
    assert set(rows) == {
        "GEMM logits = h @ W.T", "GEMM dh = dlogits @ W", "GEMM dW = dlogits.T @ h",
        "3 GEMMs (sum of the above)", "4 GEMMs (3 + one more logits GEMM)",
        "hpt_fast mode B, backend cpu", "hpt_fast mode B, backend cpu, vocabulary order",
        "naive PyTorch (materialised logits)",
    }
    for label in ("hpt_fast mode B, backend cpu", "hpt_fast mode B, backend cpu, vocabulary order"):
        floor, ms, x_floor, x_naive, mem = rows[label]
        assert floor == "3 GEMMs"
        assert re.fullmatch(r"\d+\.\d \(\d+%\)", ms), ms
        for cell in (x_floor, x_naive, mem):
            assert re.fullmatch(r"\d+\.\d\dx", cell), (label, cell)
    assert rows["naive PyTorch (materialised logits)"][3] == "1.00x"


def test_mixed_precision_rows():
    """The torch AMP rows (float32 leaves, forward under autocast) run in a bf16 table when named,
    with their memory beyond the float32 leaves' gradients; the default selection leaves them out,
    and a float32 table refuses them by name."""
    if "cpu" not in backends.available():
        pytest.skip("the cpu backend is not built")
    from bench.fused_op_table import selected_implementations

    assert not any(impl.mixed for impl in selected_implementations("cpu", None))
    names = "hpt_b_cpu_autocast,hpt_b_cpu_autocast_cast,naive_autocast"
    out = subprocess.run(
        [sys.executable, "-m", "bench.fused_op_table", "--shapes", "48x16x301", "--dtypes", "bfloat16,float32",
         "--repeats", "2", "--impls", names],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = _table_rows(out.stdout)
    for label in ("hpt_fast mode B, backend cpu, float32 leaves, autocast",
                  "hpt_fast mode B, backend cpu, float32 leaves cast to the dtype first, autocast",
                  "naive PyTorch, float32 leaves, autocast"):
        bf16, fp32 = rows[label][1:5], rows[label][5:9]
        assert re.fullmatch(r"\d+\.\d \(\d+%\)", bf16[0]) and re.fullmatch(r"\d+\.\d\dx", bf16[3]), (label, bf16)
        assert fp32[0].startswith("fails: ValueError: mixed precision needs a bfloat16 or float16 problem"), fp32


def test_unknown_implementation_is_refused():
    out = subprocess.run(
        [sys.executable, "-m", "bench.fused_op_table", "--impls", "hpt_b_cpu,nope"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    assert "--impls: ['nope'] unknown or unavailable on cpu" in out.stderr


def test_accum_precision_table():
    """The precision script's rows: every variant within bf16 reach of the float64 reference, and
    each bf16 one no closer than the reference rounded to the nearest bf16, which no bf16 tensor
    can beat."""
    env = {**os.environ, "HPT_FAST_MEMORY_BUDGET_MB": "0.05"}  # several token chunks at this shape
    out = subprocess.run(
        [sys.executable, "-m", "bench.accum_precision", "--tokens", "64", "--hidden", "16", "--vocab", "3001"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {label: cells for label, cells in _table_rows(out.stdout).items() if label != "variant"}
    assert len(rows) == 6, rows
    floor = [float(c) for c in rows.pop("float64 reference rounded once to bfloat16")[:4]]
    for label, cells in rows.items():
        errors = [float(c) for c in cells[:4]]
        # float32 gradients (mixed precision) are not bound by bf16's final rounding
        lowest = [0.0] * 4 if "float32 gradients" in label else [f * 0.99 for f in floor]
        assert all(low <= e < 0.05 for e, low in zip(errors, lowest)), (label, errors, floor)


def test_float32_precision_tables():
    """The float32 precision script: both GEMMs' and every way's errors against float64, each
    within float32's reach (1e-3), the op's within 1e-4 on the near-deterministic rows too, where
    naive PyTorch's logp and entropy lose up to all their digits (what the rows show)."""
    if "cpu" not in backends.available():
        pytest.skip("the cpu backend is not built")
    out = subprocess.run(
        [sys.executable, "-m", "bench.float32_precision", "--tokens", "16", "--hidden", "8", "--vocab", "301"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    gemms = [c for c in cells if len(c) == 2 and c[0] != "GEMM"]
    assert [c[0] for c in gemms] == ["torch.mm (MKL)", "oneDNN (the cpu backend's float32 products)"]
    rows = [c for c in cells if len(c) == 6 and c[1] != "way"]
    ways = ["naive float32", "torch", "cpu"]
    assert [c[1] for c in rows] == ways * 8, rows
    for label, way, *errors in rows:
        near_one = label.startswith("V ")
        if near_one and way == "naive float32":
            errors = errors[2:]
        assert all(0 <= float(e) < (1e-4 if near_one else 1e-3) for e in errors), (label, way, errors)


def test_row_pass_times_table():
    """The row-pass timing script at a tiny size: every CPU backend's three passes, timed."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.row_pass_times", "--tokens", "4", "--vocab", "301", "--repeats", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]
    names = [b for b in ("cpu", "torch") if b in backends.available()]
    passes = ["row_stats", "row_stats, entropy", "grad_logits, entropy"]
    assert [c[:2] for c in cells] == [[b, p] for b in names for p in passes]
    for row in cells:
        for cell in row[2:]:
            fastest, median = re.fullmatch(r"(\S+) \((\S+)\)", cell).groups()
            assert 0 < float(fastest) <= float(median), row


def test_product_pieces_table():
    """The pieces script times the whole product and each piece size it is given (rows per piece
    capped at V), marking the op's own size."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.product_pieces", "--vocab", "3001", "--chunk", "16", "--hidden", "32",
         "--repeats", "2", "--pieces-mib", "0.01,8"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("| ")][2:]  # past header, rule
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    # 0.01 MiB holds 163 rows of 32 bf16 columns; 8 MiB (the default) is capped at V
    assert [(c[0], c[1], c[2]) for c in cells] == [
        ("whole, then one pass", "3001", "0"), ("pieces", "163", "0.01"), ("pieces (default)", "3001", "8"),
    ]
    assert all(re.fullmatch(r"\d+\.\d", c[3]) for c in cells), cells


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("add", [False, True])
def test_bare_gemm_is_the_ops_product(dtype, add):
    """The floor's bare GEMM writes (or, with ``add``, adds) a @ b for transposed operands and a
    narrower contiguous view of a larger buffer, as the chunking bench hands it."""
    from bench.implementations import bare_mm

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(37, 19, generator=gen).to(dtype)
    b = torch.randn(23, 19, generator=gen).to(dtype).t()  # [19, 23], a transposed view
    storage = torch.randn(37 * 40, generator=gen).to(dtype)
    out = storage[: 37 * 23].view(37, 23)
    start = out.double().clone()
    bare_mm(a, b, out, add=add)
    want = a.double() @ b.double() + (start if add else 0)
    tol = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


def test_gemm_chunking_table():
    """The chunking bench prints one row per dtype, products and chunk size or slab width, sums in
    the last column."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.gemm_chunking", "--tokens", "50", "--hidden", "16", "--vocab", "301",
         "--chunks", "7,50", "--slabs", "64", "--repeats", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("| ")][2:]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    blocks = ("token chunks of 7", "token chunks of 50", "vocabulary slabs of 64 (logits only)")
    # float32 also with torch's own products (MKL's); bf16 goes to oneDNN either way
    assert [(c[0], c[1], c[2]) for c in cells] == [
        (d, p, b) for d, products in (("float32", ("op's", "torch's")), ("bfloat16", ("op's",)))
        for p in products for b in blocks
    ]
    for c in cells:
        if c[4] != "—":
            assert abs(float(c[6]) - sum(float(x) for x in c[3:6])) < 2e-3, c


def test_causal_lm_loss_table():
    """The whole-model bench: a row per way of computing the loss, each loss equal to
    transformers' own (the bench checks it before timing), a peak from each memory child (one
    dtype: each child is a process of its own, seconds to start)."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.causal_lm_loss", "--tokens", "64", "--seq", "32", "--hidden", "64",
         "--layers", "1", "--vocab", "301", "--repeats", "1", "--dtypes", "bfloat16"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    tables = out.stdout.split("### ")[1:]
    assert [t.split(",")[0] for t in tables] == ["bfloat16"]
    for table in tables:
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
                if line.startswith("| ") and not line.startswith("| row") and not line.startswith("| ---")]
        assert [r[0].split(",")[0] for r in rows] == ["transformers' own loss (materialised logits)",
                                                     "hpt_fast patch_causal_lm_loss"] + ["hpt_fast patch_causal_lm_loss"]
        assert rows[0][2] == "1.00x" and all(float(r[3]) >= 0 for r in rows)
        losses = [float(r[5]) for r in rows]
        assert max(losses) - min(losses) < 1e-3 * losses[0]


def test_family_sweep():
    """The family sweep's rows (loss patch, trainer's policy): a family both serve is ``same``,
    BERT's prediction head is refused by both and CpmAnt's own loss by the patch (the policy, which
    has a loss of its own, serves it), each with its reason; MPT, whose config's logit_scale (set by
    the sweep) its forward ignores, is ``same`` in both; a MoE family with router logits on is
    ``same`` (its load-balancing loss compared too; the policy not run) and a family without router
    logits has no row, even one whose first sizes fail (Falcon); in training mode (dropout, router
    jitter, gradient checkpointing) both are ``same`` under draws that move the loss, BLT's
    included, whose dropout is in its parts' nested configs."""
    rows = {}
    for argv in (["--families", "qwen2,bert,cpmant,mpt"], ["--families", "mixtral,qwen2,falcon", "--router"],
                 ["--families", "gpt2,mixtral,blt", "--train"]):
        out = subprocess.run([sys.executable, "-m", "bench.family_sweep", *argv], cwd=REPO, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        found = [[c.strip() for c in line.strip("|").split("|")] for line in out.stdout.splitlines()
                 if line.startswith("| ") and not line.startswith("| family") and not line.startswith("| ---")]
        rows.update({(r[0], argv[-1] if argv[-1].startswith("--") else ""): r[1:] for r in found})
    assert {key: (row[0], row[2]) for key, row in rows.items()} == {
        ("qwen2", ""): ("same", "same"), ("bert", ""): ("refused", "refused"),
        ("cpmant", ""): ("refused", "same"), ("mpt", ""): ("same", "same"), ("mixtral", "--router"): ("same", ""),
        ("gpt2", "--train"): ("same", "same"), ("mixtral", "--train"): ("same", "same"),
        ("blt", "--train"): ("same", "same")}
    assert "inside 'cls'" in rows["bert", ""][1] and "inside 'cls'" in rows["bert", ""][3]
    assert "self.loss_function" in rows["cpmant", ""][1]
    for family in ("gpt2", "mixtral", "blt"):  # the draws (dropout, router jitter) change the loss: they ran
        moved = float(re.search(r"another seed moves it by (\S+)$", rows[family, "--train"][1]).group(1))
        assert moved > 1e-4, (family, moved)


def test_idle_gaps_of_a_trace():
    """The profile's gap list: busy time is the union of device work, gaps are measured from the
    latest end so far, and each names the host call that ran through it."""
    from bench.profile_op import STEP_LABEL, idle_gaps

    events = [
        {"ph": "X", "cat": "user_annotation", "name": STEP_LABEL, "ts": 0, "dur": 1000},
        {"ph": "X", "cat": "kernel", "name": "k1", "ts": 100, "dur": 200},
        {"ph": "X", "cat": "kernel", "name": "k2", "ts": 250, "dur": 100},  # overlaps k1
        {"ph": "X", "cat": "kernel", "name": "k3", "ts": 600, "dur": 300},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 340, "dur": 270},
        {"ph": "X", "cat": "cpu_op", "name": "aten::item", "ts": 330, "dur": 5},
    ]
    text = idle_gaps(events, top=5)
    assert "Device busy 0.55 ms of the step's 1.00 ms; 3 gaps of 20 us or more, 0.45 ms in all" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert rows[0] == "| 250 | 0.35 | k2 | k3 | cudaStreamSynchronize 250 |"
    assert {r.split(" | ")[0] for r in rows[1:]} == {"| 100"}
    assert idle_gaps(events[1:], top=5).startswith("no device activity")


def test_phase_times_cover_the_step():
    """Every phase of the op is timed, nested calls are not counted twice in the time outside the
    phases, and the vocabulary-order gradient pass appears only where it runs."""
    from bench.fused_op_table import Shape
    from bench.phase_times import OUTSIDE, PHASES, time_phases

    if "cpu" not in backends.available():
        pytest.skip("the cpu backend is not built")
    for impl, grad_pass_runs in (("hpt_b_cpu", False), ("hpt_b_cpu_vocab", True)):
        rows = _table_rows(time_phases(impl, Shape(48, 16, 301), "float32", "cpu", steps=2))
        assert set(rows) == {"phase", "whole step", OUTSIDE} | {p[0] for p in PHASES}
        host = {k: float(v[0]) for k, v in rows.items() if k != "phase"}
        assert host["whole step"] > host["statistics pass"] > 0
        assert (host["gradient pass (recomputed blocks)"] > 0) == grad_pass_runs
        assert 0 <= host[OUTSIDE] < host["whole step"]


def test_sustained_rate_rows():
    """Every row is timed with its number of units, and each step's ratios are its mean over the
    means of the lone GEMMs, the burst's GEMMs and the 3-GEMM units."""
    from bench.sustained_rate import ALONE, measure, parse_args, report

    args = parse_args(["--device", "cpu", "--impls", "hpt_b_torch,naive", "--shape", "64x16x301",
                       "--dtype", "float32", "--steps", "2", "--burst", "5", "--pause", "0"])
    results = measure(args)
    assert [(r.label, r.unit, len(r.times)) for r in results] == [
        (ALONE, "GEMM", 9), ("bare GEMMs, 3 back to back", "GEMM", 3), ("bare GEMMs, 5 back to back", "GEMM", 5),
        ("3 bare GEMMs as one unit, 2 back to back", "3 GEMMs", 2),
        ("hpt_fast mode B, backend torch, 2 steps back to back", "step", 2),
        ("naive PyTorch (materialised logits), 2 steps back to back", "step", 2),
    ]
    assert all(t > 0 for r in results for t in r.times) and {r.clocks for r in results} == {"—"}
    # fixed times, so the ratios can be checked
    for r, ms in zip(results, (1.0, 1.0, 2.0, 5.0, 12.0, 24.0)):
        r.times = [ms] * len(r.times)
    text = report(args, results)
    assert "A GEMM in the 5-GEMM burst takes 2.000x one alone; in the 3-GEMM units 1.667x." in text
    assert "- hpt_fast mode B, backend torch, 2 steps back to back: 4.00x, 2.00x; 50.0% / 41.7%" in text
    assert "- naive PyTorch (materialised logits), 2 steps back to back: 8.00x, 4.00x; 25.0% / 20.8%" in text


def test_clock_summary_of_samples():
    """nvidia-smi's lines inside the window only; malformed lines are skipped."""
    from datetime import datetime

    from bench.sustained_rate import clock_summary

    lines = ["2026/11/27 08:00:00.000, 1980, 150.5, 0x0000000000000000",
             "2026/11/27 08:00:00.500, 1470, 690.0, 0x0000000000000004",
             "2026/11/27 08:00:00.700, 1410, 701.2, 0x0000000000000004",
             "2026/11/27 08:00:01.000, [N/A], 700.0, 0x0000000000000004",
             "garbage",
             "2026/11/27 08:00:02.000, 1980, 100.0, 0x0000000000000001"]
    t0 = datetime(2026, 11, 27, 8, 0, 0).timestamp()
    assert clock_summary(lines, t0 + 0.4, t0 + 1.5) == "1410-1440 MHz, 701 W, reasons 0x0000000000000004"
    assert clock_summary(lines, t0, t0 + 0.6) == "1470-1725 MHz, 690 W, reasons 0x0000000000000000/0x0000000000000004"
    assert clock_summary(lines, t0 + 5, t0 + 6) == "no samples"


def test_profile_of_training_steps(tmp_path):
    """The trainer's steps profiled on the CPU: each profiled step's phases, the op table and the
    per-step counts of host waits (reads of tensor values happen on the CPU too)."""
    from bench.profile_train_step import WAITS

    # in a process of its own: a trainer joins a process group and sets the launcher's variables
    out = subprocess.run(
        [sys.executable, "-m", "bench.profile_train_step", f"train.output_dir={tmp_path / 'run'}",
         "train.prompts_per_step=4", "rollout.n=2", "data.max_response_length=16", "validation.every=0",
         "--warmup", "1", "--steps", "2", "--rows", "5"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    rows = _table_rows(text)
    assert {"2", "3"} <= set(rows) and all(float(x) >= 0 for x in rows["2"] + rows["3"])
    assert "### Top 5 by self_cpu_time_total" in text and "train_step" in text
    waits = {label: float(rows[label][0]) for label in WAITS.values()}
    assert waits["reads of a tensor value (a sync on a GPU tensor)"] > 0
    assert all(n == 0 for label, n in waits.items() if not label.startswith("reads"))  # no CUDA here


def test_row_kernel_sweep_runs_every_configuration():
    """The Triton row-kernel sweep (a GPU tool) on a tiny block under the interpreter: every tile
    width and warp count of both kernels, row_stats with and without the logit sums, each giving
    the current configuration's result."""
    if "triton" not in backends.available():
        pytest.skip("triton is not available")
    from bench.row_kernel_sweep import GRAD_BLOCKS, STATS_BLOCKS, WARPS, sweep

    table = sweep(3, 300, torch.float32, torch.device("cpu"), repeats=1, sums=True)
    rows = [line for line in table.splitlines() if line.startswith("| row_stats") or line.startswith("| grad_logits")]
    names = [line.split("|")[1].strip().replace(" (current)", "") for line in rows]
    assert names.count("row_stats (entropy)") == names.count("row_stats (entropy, sums)") >= len(STATS_BLOCKS) * len(WARPS)
    assert names.count("grad_logits (entropy)") >= len(GRAD_BLOCKS) * len(WARPS)
    assert all(line.rstrip().endswith("| same |") for line in rows)
    assert sum("(current)" in line for line in rows) == 3


@pytest.mark.parametrize("module, argv, message", [
    ("bench.fused_op_table", ["--repeats", "0"], "--repeats must be >= 1, got 0"),
    ("bench.fused_op_table", ["--shapes", "2048x64x1000,600x64x1000"], "600x64x1000: tokens above 512 must be a multiple of 512"),
    ("bench.phase_times", ["--impls", "hpt_b_triton", "--device", "cpu"], "--impls: ['hpt_b_triton'] unknown or unavailable on cpu"),
    ("bench.sustained_rate", ["--impls", "naive", "--device", "cpu", "--burst", "2"], "need --steps >= 1, --burst >= 3"),
    ("bench.profile_train_step", ["--steps", "0"], "need --warmup >= 0, --steps >= 1"),
    ("bench.rollout_throughput", ["--prompt-lengths", "16"], "expected MIN-MAX with 1 <= MIN <= MAX, got '16'"),
    ("bench.rollout_throughput", ["--sliding-window", "0"], "expected a positive integer, got '0'"),
    ("bench.causal_lm_loss", ["--tokens", "100", "--seq", "64"], "--tokens must be a multiple of --seq"),
    ("bench.family_sweep", ["--families", "qwen2,no_such_family"], "--families: ['no_such_family'] are not causal-LM"),
    ("bench.row_pass_times", ["--repeats", "0"], "--tokens, --vocab and --repeats must be >= 1"),
])
def test_bad_bench_arguments_are_usage_errors(module, argv, message, capsys):
    """Found before any work, not as a traceback after the header or the first shape's runs."""
    import importlib

    mod = importlib.import_module(module)
    entry = mod.parse_args if hasattr(mod, "parse_args") else mod.main
    with pytest.raises(SystemExit) as exc:
        entry(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_an_implementation_names_every_module_it_lacks():
    """A row whose library, or a module that library imports only when it runs (TRL's backward
    imports its trainer, which needs accelerate and datasets), is absent is skipped with the
    names, not run into an ImportError in the middle of a table."""
    from bench.implementations import _needs_module

    assert _needs_module("torch", also=("numpy",))("cpu") is None
    assert _needs_module("torch", also=("no_such_module_a",))("cpu") == "no_such_module_a is not installed"
    assert _needs_module("no_such_module_b", also=("torch", "no_such_module_c"))("cpu") == (
        "no_such_module_b, no_such_module_c are not installed")
    assert _needs_module("torch", cuda_only=True)("cpu") == "torch's Triton kernels need CUDA"


@pytest.mark.parametrize("other_row, hpt_row", [("trl_chunked", "hpt_a_torch"),
                                              ("trl_chunked_fields", "hpt_a_cpu_fields"),
                                              ("trl_chunked_softcap", "hpt_a_cpu_softcap"),
                                              ("naive_softcap", "hpt_b_cpu_softcap")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_trl_and_capped_naive_rows_compute_what_the_op_does(dtype, other_row, hpt_row):
    """The table's TRL rows (its trainers' fused LM head, GRPO's fields, DPO with WPO's, and with
    a soft cap) are compared with mode A's as the same computation, and the soft-capped naive row
    with mode B's: a step's gradients equal the hpt_fast row's step's on one problem."""
    from bench.implementations import implementations, make_problem

    impls = {impl.name: impl for impl in implementations("cpu")}
    reason = impls[other_row].missing("cpu") or impls[hpt_row].missing("cpu")
    if reason:
        pytest.skip(reason)
    p = make_problem(96, 32, 1031, dtype, "cpu", seed=3)
    grads = {}
    for name in (other_row, hpt_row):
        p.zero_grads()
        impls[name].build(p)()
        grads[name] = (p.hidden.grad.double(), p.weight.grad.double())
    for got, want in zip(grads[other_row], grads[hpt_row]):
        # both sum in float32 and round once at the end (1e-7 and 1e-6 apart here), where a
        # different computation, e.g. mode B's loss, is off by 100%
        assert float((got - want).norm() / want.norm()) < 1e-4
