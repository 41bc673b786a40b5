"""Step time: hpt_fast's Trainer (an HPT step and a GRPO step) against TRL's GRPOTrainer, on the
embedded default's tiny Qwen2, in one process.

Usage (from the repository root; needs the ``bench`` extra, which brings TRL):
    python -m bench.step_time_vs_trl [--warmup 2] [--steps 20] [--threads 1] [--trl-micro-batches 1]
        [--out bench/results_step_time_cpu.md]

What runs (all float32, CPU, starting from the same toy weights, ``hpt_fast.toy``):
- ``hpt_fast HPT``: ``Trainer(Config())`` (the embedded default: 32 prompts x 8 rollouts, at most
  64 new tokens, temperature 1, one optimizer update per step), validation and checkpoints off.
- ``hpt_fast GRPO``: the same with ``algorithm.method=grpo`` (``configs/toy-grpo.yaml``).
- ``TRL GRPOTrainer``: TRL's GRPO with the same model weights, the same 32 prompts in each step
  (the order hpt_fast's ``PromptSampler`` gives), ``num_generations=8``,
  ``max_completion_length=64``, temperature 1 / top-p 1 / top-k 0, the same reward (a function
  calling ``hpt_fast.reward.RewardPool``, the same verifier and worker count), ``beta=0`` (no KL,
  no reference model, as in HPT), ``loss_type="grpo"`` with group-std advantages and clip 0.2 (our
  ``grpo`` preset), ``num_iterations=1`` and all 256 rollouts in one micro-batch, so one
  generation and one optimizer update per step and no old-log-prob forward (the ratio is 1, as in
  ours); AdamW at the same lr / weight decay / warm-up / grad clip; no vLLM, no gradient
  checkpointing, no bf16, no evaluation, no checkpoints, ``report_to="none"``.

Interleaving: TRL's own ``train()`` loop drives the run; a callback runs one hpt_fast HPT step and
one hpt_fast GRPO step after each TRL optimizer step, so the three alternate step by step and a
change of machine load hits them alike. The first ``--warmup`` steps of each are not timed.

How each step time and its split are measured:
- hpt_fast: wall time around ``Trainer.train_step()``; the split is the ``time_rollout``,
  ``time_reward`` (decode + verifier + batch rule), ``time_train`` (micro-batches, forward,
  fused loss, backward, optimizer) and ``time_weight_update`` metrics it returns.
- TRL: wall time from the end of our steps (in the callback) to TRL's next ``on_step_end``, so it
  includes the data loader, TRL's logging bookkeeping and everything of the step. Timers wrapped
  around bound methods of the trainer instance split it: rollout = ``GRPOTrainer._generate``
  (chat template tokenisation, ``model.generate``, EOS masking, decoding); reward =
  ``_prepare_inputs`` minus ``_generate`` (the reward function, group advantages, padding);
  train = the rest (the policy forward through TRL's fused LM head, backward, clipping, AdamW,
  scheduler, loop overhead). TRL has no weight update step: it generates with the trained module.
  The time inside ``model.generate`` alone is reported too.

Completion lengths are not forced: both sides sample from the same model at the same temperature
and stop at EOS, so their expected lengths agree, but the draws differ; generated tokens per step
and generation throughput are reported next to the times so the comparison can be normalised.
Prompts are never truncated (the toy's longest prompt is well under 64 tokens); the script
checks that TRL's tokenised prompts equal hpt_fast's.

This module is not a pytest test (its name does not start with ``test_``) and imports TRL only
inside ``main``, so ``pytest bench/`` never needs TRL.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from bench.cli import cli_description
from bench.fused_op_table import machine_description
from hpt_fast.config import Config
from hpt_fast.data import PromptSampler
from hpt_fast.reward import RewardPool
from hpt_fast.toy import use_toy

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "bench" / "results_step_time_cpu.md"
SIDES = ("hpt_fast HPT", "hpt_fast GRPO", "TRL GRPOTrainer")
SPLIT = ("rollout", "reward", "train", "weight update")


@dataclass
class StepRecord:
    """One timed step of one side.

    Attributes:
        seconds: wall time of the whole step.
        split: seconds per ``SPLIT`` part (TRL: no weight update, 0).
        rollouts: completions sampled; generated: tokens generated (stop token included);
        trained: response tokens in the loss; generate_seconds: TRL only, inside ``model.generate``;
        positions, tokens: TRL only, the training forward's positions (padding included) and the real
        prompt + completion tokens among them.
    """

    seconds: float
    split: dict[str, float]
    rollouts: int
    generated: int
    trained: int
    generate_seconds: float = 0.0
    positions: int = 0
    tokens: int = 0


@dataclass
class Stopwatch:
    """Seconds accumulated per name by wrapped callables (reset by ``take``)."""

    totals: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def wrap(
        self, name: str, fn: Callable[..., Any], count: Optional[Callable[[Any], dict[str, int]]] = None
    ) -> Callable[..., Any]:
        """``fn`` timed under ``name``; ``count(result)`` (optional, {key: number}) is summed into ``counts``."""
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start
            for key, number in (count(result) if count is not None else {}).items():
                self.counts[key] = self.counts.get(key, 0) + int(number)
            return result
        return timed

    def take(self) -> tuple[dict[str, float], dict[str, int]]:
        """The totals and counts since the last ``take``; starts afresh."""
        out = (self.totals, self.counts)
        self.totals, self.counts = {}, {}
        return out


def hpt_fast_config(method: str, output_dir: str) -> Config:
    """The embedded default for ``method`` ("hpt" or "grpo") with validation and checkpoints off."""
    cfg = Config()
    cfg.algorithm.method = method
    cfg.validation.every = 0
    cfg.train.output_dir = output_dir
    return use_toy(cfg)


def prompt_schedule(cfg: Config, dataset_size: int, steps: int) -> list[list[int]]:
    """The prompt indices of hpt_fast's first ``steps`` steps (a fresh copy of its sampler)."""
    sampler = PromptSampler(dataset_size, cfg.train.seed, cfg.data.shuffle)
    return [sampler.next_batch(cfg.train.prompts_per_step) for _ in range(steps)]


