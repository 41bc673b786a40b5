"""Checkpoint files: atomic and flushed to the disk, the newest ``keep`` kept, half-written ones ignored."""
from __future__ import annotations

import os

import pytest
import torch

import hpt_fast.checkpoint as checkpoint
from hpt_fast.checkpoint import (
    CheckpointError, complete_checkpoints, latest_checkpoint, load_settings, load_state, save_checkpoint,
    verify_checkpoint,
)
from hpt_fast.toy import ToySpec, build_model, build_tokenizer


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = build_tokenizer()
    return build_model(tokenizer, ToySpec(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)), tokenizer


def _steps(out) -> list[int]:
    return [int(p.name.split("_")[1]) for p in complete_checkpoints(out)]


@pytest.mark.parametrize("keep, left", [(0, [1, 2, 3, 4]), (1, [4]), (2, [3, 4]), (9, [1, 2, 3, 4])])
def test_keep_only_the_newest(tmp_path, model_and_tokenizer, keep, left):
    model, tokenizer = model_and_tokenizer
    for step in (1, 2, 3, 4):
        path = save_checkpoint(tmp_path, step, model, tokenizer, {"step": step}, keep=keep)
        assert path == latest_checkpoint(tmp_path) and load_state(path)["step"] == step
    assert _steps(tmp_path) == left


def test_every_file_is_flushed_before_the_rename(tmp_path, model_and_tokenizer, monkeypatch):
    """fsync reaches every file of the checkpoint and its directory while it is still the
    temporary one, then the parent directory after the rename."""
    model, tokenizer = model_and_tokenizer
    synced = []
    real = checkpoint._fsync

    def record(path):
        synced.append((path, (tmp_path / "checkpoints" / "step_00000007").exists()))
        real(path)

    monkeypatch.setattr(checkpoint, "_fsync", record)
    final = save_checkpoint(tmp_path, 7, model, tokenizer, {"step": 7}, rank_state={"x": torch.ones(2)})
    before_rename = {p.name for p, renamed in synced if not renamed}
    assert before_rename == {p.name for p in final.iterdir()} | {".tmp-step_00000007"}
    assert synced[-1] == (tmp_path / "checkpoints", True)


def test_half_written_checkpoints_are_ignored_and_cleared(tmp_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    save_checkpoint(tmp_path, 1, model, tokenizer, {"step": 1})
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_00000002").mkdir()  # a crash mid-write
    (root / "step_00000003").mkdir()  # renamed by hand without its state file
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    save_checkpoint(tmp_path, 4, model, tokenizer, {"step": 4}, keep=1)
    assert sorted(os.listdir(root)) == ["step_00000003", "step_00000004"]


def test_a_step_saved_again_replaces_its_directory(tmp_path, model_and_tokenizer):
    """A run resumed from an older checkpoint saves over a step directory left behind (one renamed
    by hand without its state file, or the rest of a moved-aside damaged one)."""
    model, tokenizer = model_and_tokenizer
    root = tmp_path / "checkpoints"
    (root / "step_00000003").mkdir(parents=True)
    (root / "step_00000003" / "stray.bin").write_bytes(b"x")
    path = save_checkpoint(tmp_path, 3, model, tokenizer, {"step": 3, "run": "resumed"})
    assert load_state(path)["run"] == "resumed" and not (path / "stray.bin").exists()
    path = save_checkpoint(tmp_path, 3, model, tokenizer, {"step": 3, "run": "again"})
    assert load_state(path)["run"] == "again" and latest_checkpoint(tmp_path) == path


def _truncate(file):
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _zero(file):
    file.write_bytes(bytes(file.stat().st_size))


def _scribble(file):
    """Damage inside the data: the zip directory at the end still reads."""
    data = bytearray(file.read_bytes())
    data[200:400] = b"\x07" * 200
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("name, damage, found_by, reason", [
    ("model.safetensors", _truncate, "verify", "incomplete metadata, file not fully covered"),
    ("model.safetensors", _zero, "verify", "invalid JSON in header"),
    ("model.safetensors", lambda f: f.unlink(), "verify", r"no weights file \(\*\.safetensors\)"),
    ("config.json", _truncate, "verify", "Expecting|Unterminated"),
    ("run_settings.json", _zero, "settings", "Expecting value"),
    ("trainer_state.pt", _truncate, "verify", "File is not a zip file"),
    ("rank_00000.pt", _zero, "verify", "File is not a zip file"),
    ("trainer_state.pt", _scribble, "load", "PytorchStreamReader failed reading"),
])
def test_a_damaged_checkpoint_is_named_with_the_one_to_fall_back_to(
    tmp_path, model_and_tokenizer, name, damage, found_by, reason
):
    model, tokenizer = model_and_tokenizer
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, tokenizer, {"step": step, "w": torch.ones(64)},
                        rank_state={"x": torch.ones(2)}, settings={"optim.lr": 0.1})
    latest = latest_checkpoint(tmp_path)
    verify_checkpoint(latest)  # whole: nothing to say
    damage(latest / name)
    read = {"verify": verify_checkpoint, "settings": load_settings, "load": load_state}[found_by]
    # the newest one before it, not any older one
    message = rf"checkpoint {latest} is damaged: {name}: .*({reason}).*Move it out of .* to resume from step_00000002"
    with pytest.raises(CheckpointError, match=message):
        read(latest)
    if found_by == "load":
        verify_checkpoint(latest)  # damage inside the data only shows as it loads


def test_a_damaged_only_checkpoint_says_to_start_anew(tmp_path, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    path = save_checkpoint(tmp_path, 1, model, tokenizer, {"step": 1})
    _truncate(path / "trainer_state.pt")
    with pytest.raises(CheckpointError, match="trainer_state.pt: File is not a zip file. Move it out of .* to start the run anew"):
        verify_checkpoint(path)
