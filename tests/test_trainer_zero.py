"""The trainer under DeepSpeed ZeRO stages 1-3 and bf16, on the CPU (gloo): the same run as stage 0,
and checkpoints of partitioned state that resume exactly."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from hpt_fast.checkpoint import latest_checkpoint, load_state
from hpt_fast.metrics import read_metrics
from hpt_fast.toy import build_toy, default_toy_dir
from test_trainer import _run, _weights

# SFT rows make the batch independent of sampling (so of the rank count); micro-batches of one row
# each make every update accumulate several backward passes; two updates per step make the trainer
# recompute old log-probs with a no-grad forward; the skip threshold sits among the updates'
# gradient norms, so some updates are skipped and others follow a skipped one
SFT = ["algorithm.method=sft", "train.total_steps=3", "deepspeed.micro_batch_tokens=96",
       "train.mini_batch_prompts=2", "rollout.old_logprobs=recompute", "optim.skip_grad_norm_above=10.0"]


@pytest.fixture(scope="module")
def stage0_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage0") / "run"
    _run(out, *SFT)
    skipped = [m["skipped_steps"] for m in read_metrics(out)]
    assert skipped == [0, 2, 3], f"the threshold no longer skips 3 of the 6 updates: {skipped}"
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_under_zero_match_one_rank_at_stage_0(tmp_path, stage0_run, stage):
    out = tmp_path / "run"
    _run(out, *SFT, f"deepspeed.zero_stage={stage}", nproc=2)
    ref, got = read_metrics(stage0_run), read_metrics(out)
    assert len(ref) == len(got) == 3
    for a, b in zip(ref, got):
        assert sorted(a) == sorted(b) and b["skipped_steps"] == a["skipped_steps"]
        # every metric but the timings: loss, grad_norm, lr, token counts, the loss's statistics
        for key in sorted(k for k in a if not k.startswith("time_") and k != "tokens_per_s"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
    w_ref, w = _weights(stage0_run), _weights(out)
    assert set(w) == set(w_ref)  # ZeRO-3 checkpoints hold the gathered, full weights
    for name in w_ref:
        assert w[name].shape == w_ref[name].shape, name
        assert torch.allclose(w[name], w_ref[name], atol=1e-5), name
    state = load_state(latest_checkpoint(out))
    assert (state["zero_stage"], state["world_size"]) == (stage, 2) and "optimizer" not in state
    assert sorted(p.name for p in latest_checkpoint(out).glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]


def _dropout_model(tmp_path) -> str:
    """The toy model with attention dropout 0.1: training forward passes that draw random numbers."""
    path = tmp_path / "dropout_model"
    shutil.copytree(build_toy(default_toy_dir()).model, path)
    config = json.loads((path / "config.json").read_text())
    config["attention_dropout"] = 0.1
    (path / "config.json").write_text(json.dumps(config))
    return f"model.path={path}"


@pytest.mark.parametrize("setting,nproc", [
    (["deepspeed.zero_stage=3", "algorithm.method=sft"], 2),  # no generation: see the last test
    (["deepspeed.zero_stage=1", "deepspeed.bf16=true"], 1),
    (["deepspeed.bf16=true"], 1),
    (["dropout"], 1),
], ids=["zero3-2ranks", "zero1-bf16", "zero0-bf16", "dropout"])
def test_resume_from_a_checkpoint_matches_the_uninterrupted_run(tmp_path, setting, nproc):
    """Run 4 steps (checkpoints at 2 and 4); drop checkpoint 4 and resume: the same weights, bit for bit
    (the float32 master weights and each rank's optimizer partition come back from the checkpoint;
    a model with dropout draws the same masks)."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    setting = [_dropout_model(tmp_path) if s == "dropout" else s for s in setting]
    steps = ["train.total_steps=4", "train.checkpoint_every=2"]
    _run(full, *setting, *steps, nproc=nproc)
    shutil.copytree(full, resumed)
    shutil.rmtree(latest_checkpoint(resumed))
    assert latest_checkpoint(resumed).name == "step_00000002"
    _run(resumed, *setting, *steps, nproc=nproc)
    assert latest_checkpoint(resumed).name == "step_00000004"
    w_full, w_resumed = _weights(full), _weights(resumed)
    dtype = torch.bfloat16 if "deepspeed.bf16=true" in setting else torch.float32
    for name in w_full:
        assert w_full[name].dtype == dtype, name
        assert torch.equal(w_full[name], w_resumed[name]), name
    for m in read_metrics(resumed):
        assert all(v == v for v in m.values() if isinstance(v, float)), m  # no NaN, bf16 included