def our_step(trainer) -> StepRecord:
    """One ``train_step`` of an hpt_fast Trainer, timed from outside and split by its metrics."""
    start = time.perf_counter()
    m = trainer.train_step()
    seconds = time.perf_counter() - start
    rollouts = trainer.cfg.train.prompts_per_step * trainer.cfg.rollouts_per_prompt(m["rule"])
    return StepRecord(
        seconds=seconds,
        split={"rollout": m["time_rollout"], "reward": m["time_reward"], "train": m["time_train"],
               "weight update": m["time_weight_update"]},
        rollouts=rollouts, generated=round(m["response_length"] * rollouts), trained=int(m["train_tokens"]),
    )


def trl_reward(pool: RewardPool) -> Callable[..., list[float]]:
    """A TRL reward function scoring with ``pool`` (hpt_fast's verifier) against the ``ground_truth`` column."""
    def hpt_fast_reward(prompts, completions, ground_truth, **kwargs) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return pool.score(texts, ground_truth).rewards.tolist()
    return hpt_fast_reward


def trl_config(cfg: Config, output_dir: str, max_steps: int, micro_batches: int = 1):
    """TRL's GRPOConfig matched to ``cfg`` (see the module docstring).

    Build it before any hpt_fast Trainer: it sets up accelerate's process state, which must see no
    launcher variables. The Trainer sets LOCAL_RANK / WORLD_SIZE for DeepSpeed's one-process group,
    and accelerate reads LOCAL_RANK as "distributed CPU" and wraps the model in DDP, whose extra
    graph traversal and gloo all-reduce a single-process TRL run does not have.
    """
    from trl import GRPOConfig

    n = cfg.rollout.n
    o = cfg.optim
    rollouts = cfg.train.prompts_per_step * n
    if rollouts % micro_batches:
        raise ValueError(f"--trl-micro-batches {micro_batches} does not divide the {rollouts} rollouts of a step")
    return GRPOConfig(
        output_dir=output_dir, report_to="none", use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, use_vllm=False, seed=cfg.train.seed, data_seed=cfg.train.seed,
        # one generation of 32 prompts x 8 and one optimizer update per step, over micro_batches
        # micro-batches (generation and update aligned, so TRL computes no old log-probs)
        num_generations=n, per_device_train_batch_size=rollouts // micro_batches,
        gradient_accumulation_steps=micro_batches, steps_per_generation=micro_batches, num_iterations=1,
        max_steps=max_steps,
        shuffle_dataset=False, max_completion_length=cfg.data.max_response_length,
        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, top_k=0,
        beta=0.0, loss_type="grpo", scale_rewards="group", epsilon=0.2, mask_truncated_completions=False,
        entropy_coef=0.0,
        learning_rate=o.lr, weight_decay=o.weight_decay, lr_scheduler_type="constant_with_warmup",
        warmup_steps=o.warmup_steps, max_grad_norm=o.grad_clip or 0.0, optim="adamw_torch",
        eval_strategy="no", save_strategy="no", logging_steps=10**6, disable_tqdm=True, log_completions=False,
        remove_unused_columns=False, dataloader_num_workers=0,
    )


