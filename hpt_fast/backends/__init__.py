"""Backend selection for the fused op's row kernels.

Each backend module provides ``row_stats``, ``grad_logits`` and ``accumulate_`` with the
signatures documented in ``torch_backend``; ``hpt_fast.op_passes`` runs the GEMMs around them.
"""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch

BACKENDS = ("torch", "cpu", "triton")
_MODULES = {"torch": "torch_backend", "cpu": "cpu_backend", "triton": "triton_backend"}
_loaded: dict[str, ModuleType] = {}
_failed: dict[str, str] = {}
_warned: set[str] = set()


def load(name: str) -> ModuleType:
    """Import backend ``name``; raise ImportError with the reason if it cannot load here."""
    if name in _loaded:
        return _loaded[name]
    if name in _failed:
        raise ImportError(_failed[name])
    try:
        module = importlib.import_module(f"hpt_fast.backends.{_MODULES[name]}")
    except ImportError as exc:  # a missing compiler / triton is a normal situation
        _failed[name] = f"hpt_fast backend {name!r} is unavailable: {exc}"
        raise ImportError(_failed[name]) from exc
    _loaded[name] = module
    return module


def available() -> list[str]:
    """Names of the backends that import on this machine."""
    names = []
    for name in BACKENDS:
        try:
            load(name)
        except ImportError:
            continue
        names.append(name)
    return names


def check_name(name: str) -> None:
    """Raise ValueError unless ``name`` is "auto" or one of ``BACKENDS``."""
    if not isinstance(name, str) or (name not in BACKENDS and name != "auto"):
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {name!r}")


def resolve(name: str, device: torch.device) -> tuple[str, ModuleType]:
    """Map ``name`` ("auto" or an explicit backend) for tensors on ``device`` to a loaded module.

    "auto" picks "triton" on CUDA and "cpu" elsewhere, and falls back to "torch" with one warning
    when that backend cannot load. An explicit name that cannot load is an error.
    """
    check_name(name)
    if name != "auto":
        if name == "cpu" and device.type != "cpu":
            raise ValueError(f"backend 'cpu' needs CPU tensors; got tensors on {device}")
        if name == "triton" and device.type != "cuda" and not _triton_interpreted():
            raise ValueError(
                f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU testing); got {device}"
            )
        return name, load(name)
    preferred = "triton" if device.type == "cuda" else "cpu" if device.type == "cpu" else "torch"
    try:
        return preferred, load(preferred)
    except ImportError as exc:
        if preferred not in _warned:
            _warned.add(preferred)
            warnings.warn(f"{exc}; falling back to the 'torch' backend", RuntimeWarning, stacklevel=3)
        return "torch", load("torch")


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
