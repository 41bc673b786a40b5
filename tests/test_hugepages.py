"""hpt_fast.hugepages: large CPU buffers advised onto transparent huge pages."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpt_fast import hugepages

MIB = 2**20
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def test_huge_page_range_keeps_whole_aligned_pages_inside():
    two = 2 * MIB
    assert hugepages.huge_page_range(two, 3 * two) == (two, 3 * two)
    # unaligned ends shrink to the whole pages strictly inside
    assert hugepages.huge_page_range(two + 64, 3 * two) == (2 * two, 2 * two)
    assert hugepages.huge_page_range(two - 1, two + 2) == (two, two)
    # no whole huge page inside
    assert hugepages.huge_page_range(two + 64, two) is None
    assert hugepages.huge_page_range(0, two - 1) is None


@pytest.mark.parametrize("numel, dtype, advised", [(1000, torch.float32, False), (4 * MIB, torch.bfloat16, True)])
def test_empty_advises_only_large_cpu_buffers(monkeypatch, numel, dtype, advised):
    calls = []
    monkeypatch.setattr(hugepages, "_madvise", lambda start, length, advice: calls.append((start, length, advice)) or 0)
    out = hugepages.empty((numel,), dtype, torch.device("cpu"))
    assert out.shape == (numel,) and out.dtype == dtype and out.is_contiguous()
    if not advised:
        assert calls == []
        return
    (start, length, advice), = calls
    assert advice == 14  # MADV_HUGEPAGE
    begin, end = out.data_ptr(), out.data_ptr() + numel * out.element_size()
    assert start % (2 * MIB) == 0 and length % (2 * MIB) == 0 and length > 0
    assert begin <= start and start + length <= end


# Runs in a fresh process: in a long one (the test suite) glibc may serve even a 64 MiB request
# from heap memory an earlier test freed, whose pages are already touched and stay 4 KiB ones
# (with no page faults left to save there either).
_CHILD = r"""
import re, sys
from pathlib import Path
import torch
from hpt_fast import hugepages

MIB = 2**20
out = hugepages.empty((64 * MIB,), torch.uint8, torch.device("cpu"))
out.fill_(1)  # the first touch is where the kernel picks the page size
assert int(out.sum()) == 64 * MIB
# madvise splits the mapping at the advised range: look it up by an address in the middle
ptr, inside = out.data_ptr() + 32 * MIB, False
for line in Path("/proc/self/smaps").read_text().splitlines():
    m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
    if m:
        inside = int(m.group(1), 16) <= ptr < int(m.group(2), 16)
    elif inside and line.startswith("AnonHugePages:"):
        print(int(line.split()[1]))
        sys.exit(0)
sys.exit(f"no mapping holds address {ptr:#x}")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
@pytest.mark.skipif(
    not THP_SETTING.exists() or "[never]" in THP_SETTING.read_text(),
    reason="transparent huge pages are disabled on this machine",
)
def test_touched_buffer_is_backed_by_huge_pages():
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip()) >= 2 * 1024  # KiB of huge pages in the buffer's mapping