def build_trl(cfg: Config, args, rows: list[dict], pool: RewardPool, callback):
    """TRL's GRPOTrainer on ``cfg``'s model with ``args`` (``trl_config``), with timers on its stages.

    Returns:
        (trainer, stopwatch): the stopwatch times "generate" (``_generate``), "model.generate" and
        "prepare" (``_prepare_inputs``) and counts "generated" tokens and the training inputs'
        "positions" (padded) and real "tokens".
    """
    from accelerate.utils import DistributedType
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
    trainer = GRPOTrainer(
        model=model, reward_funcs=[trl_reward(pool)], args=args, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer, callbacks=[callback],
    )
    if trainer.accelerator.distributed_type != DistributedType.NO:
        raise RuntimeError(f"TRL runs as {trainer.accelerator.distributed_type}, not as one plain process")
    watch = Stopwatch()
    # instance attributes shadow the methods, so TRL's own calls (self._generate(...)) go through the timers
    trainer._generate = watch.wrap("generate", trainer._generate,
                                   count=lambda out: {"generated": sum(map(len, out[1]))})
    trainer._prepare_inputs = watch.wrap("prepare", trainer._prepare_inputs, count=lambda b: {
        "positions": b["prompt_ids"].numel() + b["completion_ids"].numel(),
        "tokens": b["prompt_mask"].sum() + b["completion_mask"].sum(),
    })
    trainer.model.generate = watch.wrap("model.generate", trainer.model.generate)
    return trainer, watch


def check_same_prompts(trl_trainer, ours, rows: list[dict], indices: list[int]) -> None:
    """Raise unless TRL tokenises the first step's prompts exactly as hpt_fast does."""
    theirs, _, _ = trl_trainer._tokenize_prompts([rows[k]["prompt"] for k in range(len(indices))])
    mine = ours.train_set.batch(indices).prompt_ids
    if [list(t) for t in theirs] != mine:
        raise RuntimeError("TRL's prompt token ids differ from hpt_fast's: the comparison would not be like for like")


def make_interleaver(ours: dict[str, Any], records: dict[str, list[StepRecord]], total: int):
    """A TrainerCallback that times TRL's steps and runs one step of each hpt_fast trainer after each.

    ``records`` gets one StepRecord per step of every side (warm-up steps included).
    """
    from transformers import TrainerCallback

    class Interleave(TrainerCallback):
        watch: Stopwatch  # set after the trainer exists
        resumed: float = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.watch.take()
            self.resumed = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - self.resumed
            totals, counts = self.watch.take()
            rollout = totals.get("generate", 0.0)
            reward = totals.get("prepare", 0.0) - rollout
            generated = counts.get("generated", 0)
            records["TRL GRPOTrainer"].append(StepRecord(
                seconds=seconds,
                split={"rollout": rollout, "reward": reward, "train": seconds - rollout - reward, "weight update": 0.0},
                rollouts=args.generation_batch_size, generated=generated, trained=generated,
                generate_seconds=totals.get("model.generate", 0.0),
                positions=counts.get("positions", 0), tokens=counts.get("tokens", 0),
            ))
            for side, trainer in ours.items():
                records[side].append(our_step(trainer))
            print(f"round {state.global_step}/{total}: " + ", ".join(
                f"{side} {recs[-1].seconds:.2f} s" for side, recs in records.items()), flush=True)
            self.resumed = time.perf_counter()

    return Interleave()


