"""Atomic, pickle-free checkpoints: safetensors weights + a tensors-and-numbers training state.

A checkpoint is a directory ``step_{N:08d}`` under ``<output_dir>/checkpoints`` holding:
- the model as ``save_pretrained`` writes it (safetensors, loadable by
  ``transformers.AutoModelForCausalLM`` and so by vLLM) and the tokenizer;
- ``trainer_state.pt``: optimizer, scheduler and data-sampler state plus the step, written with
  ``torch.save`` and read with ``torch.load(weights_only=True)`` (no arbitrary unpickling).
It is written to a temporary directory first and renamed into place, so a crash mid-write leaves
only a ``.tmp-*`` directory that is ignored (and removed by the next save).
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

STATE_FILE = "trainer_state.pt"
_NAME = re.compile(r"^step_(\d{8})$")


def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    """The complete checkpoint with the highest step, or None."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: int(_NAME.match(p.name).group(1)), default=None)


def save_checkpoint(output_dir: Path, step: int, model: nn.Module, tokenizer: Any, state: dict[str, Any]) -> Path:
    """Write checkpoint ``step`` atomically; ``state`` holds tensors, numbers, strings, lists, dicts."""
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(state, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def load_state(path: Path) -> dict[str, Any]:
    """The training state of checkpoint ``path`` (weights are loaded by ``from_pretrained``)."""
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)
