"""Command-line checks shared by the bench scripts: bad arguments end in a usage error naming the
option, before any work. Light to import (torch and the implementations load on use), so that
``bench.check_vllm_api`` stays free of them."""
from __future__ import annotations

import argparse


def cli_description(doc: str) -> str:
    """A script's --help description: its docstring's first paragraph on one line."""
    return " ".join(doc.split("\n\n")[0].split())


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    """parser.error for ``--device cuda`` where torch sees no CUDA device."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")


def implementations_named(parser: argparse.ArgumentParser, names: list[str], device: str) -> list:
    """The ``bench.implementations.Impl`` objects ``names`` on ``device``, or parser.error naming
    the unknown ones (the Triton rows exist on CUDA only)."""
    from bench.implementations import implementations

    known = {impl.name: impl for impl in implementations(device)}
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"--impls: {unknown} unknown or unavailable on {device}; choose from {sorted(known)}")
    return [known[n] for n in names]
