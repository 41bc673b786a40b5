"""The trainer with ``rollout.engine=vllm``, against tests/fake_vllm.py (real vLLM needs a GPU):
the engine's phases around each step, the weights it is fed, and tensor-parallel groups of ranks."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from hpt_fast.metrics import read_metrics
from test_trainer import _run, _weights

DRIVER = (str(Path(__file__).resolve().parent / "train_with_fake_vllm.py"),)
VLLM = ["rollout.engine=vllm", "rollout.old_logprobs=recompute", "train.total_steps=2"]


def _record(out: Path, rank: int = 0) -> dict:
    return json.loads((out / f"fake_vllm_rank{rank}.json").read_text())


def _phases(events: list) -> list[str]:
    return [e[0] if e[0] != "wake_up" else f"wake_up{e[1]}" for e in events if e[0] != "load_weights"]


def test_each_step_generates_sleeps_trains_then_streams_the_new_weights(tmp_path):
    out = tmp_path / "run"
    _run(out, *VLLM, "validation.every=2", prefix=DRIVER)
    rec = _record(out)
    phases = _phases(rec["events"])
    # created asleep, and given the trainer's weights before anything is generated
    assert phases[:5] == ["init", "sleep", "wake_up['weights']", "reset_prefix_cache", "wake_up['kv_cache']"]
    # one load after each of the 2 steps; generation only awake (KV cache allocated), weights
    # loaded only asleep (the trainer trains between the sleep and the load)
    assert phases.count("reset_prefix_cache") == 3
    awake = False
    for event in rec["events"]:
        if event[0] == "wake_up":
            awake = event[1] == ["kv_cache"] or awake
        elif event[0] == "sleep":
            awake = False
        elif event[0] == "generate":
            assert awake
        elif event[0] == "load_weights":
            assert not awake
    # rollouts: 4 prompts per step; validation at steps 0 and 2 with top_p 0.95 (allowed: its
    # log-probs are not used), the toy's 4 levels
    sizes = [e[1] for e in rec["events"] if e[0] == "generate"]
    assert len(sizes) == 2 + 2 * 4 and sizes.count(4) >= 2
    names = set(_weights(out))
    loads = [e[1] for e in rec["events"] if e[0] == "load_weights"]
    assert len(loads) == 3 * len(names) and set(loads) == names
    # what vLLM holds at the end is the trained model, in the rollout dtype
    fed = load_file(str(out / "fake_vllm_rank0.safetensors"))
    for name, w in _weights(out).items():
        assert torch.equal(fed[name], w.to(torch.bfloat16)), name
    assert rec["init"]["max_model_len"] == 64 + 24 and rec["init"]["seed"] == 0
    # the trainer always runs in a process group (DeepSpeed needs one), so vLLM joins it
    assert rec["init"]["dtype"] == "bfloat16" and rec["init"]["distributed_executor_backend"] == "external_launcher"
    m = read_metrics(out)
    assert [x["step"] for x in m if "rule" in x] == [1, 2]
    assert all(x["time_weight_update"] > 0 for x in m if "rule" in x)


def test_sleep_level_2_reloads_the_weights_whenever_it_generates(tmp_path):
    """A level-2 sleep discards vLLM's weights: every generate after one (the next validation set,
    the step after an update that was skipped) streams the model's weights first; the fake
    refuses to generate from discarded ones."""
    out = tmp_path / "run"
    _run(out, *VLLM, "rollout.vllm.sleep_level=2", "validation.every=1", "optim.skip_grad_norm_above=1e-9",
         prefix=DRIVER)
    events = _record(out)["events"]
    assert sum(e[0] == "generate" for e in events) == 2 + 3 * 4  # 2 steps, validation at steps 0, 1, 2
    assert [m["skipped_steps"] for m in read_metrics(out) if "rule" in m] == [1, 2]


def test_a_tensor_parallel_group_generates_its_ranks_prompts_together(tmp_path):
    """Two ranks, one vLLM engine of tensor_parallel_size 2: each rank's engine sees both ranks'
    prompts (2 + 2), and the run completes with each rank training on its own samples.

    Every update is skipped here (a gradient-norm limit no step meets): the weights never change,
    so after the first load nothing is streamed again."""
    out = tmp_path / "run"
    _run(out, *VLLM, "rollout.vllm.tensor_parallel_size=2", "validation.every=0", "optim.skip_grad_norm_above=1e-9",
         nproc=2, prefix=DRIVER)
    for rank in (0, 1):
        rec = _record(out, rank)
        assert rec["init"]["distributed_executor_backend"] == "external_launcher"
        assert [e[1] for e in rec["events"] if e[0] == "generate"] == [4, 4]
        assert _phases(rec["events"]).count("reset_prefix_cache") == 1
    assert [m["skipped_steps"] for m in read_metrics(out)] == [1, 2]
    assert len(read_metrics(out)) == 2
