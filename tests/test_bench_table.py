"""The fused op's benchmark scripts run end to end on a tiny shape: the table (timing, memory
children) keeps to the implementations asked for; the precision table's errors are plausible."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_unknown_implementation_is_refused():
    out = subprocess.run(
        [sys.executable, "-m", "bench.fused_op_table", "--impls", "hpt_b_cpu,nope"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
    assert "unknown implementation(s) ['nope']" in out.stderr


def test_accum_precision_table():
    """The precision script's rows: every variant within bf16 reach of the float64 reference, and
    no closer than the reference rounded to the nearest bf16, which no bf16 tensor can beat."""
    env = {**os.environ, "HPT_FAST_MEMORY_BUDGET_MB": "0.05"}  # several token chunks at this shape
    out = subprocess.run(
        [sys.executable, "-m", "bench.accum_precision", "--tokens", "64", "--hidden", "16", "--vocab", "3001"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {label: cells for label, cells in _table_rows(out.stdout).items() if label != "variant"}
    assert len(rows) == 5, rows
    floor = [float(c) for c in rows.pop("float64 reference rounded once to bfloat16")[:4]]
    for label, cells in rows.items():
        errors = [float(c) for c in cells[:4]]
        assert all(f * 0.99 <= e < 0.05 for e, f in zip(errors, floor)), (label, errors, floor)