@pytest.mark.parametrize("saved,resumed,expected", [
    ((2, 1), (2, 2), "written with ZeRO stage 2 on 1 ranks; resume it with the same stage and rank count (now: stage 2, 2 ranks)"),
    ((1, 1), (0, 1), "written with ZeRO stage 1 on 1 ranks; resume it with the same stage and rank count (now: stage 0, 1 ranks)"),
], ids=["other-world-size", "other-stage"])
def test_resuming_partitioned_state_differently_is_a_config_error(tmp_path, saved, resumed, expected):
    out = tmp_path / "run"
    _run(out, f"deepspeed.zero_stage={saved[0]}", "train.total_steps=1", nproc=saved[1])
    done = _run(out, f"deepspeed.zero_stage={resumed[0]}", "train.total_steps=2", nproc=resumed[1], check=False)
    # each rank exits with status 2; torchrun reports a failed child with a status of its own
    assert done.returncode == (2 if resumed[1] == 1 else 1), done.stderr[-3000:]
    assert "config error: deepspeed.zero_stage: checkpoint" in done.stderr and expected in done.stderr
    assert "hpt_fast/trainer.py" not in done.stderr  # no traceback through the trainer


def test_native_generation_under_zero3_on_two_ranks_matches_stage_0(tmp_path):
    """Under ZeRO-3 every forward gathers weights from all ranks, so the native engine decodes in
    lockstep (ranks finish their samples after different numbers of tokens). The same HPT run at
    stage 0 and at stage 3 on 2 ranks samples the same rollouts, validates the same, and trains
    to the same weights."""
    runs = {stage: tmp_path / f"stage{stage}" for stage in (0, 3)}
    for stage, out in runs.items():
        # 64 new tokens: samples end on EOS at different lengths (at 24 all run to the limit)
        _run(out, f"deepspeed.zero_stage={stage}", "train.total_steps=1", "validation.every=1",
             "data.max_response_length=64", nproc=2)
    m0, m3 = read_metrics(runs[0]), read_metrics(runs[3])
    assert [sorted(m) for m in m0] == [sorted(m) for m in m3]
    val0 = {k: v for k, v in m0[0].items() if k.startswith("val/")}
    assert val0 and val0 == {k: v for k, v in m3[0].items() if k.startswith("val/")}  # step 0: same weights
    for key in ("reward_mean", "sft_fraction", "response_length", "train_tokens"):
        assert m0[1][key] == m3[1][key], key  # step 1's rollouts come from the same weights too
    # the rest of step 1's metrics (loss parts, ratio and entropy statistics, and grad_norm, which
    # ZeRO-3 reports from its own step rather than the trainer's sum over .grad), but not the
    # timings; and validation after the step, which samples from weights equal only to atol 1e-5
    left_out = {"tokens_per_s"} | {k for k in m0[1] if k.startswith(("time_", "val/"))}
    for key in sorted(set(m0[1]) - left_out):
        assert m3[1][key] == pytest.approx(m0[1][key], rel=1e-4), key
    assert m3[1]["grad_norm"] > 0
    w0, w3 = _weights(runs[0]), _weights(runs[3])
    for name in w0:
        assert torch.allclose(w0[name], w3[name], atol=1e-5), name
