"""The trainer end to end on the embedded toy task: one step, two ranks on gloo, resume after SIGKILL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hpt_fast.checkpoint import complete_checkpoints, latest_checkpoint, load_state
from hpt_fast.metrics import read_metrics

# small enough for a 2-core CPU: 4 prompts x 2 rollouts of at most 24 tokens
SMALL = [
    "train.prompts_per_step=4", "rollout.n=2", "data.max_response_length=24",
    "validation.every=0", "deepspeed.micro_batch_tokens=256",
]


def _run(out: Path, *overrides: str, nproc: int = 1, wait: bool = True, env_extra: dict | None = None,
         check: bool = True, prefix: tuple[str, ...] = ("-m", "hpt_fast.train")):
    args = [f"train.output_dir={out}", *SMALL, *overrides]
    if nproc == 1:
        cmd = [sys.executable, *prefix, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_port", str(29500 + os.getpid() % 1000), *prefix, *args]
    # as pyproject.toml does in this process: a loss with no graph (zero gradients) fails the run
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "error:token_loss_fn returned losses with no autograd graph:UserWarning",
           **(env_extra or {})}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 or not check, done.stderr[-4000:]
    return done


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run) / "model.safetensors"))


def test_one_hpt_step_end_to_end(tmp_path):
    out = tmp_path / "run"
    _run(out, "train.total_steps=1")
    metrics = read_metrics(out)
    assert len(metrics) == 1 and metrics[0]["step"] == 1 and metrics[0]["rule"] == "hpt"
    m = metrics[0]
    for key in ("reward_mean", "sft_fraction", "loss", "grad_norm", "time_rollout", "time_train", "tokens_per_s"):
        assert key in m and m[key] == m[key], key  # present and not NaN
    # sft_fraction is the share of the 4 prompts sent to SFT; the share of demonstration rows among
    # the batch's rows (each SFT prompt has 1 row, each RL prompt 2) is logged beside it
    assert m["sft_fraction"] * 4 == round(m["sft_fraction"] * 4)
    k = round(m["sft_fraction"] * 4)
    assert m["batch_sft_fraction"] == pytest.approx(k / (k + 2 * (4 - k)))
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == "step_00000001"
    assert load_state(ckpt)["step"] == 1
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert (out / "config.yaml").is_file()
    # the same command again: nothing left to train, and it says so
    again = _run(out, "train.total_steps=1")
    assert "final: nothing to train: the run is already at step 1 of train.total_steps=1" in again.stdout
    assert len(read_metrics(out)) == 1


# ``python -m hpt_fast.train`` run in this interpreter, which then reports on the process group
RUN_AS_PROGRAM = """
import runpy, sys
import torch.distributed as dist
sys.argv = ["hpt_fast.train", *sys.argv[1:]]
try:
    runpy.run_module("hpt_fast.train", run_name="__main__")
except SystemExit as exc:
    print("exit code:", exc.code, "process group left:", not dist.is_initialized())
