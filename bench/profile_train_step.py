"""Where a training step's time goes: torch.profiler over a few steps of the trainer.

The embedded default ran on an H200 slower than on the 2-core CPU, its step times varying 5-6x
between steps (``results_gpu_h200_train.md``). This script builds the trainer as
``python -m hpt_fast.train`` does (an optional YAML config, then key=value overrides), runs
``--warmup`` steps, then profiles ``--steps`` steps and prints:

- each profiled step's phase times (the step's own ``time_*`` metrics);
- the ops and kernels with the most device time (on CPU: host time), the top ``--rows``;
- per step, how often the host waited for the device or the allocator went to the driver
  (synchronisations, device-to-host copies, cudaMalloc / cudaFree), the usual causes of a
  host-bound GPU step.

    python -m bench.profile_train_step model.liger_kernels=true --steps 3
"""
from __future__ import annotations

import argparse
import collections
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from bench.cli import cli_description
from bench.fused_op_table import machine_description
from hpt_fast.train import run_config
from hpt_fast.trainer import Trainer, leave_process_group

# host calls that wait for the device or reach the driver's allocator: name -> what it means
WAITS = {
    # .item(), int(t), float(t), t.tolist(): of a GPU tensor each waits for the device; CPU
    # tensors' reads (free) count too, so the syncs' own rows below are the GPU's measure
    "aten::_local_scalar_dense": "reads of a tensor value (a sync on a GPU tensor)",
    "cudaStreamSynchronize": "stream syncs",
    "cudaDeviceSynchronize": "device syncs",
    "cudaEventSynchronize": "event syncs",
    "Memcpy DtoH": "device-to-host copies",
    "cudaMalloc": "cudaMalloc",
    "cudaFree": "cudaFree",
}
PHASES = ("time_rollout", "time_reward", "time_train", "time_weight_update")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=cli_description(__doc__))
    parser.add_argument("args", nargs="*", help="an optional YAML config, then key=value overrides")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the profiled ones")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps")
    parser.add_argument("--rows", type=int, default=25, help="rows of the op table")
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.steps < 1 or args.rows < 1:
        parser.error(f"need --warmup >= 0, --steps >= 1, --rows >= 1; got {args.warmup}, {args.steps}, {args.rows}")
    return args


def wait_counts(events, steps: int) -> dict[str, float]:
    """Per step, how many times each of ``WAITS`` occurs among the profiler's ``events``."""
    counts = collections.Counter()
    for e in events:
        for name, label in WAITS.items():
            if e.key == name or e.key.startswith(name + " "):
                counts[label] += e.count
    return {label: counts[label] / steps for label in WAITS.values()}


def profile_steps(args: argparse.Namespace) -> str:
    trainer = Trainer(run_config(args.args))
    try:
        for _ in range(args.warmup):
            trainer.train_step()
        cuda = trainer.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        metrics = []
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                with record_function("train_step"):
                    metrics.append(trainer.train_step())
                if cuda:
                    torch.cuda.synchronize()
    finally:
        trainer.close()
    lines = [machine_description("cuda" if cuda else "cpu"), "",
             f"### {args.steps} profiled steps after {args.warmup}: phase seconds", "",
             "| step | " + " | ".join(PHASES) + " |", "| --- |" + " --- |" * len(PHASES)]
    for m in metrics:
        lines.append(f"| {m['step']} | " + " | ".join(f"{m[k]:.3f}" for k in PHASES) + " |")
    events = prof.key_averages()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    lines += ["", f"### Top {args.rows} by {sort}", "", "```", events.table(sort_by=sort, row_limit=args.rows), "```", "",
              "### Per step: host waits and driver allocations", "",
              "| what | per step |", "| --- | --- |"]
    lines += [f"| {label} | {n:g} |" for label, n in wait_counts(events, args.steps).items()]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    print(profile_steps(parse_args(argv)))
    leave_process_group()  # a program about to exit, as python -m hpt_fast.train


if __name__ == "__main__":
    main()
