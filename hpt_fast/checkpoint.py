"""Atomic, pickle-free checkpoints: safetensors weights + tensors-and-numbers training state.

A checkpoint is a directory ``step_{N:08d}`` under ``<output_dir>/checkpoints`` holding:
- the model as ``save_pretrained`` writes it (safetensors, loadable by
  ``transformers.AutoModelForCausalLM`` and so by vLLM) and the tokenizer;
- ``rank_{r:05d}.pt``, one per rank, when the optimizer state is partitioned over ranks (ZeRO
  stages 1-3): each rank's share, float32 master weights included;
- ``run_settings.json``: the run settings a resume must keep (small, read before any model loads);
- ``trainer_state.pt``, written last: scheduler and data-sampler state, the step, the world size
  and ZeRO stage it was written with, and the whole optimizer state when it is not partitioned.
State files are written with ``torch.save`` and read with ``torch.load(weights_only=True)``: only
tensors, numbers, strings and containers are rebuilt, plus the three small DeepSpeed classes a ZeRO
optimizer state holds (its loss scaler, the stage enum, a fragment address), allow-listed by name.
Everything goes to a temporary directory first, is flushed to the disk (fsync) and renamed into
place, so a crash mid-write, even a power loss, leaves only a ``.tmp-*`` directory, which is
ignored (and removed by the next save). With ``keep`` > 0 only the newest ``keep`` complete
checkpoints are kept: the older ones are removed after the new one is in place.
A checkpoint damaged afterwards (a partial copy, a disk fault) is a ``CheckpointError`` naming the
file and the checkpoint to fall back to, found by ``verify_checkpoint`` before a resume loads
anything, or by the load itself.
"""
from __future__ import annotations

import json
import os
import re
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

STATE_FILE = "trainer_state.pt"
SETTINGS_FILE = "run_settings.json"
RANK_FILE = "rank_{:05d}.pt"
_NAME = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A file of a complete checkpoint cannot be read: damaged after it was written."""


def _damaged(path: Path, file: Path, reason: object) -> CheckpointError:
    older = [p for p in complete_checkpoints(path.parent.parent) if p.name < path.name]
    fallback = f"resume from {older[-1].name}, the newest before it" if older else "start the run anew"
    return CheckpointError(
        f"checkpoint {path} is damaged: {file.name}: {reason}. Move it out of {path.parent} to {fallback}"
    )


def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a directory's entries) from the page cache to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for file in sorted(path.rglob("*")):
        if file.is_file():
            _fsync(file)
    _fsync(path)


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The complete checkpoints under ``output_dir``, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    """The complete checkpoint with the highest step, or None."""
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def save_checkpoint(
    output_dir: Path,
    step: int,
    model: nn.Module,
    tokenizer: Any,
    state: dict[str, Any],
    *,
    rank_state: Optional[dict[str, Any]] = None,
    state_dict: Optional[dict[str, Tensor]] = None,
    settings: Optional[dict[str, Any]] = None,
    keep: int = 0,
) -> Path:
    """Write checkpoint ``step`` atomically and durably. Collective: in a distributed job every
    rank calls it.

    Args:
        model, tokenizer, state: used on rank 0 only; ``state`` holds tensors, numbers, strings,
            lists and dicts.
        rank_state: this rank's share of a partitioned state (every rank passes one), or None.
        state_dict: the weights to save instead of ``model``'s own (a ZeRO-3 model's gathered
            weights; see ``hpt_fast.policy.gathered_state_dict``), on rank 0.
        settings: JSON-serialisable run settings for ``load_settings`` (rank 0), or None.
        keep: > 0: then remove all but the newest ``keep`` complete checkpoints (this one among
            them); 0: keep every checkpoint.
    Returns the checkpoint's final path.
    """
    rank = dist.get_rank() if _distributed() else 0
    root = checkpoint_dir(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()  # the directory exists before any rank writes into it
    if rank_state is not None:
        torch.save(rank_state, tmp / RANK_FILE.format(rank))
        _fsync(tmp / RANK_FILE.format(rank))
    _barrier()  # every rank's share is on disk before rank 0 completes the checkpoint
    if rank == 0:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        if settings is not None:
            (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=1, sort_keys=True))
        torch.save(state, tmp / STATE_FILE)
        # on the disk before the rename: a rename that reaches the disk first would otherwise
        # leave a complete-looking checkpoint of empty files after a power loss
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync(root)
        if keep > 0:
            for old in complete_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old)
    _barrier()  # nobody moves on (or resumes) before the checkpoint is in place
    return final


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError naming the first file of checkpoint ``path`` that cannot be read.

    Cheap enough to run before every resume: it parses the JSON files and reads the other files'
    headers only (each safetensors header against its file's length, each ``.pt`` file's zip
    directory at its end), so a truncated or zeroed file is found before a model loads; damage
    inside a ``.pt`` file's data is found when it loads (``load_state`` / ``load_rank_state``).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    files = sorted(path.iterdir())
    if not any(f.suffix == ".safetensors" for f in files):
        raise _damaged(path, path / "model.safetensors", "no weights file (*.safetensors) is there")
    for file in files:
        try:
            if file.suffix == ".json":
                json.loads(file.read_text())
            elif file.suffix == ".safetensors":
                with safe_open(file, "pt"):
                    pass
            elif file.suffix == ".pt":
                zipfile.ZipFile(file).close()
        except (OSError, ValueError, SafetensorError, zipfile.BadZipFile) as err:
            raise _damaged(path, file, err) from None


def _safe_load(path: Path) -> dict[str, Any]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    try:
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        # torch's reader appends a paragraph on how files get corrupted: its first line says what
        raise _damaged(path.parent, path, str(err).split(". ")[0]) from None


def load_settings(path: Path) -> Optional[dict[str, Any]]:
    """The run settings saved with checkpoint ``path``, or None (none saved: an older checkpoint)."""
    file = Path(path) / SETTINGS_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except ValueError as err:
        raise _damaged(Path(path), file, err) from None


def load_state(path: Path) -> dict[str, Any]:
    """The training state of checkpoint ``path`` (weights are loaded by ``from_pretrained``)."""
    return _safe_load(Path(path) / STATE_FILE)


def load_rank_state(path: Path, rank: int) -> dict[str, Any]:
    """Rank ``rank``'s share of the partitioned state of checkpoint ``path``."""
    file = Path(path) / RANK_FILE.format(rank)
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: checkpoint {path} was not written by a rank {rank}")
    return _safe_load(file)