"""


def test_a_finished_run_leaves_its_process_group_before_the_interpreter_exits(tmp_path):
    """The entry point destroys the process group after a run that ended normally (left to the
    interpreter's exit, gloo's threads aborted a rank of a 2-rank run once), and not after an error."""
    done = _run(tmp_path / "run", "train.total_steps=1", prefix=("-c", RUN_AS_PROGRAM))
    assert "exit code: 0 process group left: True" in done.stdout, done.stdout
    # a resume that finds a damaged checkpoint: the group was made, the exit code is 2, the group stays
    (latest_checkpoint(tmp_path / "run") / "trainer_state.pt").write_bytes(b"damaged")
    done = _run(tmp_path / "run", "train.total_steps=2", prefix=("-c", RUN_AS_PROGRAM))
    assert "exit code: 2 process group left: False" in done.stdout, done.stdout + done.stderr[-2000:]


def test_two_ranks_match_one_rank(tmp_path):
    """SFT rows make the batch independent of sampling: 2 ranks x 2 prompts == 1 rank x 4 prompts."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["algorithm.method=sft", "train.total_steps=2"]
    _run(one, *common)
    _run(two, *common, nproc=2)
    m1, m2 = read_metrics(one), read_metrics(two)
    assert len(m1) == len(m2) == 2
    for a, b in zip(m1, m2):
        assert sorted(a) == sorted(b)
        # every metric but the timings: the loss's statistics are merged over the ranks too, not
        # rank 0's own, and grad_norm is the norm of the gradient summed over the ranks (Adam
        # barely sees a gradient off by a constant factor, so the weights below would not show it)
        for key in sorted(set(a) - {"tokens_per_s"}):
            if not key.startswith("time_"):
                assert a[key] == pytest.approx(b[key], rel=1e-4), key
        assert a["grad_norm"] > 0 and a["train_tokens"] > 0
    w1, w2 = _weights(one), _weights(two)
    for name in w1:
        assert torch.allclose(w1[name], w2[name], atol=1e-5), name


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    # enough steps that the run cannot finish between seeing checkpoint 2 and the kill
    steps = ["train.total_steps=12", "train.checkpoint_every=1", "train.keep_checkpoints=2"]
    _run(full, *steps)
    proc = _run(killed, *steps, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline:
        ckpt = latest_checkpoint(killed)
        if ckpt is not None and ckpt.name >= "step_00000002":
            break
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(killed).name < "step_00000012"
    _run(killed, *steps)  # resumes from the last complete checkpoint
    w_full, w_resumed = _weights(full), _weights(killed)
    for name in w_full:
        assert torch.equal(w_full[name], w_resumed[name]), name
    assert [p.name for p in complete_checkpoints(killed)] == ["step_00000011", "step_00000012"]


def test_bad_config_is_a_clear_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "hpt_fast.train", "rollout.nn=3"], capture_output=True, text=True)
    assert done.returncode == 2 and "rollout.nn" in done.stderr


def test_uncreatable_output_dir_is_a_clear_error(tmp_path):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "run"
    done = _run(out, check=False)
    assert done.returncode == 2 and f"config error: train.output_dir: cannot create {out}" in done.stderr, \
        done.stderr[-3000:]


def test_prompts_not_divisible_by_the_ranks_is_a_config_error(tmp_path):
    done = _run(tmp_path / "run", "train.prompts_per_step=3", nproc=2, check=False)
    assert done.returncode != 0
    assert "config error: train.prompts_per_step: 3 must be a multiple of the world size 2" in done.stderr, \
        done.stderr[-3000:]


def test_missing_data_file_is_a_clear_error_before_the_model_loads(tmp_path):
    missing = tmp_path / "nowhere.parquet"
    done = _run(tmp_path / "run", f"data.train_files=[{missing}]", check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"data error: {missing}: no such file" in done.stderr and "Traceback" not in done.stderr
    # transformers' weight-loading progress bar: the data is read first, so it never starts
    assert "Loading weights" not in done.stderr


def test_liger_kernels_patch_the_model_classes():
    """``model.liger_kernels``: the trainer's call into Liger's real API swaps in its RMSNorm and
    SwiGLU modules and its RoPE function (their Triton kernels run on CUDA only, so none runs here)."""
    code = (
        "import transformers.models.qwen2.modeling_qwen2 as q\n"
        "from transformers import AutoModelForCausalLM\n"
        "from hpt_fast.toy import build_toy, default_toy_dir\n"
        "from hpt_fast.trainer import Trainer\n"
        "toy = build_toy(default_toy_dir())\n"
        "rope = q.apply_rotary_pos_emb\n"
        "Trainer._apply_liger(str(toy.model))\n"
        "m = AutoModelForCausalLM.from_pretrained(toy.model)\n"
        "print(type(m.model.norm).__name__, type(m.model.layers[0].mlp).__name__, q.apply_rotary_pos_emb is not rope)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-3:] == ["LigerRMSNorm", "LigerSwiGLUMLP", "True"]


def test_the_deepspeed_launcher_runs_two_ranks(tmp_path):
    """``deepspeed --num_gpus 2 --module hpt_fast.train`` (the ``deepspeed`` command is this runner):
    the launcher passes --local_rank and sets the rank variables; on the CPU it starts 2 gloo ranks."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(30500 + os.getpid() % 1000), "--module",
           "hpt_fast.train", f"train.output_dir={out}", *SMALL, "train.total_steps=1"]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert load_state(latest_checkpoint(out))["world_size"] == 2