# ---- the report --------------------------------------------------------------------------------


def summarise(records: list[StepRecord], warmup: int) -> dict[str, float]:
    """Medians (and the step-time range) over the timed steps."""
    timed = records[warmup:]
    med = statistics.median
    out = {
        "seconds": med([r.seconds for r in timed]),
        "min": min(r.seconds for r in timed),
        "max": max(r.seconds for r in timed),
        "rollouts": med([r.rollouts for r in timed]),
        "generated": med([r.generated for r in timed]),
        "trained": med([r.trained for r in timed]),
        "gen_rate": med([r.generated / max(r.split["rollout"], 1e-9) for r in timed]),
        "generate_seconds": med([r.generate_seconds for r in timed]),
        "positions": med([r.positions for r in timed]),
        "tokens": med([r.tokens for r in timed]),
    }
    for part in SPLIT:
        out[part] = med([r.split[part] for r in timed])
    return out


def paired_ratios(records: dict[str, list[StepRecord]], side: str, warmup: int) -> list[float]:
    """TRL's step time over ``side``'s, per interleaved round: drift of the machine's load cancels."""
    return [t.seconds / o.seconds for t, o in zip(records["TRL GRPOTrainer"][warmup:], records[side][warmup:])]


def format_table(summary: dict[str, dict[str, float]], records: dict[str, list[StepRecord]], warmup: int) -> str:
    """One markdown row per side: step time, its split, tokens, and the speed-up over TRL."""
    trl = summary["TRL GRPOTrainer"]["seconds"]
    lines = [
        "| side | step s, median (min-max) | rollout s | reward s | train s | weight update s | rollouts | "
        "generated tokens | train tokens | generated tokens/s (rollout) | TRL / this: ratio of medians | "
        "TRL / this: per round, median (min-max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for side in SIDES:
        s = summary[side]
        ratios = paired_ratios(records, side, warmup)
        lines.append(
            f"| {side} | {s['seconds']:.2f} ({s['min']:.2f}-{s['max']:.2f}) | {s['rollout']:.2f} | {s['reward']:.2f} | "
            f"{s['train']:.2f} | {s['weight update']:.3f} | {s['rollouts']:.0f} | {s['generated']:.0f} | "
            f"{s['trained']:.0f} | {s['gen_rate']:,.0f} | {trl / s['seconds']:.2f}x | "
            f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |"
        )
    return "\n".join(lines)


def _versions() -> str:
    parts = []
    for dist in ("transformers", "trl", "accelerate", "datasets", "deepspeed"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} not installed")
    return ", ".join(parts)


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return Path("/proc/loadavg").read_text().strip()


def _git_state() -> str:
    """HEAD and the uncommitted changes to the code being measured (others may be editing the tree).

    ``--no-optional-locks``: status must not take the index lock that others committing need.
    """
    def git(*cmd: str) -> str:
        out = subprocess.run(["git", "--no-optional-locks", *cmd], cwd=REPO_ROOT, capture_output=True, text=True)
        return out.stdout.rstrip()

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "hpt_fast: not run from a git checkout (commit unknown)"
    dirty = git("status", "--porcelain", "--", "hpt_fast", "csrc", "kernels").splitlines()
    changed = ", ".join(line[3:] for line in dirty) or "none"
    return f"hpt_fast at commit {head}; uncommitted changes in: {changed}"


def report(summary: dict, records: dict[str, list[StepRecord]], args: argparse.Namespace, command: str,
           load_before: str, load_after: str) -> str:
    """The whole markdown result: table, per-step times, how it was measured, machine and command."""
    cfg = Config()
    head = (
        f"One training step on the embedded default: tiny Qwen2 (hidden 64, 2 layers), {cfg.train.prompts_per_step} "
        f"prompts x {cfg.rollout.n} rollouts, at most {cfg.data.max_response_length} new tokens, temperature "
        f"{cfg.rollout.temperature}, float32, CPU, {args.threads} torch thread(s); {args.warmup} warm-up step(s) "
        f"then {args.steps} timed steps per side, interleaved step by step. Times are medians over the timed steps."
    )
    trl = summary["TRL GRPOTrainer"]
    per_step = ["| step | " + " | ".join(SIDES) + " |", "|---|" + "---|" * len(SIDES)]
    for k in range(args.warmup + args.steps):
        tag = " (warm-up)" if k < args.warmup else ""
        per_step.append(f"| {k + 1}{tag} | " + " | ".join(f"{records[s][k].seconds:.2f}" for s in SIDES) + " |")
    return "\n".join([
        head, "", format_table(summary, records, args.warmup), "",
        f"TRL's rollout time inside `model.generate` alone: {trl['generate_seconds']:.2f} s (median). TRL's "
        f"training forward covers {trl['positions']:.0f} positions (prompts left-padded and completions "
        f"right-padded to the longest of the step) for {trl['tokens']:.0f} real prompt + completion tokens "
        f"({1 - trl['tokens'] / max(trl['positions'], 1):.0%} padding; medians).", "",
        "Step times, seconds:", "", *per_step, "",
        "How it was measured: see the docstring of `bench/step_time_vs_trl.py` (hpt_fast: wall time around "
        "`Trainer.train_step()`, split by the time_* metrics it returns; TRL: wall time between its step ends "
        "minus the interleaved hpt_fast steps, split by timers on `GRPOTrainer._generate` (rollout) and "
        "`_prepare_inputs` (rollout + reward + advantages), the rest being train). Completion lengths are not "
        "forced: both sides stop at EOS.", "",
        machine_description("cpu"),
        f"- {_versions()}",
        f"- {_git_state()}",
        f"- load before: `{load_before}`",
        f"- load after: `{load_after}`",
        f"- command: `{command}`",
        "",
    ])


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=cli_description(__doc__))
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for every side (default one: the toy's tensors are too small "
                             "for two, see hpt_fast.toy)")
    parser.add_argument("--trl-micro-batches", type=int, default=1,
                        help="micro-batches TRL splits a step's rollouts into (gradient accumulation)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown file to write")
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.steps < 1:
        parser.error("--warmup must be >= 0 and --steps >= 1")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if importlib.util.find_spec("trl") is None:
        sys.exit("TRL is not installed: pip install -e '.[bench]' (it is in the bench extra only)")
    import transformers

    from hpt_fast.trainer import Trainer

    command = " ".join(["python -m bench.step_time_vs_trl", *(sys.argv[1:] if argv is None else argv)])
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    load_before = _uptime()
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory(prefix="step_time_vs_trl-") as tmp:
        trl_args = trl_config(hpt_fast_config("hpt", f"{tmp}/hpt"), f"{tmp}/trl", total, args.trl_micro_batches)
        ours = {"hpt_fast HPT": Trainer(hpt_fast_config("hpt", f"{tmp}/hpt")),
                "hpt_fast GRPO": Trainer(hpt_fast_config("grpo", f"{tmp}/grpo"))}
        ref = ours["hpt_fast HPT"]
        schedule = prompt_schedule(ref.cfg, len(ref.train_set), total)
        problems = ref.train_set.problems
        rows = [{"prompt": problems[i].prompt, "ground_truth": problems[i].ground_truth}
                for step in schedule for i in step]
        records: dict[str, list[StepRecord]] = {side: [] for side in SIDES}
        callback = make_interleaver(ours, records, total)
        with RewardPool() as pool:
            trl_trainer, watch = build_trl(ref.cfg, trl_args, rows, pool, callback)
            callback.watch = watch
            check_same_prompts(trl_trainer, ref, rows, schedule[0])
            # TRL / accelerate may have changed the thread count while setting up
            torch.set_num_threads(args.threads)
            trl_trainer.train()
        for trainer in ours.values():
            trainer.close()
    load_after = _uptime()
    summary = {side: summarise(records[side], args.warmup) for side in SIDES}
    text = report(summary, records, args, command, load_before, load_after)
    print(text)
    args.out.write_text(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
