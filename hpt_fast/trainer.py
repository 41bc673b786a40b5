"""The HPT training loop on DeepSpeed, top to bottom.

One step (architecture.md's data flow):
    prompts (sharded by rank) -> rollout engine (n samples each) -> reward (0/1 per sample)
    -> batch rule (HPT gate, or the chosen baseline's) -> rows -> micro-batches packed by tokens
    -> model trunk -> FusedUnifiedLoss (fused lm_head + estimator, no [tokens x vocab] tensor)
    -> DeepSpeed backward / step -> rollout engine sees the new weights.

The trunk and the fused head run inside DeepSpeed's forward (``hpt_fast.policy.FusedHeadPolicy``),
so ZeRO stages 0-3 all apply; under ZeRO-3 the weights are gathered one parameter at a time for
checkpoints and for the vLLM engine. The rollout engine is either ``NativeEngine`` (the same module)
or ``VLLMEngine`` (an in-process vLLM that sleeps while the trainer trains and is fed the new
weights after each step).

Losses are normalised by token and sequence counts summed over every micro-batch and rank
(``Normalizers``), and each rank's loss is multiplied by the world size because DeepSpeed averages
gradients over ranks: so N ranks give the gradient of the same global loss as one rank would on
the whole batch. All randomness of a step derives from (seed, step, rank), so a run resumed from a
checkpoint continues exactly as the uninterrupted run would have.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from hpt_fast import backends
from hpt_fast.batching import MicroBatch, Row, collate, pack
from hpt_fast.checkpoint import (
    latest_checkpoint, load_rank_state, load_settings, load_state, save_checkpoint, verify_checkpoint,
)
from hpt_fast.config import Config, ConfigError, build_estimators, dump_config, rl_advantage_kind
from hpt_fast.data import DataError, PromptSampler, check_set_names, load_prompt_set, shard
from hpt_fast.estimator import Normalizers
from hpt_fast.hpt import BatchRows, assemble_hpt_rows, assemble_luffy_rows, assemble_rl_rows, assemble_sft_rows
from hpt_fast.logit_head import logit_transform
from hpt_fast.loss import FusedUnifiedLoss
from hpt_fast.metrics import MetricsLogger
from hpt_fast.policy import FusedHeadPolicy, gathered_state_dict
from hpt_fast.reward import RewardPool
from hpt_fast.rollout import NativeEngine, RolloutEngine, context_length, end_token_ids
from hpt_fast.step_stats import StepStats

logger = logging.getLogger(__name__)


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group when launched by torchrun / deepspeed (gloo on CPU, NCCL on GPU).

    Returns (rank, world_size, device). A single process without launcher variables runs alone.
    """
    import deepspeed

    if "WORLD_SIZE" not in os.environ:
        # DeepSpeed always wants a process group: make a one-process one on a free local port
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions."""
    digest = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# settings a resumed run keeps: the checkpoint's weights, optimizer state, schedule and data order
# were made with them (the optimizer state carries lr and weight decay, and would override a change)
_RESUME_KEYS = (
    "model.path", "deepspeed.bf16", "optim.lr", "optim.weight_decay", "optim.schedule", "optim.warmup_steps",
    "optim.min_lr_ratio", "train.seed", "data.shuffle",
)


def _resume_settings(cfg: Config) -> dict:
    out = {}
    for key in _RESUME_KEYS:
        section, name = key.split(".")
        out[key] = getattr(getattr(cfg, section), name)
    return out


def _check_resume_settings(path: Path, cfg: Config) -> None:
    """ConfigError naming each setting of ``_RESUME_KEYS`` that differs from the checkpoint's."""
    saved = load_settings(path)
    if saved is None:  # written before checkpoints recorded their settings
        return
    now = _resume_settings(cfg)
    changed = [f"{k} {saved[k]!r} there, {now[k]!r} now" for k in _RESUME_KEYS if k in saved and saved[k] != now[k]]
    if changed:
        raise ConfigError(
            f"train.output_dir holds checkpoint {path}, written with other settings ({'; '.join(changed)}). "
            "A resumed run keeps them: resume with the same values, or give a new train.output_dir "
            "(with model.path set to that checkpoint to start from its weights)"
        )


def _load_tokenizer(path: str, trust_remote_code: bool):
    """The tokenizer at ``path``; one without a pad token (LLaMA-3's) pads with its EOS, which the
    attention mask and the targets leave out anyway."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"model.tokenizer: the tokenizer at {path} has no EOS token, which ends every rollout")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


class Trainer:
    """Builds everything a run needs from a ``Config`` and runs it (``fit``)."""

    def __init__(self, cfg: Config) -> None:
        import deepspeed
        from transformers import AutoConfig, AutoModelForCausalLM

        self.cfg = cfg
        self.rank, self.world, self.device = init_distributed()
        try:  # a backend this device cannot run: found now, not at the first loss
            backends.resolve(cfg.fused_op.backend, self.device)
        except (ValueError, ImportError) as err:
            raise ConfigError(f"fused_op.backend: {err}") from None
        self.out = Path(cfg.train.output_dir)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"train.output_dir: cannot create {self.out}: {err.strerror or err}") from None
        try:  # writable: found now, not after the model has loaded
            tempfile.TemporaryFile(dir=self.out).close()
        except OSError as err:
            raise ConfigError(f"train.output_dir: cannot write in {self.out}: {err.strerror or err}") from None
        mini = cfg.train.mini_batch_prompts or cfg.train.prompts_per_step
        if mini % self.world:
            key = "train.mini_batch_prompts" if cfg.train.mini_batch_prompts else "train.prompts_per_step"
            raise ConfigError(f"{key}: {mini} must be a multiple of the world size {self.world}")
        torch.manual_seed(_seed(cfg.train.seed, "init"))

        resume = latest_checkpoint(self.out)
        if resume:
            verify_checkpoint(resume)
            _check_resume_settings(resume, cfg)
        trust = cfg.model.trust_remote_code
        self.tokenizer = _load_tokenizer(cfg.model.tokenizer or cfg.model.path, trust)
        # the data before the model: a missing or malformed file is reported in seconds, not
        # after a 7B model has loaded
        d = cfg.data
        # a prompt that fills the model's context cannot be generated from: dropped with the long ones
        context = context_length(AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=trust))
        self.train_set = load_prompt_set(
            d.train_files, self.tokenizer, d.max_prompt_length, d.max_response_length, d.prompt_template, d.prompt_suffix,
            require_target=cfg.algorithm.uses_demonstrations, max_context=context,
        )
        if len(self.train_set) < cfg.train.prompts_per_step:
            raise DataError(
                f"{', '.join(map(str, d.train_files))}: {len(self.train_set)} prompts fit data.max_prompt_length "
                f"and the model's context ({self.train_set.dropped} dropped as longer), fewer than "
                f"train.prompts_per_step = {cfg.train.prompts_per_step}"
            )
        check_set_names(cfg.validation.files if cfg.validation.every else [])
        self.val_sets = [
            load_prompt_set(f, self.tokenizer, d.max_prompt_length, d.max_response_length, d.prompt_template,
                            d.prompt_suffix, max_context=context)
            for f in cfg.validation.files
        ] if cfg.validation.every else []
        dtype = torch.bfloat16 if cfg.deepspeed.bf16 else torch.float32
        if cfg.model.liger_kernels and self.device.type == "cuda":
            self._apply_liger(cfg.model.path)
        self.zero_stage = cfg.deepspeed.zero_stage
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": cfg.optim.grad_clip or 0.0,
            "bf16": {"enabled": cfg.deepspeed.bf16},
            "zero_optimization": {"stage": self.zero_stage},
            "steps_per_print": 2**31 - 1,
        }
        if self.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            # while this object lives, from_pretrained loads under zero.Init: each rank
            # materialises only its partition of the weights
            self._hf_deepspeed = HfDeepSpeedConfig(ds_config)
        model = AutoModelForCausalLM.from_pretrained(
            str(resume) if resume else cfg.model.path, dtype=dtype, trust_remote_code=trust
        )
        if cfg.model.gradient_checkpointing:
            # renamed in later transformers 5 releases; the old name warns there
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        # from_pretrained returns eval mode, in which transformers skips gradient checkpointing (and
        # dropout); the native engine restores this mode after each generate
        model.to(self.device).train()

        self.sampler = PromptSampler(len(self.train_set), cfg.train.seed, d.shuffle)
        self.losses = {
            rule: FusedUnifiedLoss(est, **logit_transform(model).op_args(cfg.rollout.temperature),
                                   **cfg.fused_op.op_kwargs())
            for rule, est in build_estimators(cfg).items()
        }

        # vLLM sizes its KV cache from the free memory: it starts before the optimizer state exists
        vllm = self._make_vllm(model) if cfg.rollout.engine == "vllm" else None
        policy = FusedHeadPolicy(model, cfg.fused_op.op_kwargs())
        optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        total = cfg.train.total_steps * self._updates_per_step()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cfg.optim.lr_factor(s, total))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=policy, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
        )
        if self.zero_stage == 3:
            policy.declare_head_to_zero3()
        self.model = policy.lm
        self.stop_token_ids = end_token_ids(self.tokenizer, self.model)
        # under ZeRO-3 each forward gathers weights from every rank: generate in lockstep
        self.rollout: RolloutEngine = vllm if vllm is not None else NativeEngine(self.model, lockstep=self.zero_stage == 3)
        self.rewards = RewardPool(num_workers=cfg.reward.num_workers, timeout_s=cfg.reward.timeout_s)
        self.step = 0
        self.skipped = 0
        if resume:
            self._restore(resume)
        # vLLM starts with dummy weights: give it the trainer's before the first generate
        self.rollout.update_weights()
        self.metrics = MetricsLogger(self.out, enabled=self.rank == 0)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.out / "config.yaml")

    # ---- set-up helpers ------------------------------------------------------------------------

    @staticmethod
    def _apply_liger(model_path: str) -> None:
        """Liger's RMSNorm, SwiGLU and RoPE kernels on CUDA; the loss stays ours."""
        from transformers import AutoConfig
        from liger_kernel.transformers import monkey_patch

        model_type = AutoConfig.from_pretrained(model_path).model_type
        patch = getattr(monkey_patch, f"apply_liger_kernel_to_{model_type}", None)
        if patch is None:
            logger.warning("liger kernels: no patch for model type %r; running without", model_type)
            return
        patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)

    def _make_vllm(self, model: torch.nn.Module) -> RolloutEngine:
        """The in-process vLLM engine of ``rollout.vllm``, fed from ``model``'s parameters."""
        from hpt_fast.rollout import VLLMEngine

        v, d = self.cfg.rollout.vllm, self.cfg.data
        return VLLMEngine(
            model, self.cfg.model.path, dtype=getattr(torch, v.dtype), sleep_level=v.sleep_level,
            gpu_memory_utilization=v.gpu_memory_utilization, kv_cache_memory_bytes=v.kv_cache_memory_bytes,
            max_model_len=d.max_prompt_length + d.max_response_length, max_num_seqs=v.max_num_seqs,
            tensor_parallel_size=v.tensor_parallel_size, seed=self.cfg.train.seed,
            enable_prefix_caching=v.enable_prefix_caching, trust_remote_code=self.cfg.model.trust_remote_code,
        )

    def _updates_per_step(self) -> int:
        t = self.cfg.train
        return t.prompts_per_step // (t.mini_batch_prompts or t.prompts_per_step)

    def _restore(self, path: Path) -> None:
        state = load_state(path)
        saved = (state.get("zero_stage", 0), state.get("world_size", 1))
        # stage 0 keeps the whole optimizer state in one file, any rank count reads it; a partitioned
        # one (stage >= 1, saved or now) has a layout of its own per stage and rank count
        if (saved[0] or self.zero_stage) and saved != (self.zero_stage, self.world):
            raise ConfigError(
                f"deepspeed.zero_stage: checkpoint {path} was written with ZeRO stage {saved[0]} on {saved[1]} "
                f"ranks; resume it with the same stage and rank count (now: stage {self.zero_stage}, {self.world} ranks)"
            )
        if self.zero_stage:
            # ZeRO reads only this rank's entry; the float32 master weights come from it too
            shares: list = [None] * self.world
            shares[self.rank] = load_rank_state(path, self.rank)["optimizer"]
            self.optimizer.load_state_dict(shares, load_optimizer_states=True, load_from_fp32_weights=True)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        try:
            self.sampler.load_state_dict(state["sampler"])
        except ValueError as err:
            raise DataError(f"{path}: {err}: the training data changed since this checkpoint was written") from None
        self.step = int(state["step"])
        self.skipped = int(state["skipped"])
        logger.info("resumed from %s at step %d", path, self.step)

    def save(self) -> None:
        """Checkpoint the step (collective: every rank calls it)."""
        state = {
            "step": self.step,
            "skipped": self.skipped,
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "zero_stage": self.zero_stage,
            "world_size": self.world,
        }
        rank_state = None
        if self.zero_stage:
            rank_state = {"optimizer": self.optimizer.state_dict()}
        elif self.rank == 0:
            state["optimizer"] = self.optimizer.state_dict()
        weights = gathered_state_dict(self.model, self.rank) if self.zero_stage == 3 else None
        save_checkpoint(self.out, self.step, self.model, self.tokenizer, state, rank_state=rank_state, state_dict=weights,
                        settings=_resume_settings(self.cfg), keep=self.cfg.train.keep_checkpoints)

    # ---- one step ------------------------------------------------------------------------------

    def _rows(self, rule: str, batch, samples, rewards: Tensor, demo_rewards: Optional[Tensor]) -> list[Row]:
        """The training rows of a step under its batch rule (hpt_fast.hpt), as ``Row``s."""
        cfg = self.cfg
        has_demo = torch.tensor(batch.has_demo)
        if rule == "hpt":
            chosen: BatchRows = assemble_hpt_rows(rewards, cfg.algorithm.gamma, has_demo)
        elif rule == "luffy":
            chosen = assemble_luffy_rows(rewards, demo_rewards, has_demo)
        elif rule == "rl":
            chosen = assemble_rl_rows(rewards, kind=rl_advantage_kind(self.losses["rl"].estimator.name))
        else:
            chosen = assemble_sft_rows(len(batch.prompt_ids), has_demo)
        rows = []
        for p, s, off, adv in zip(chosen.prompt.tolist(), chosen.sample.tolist(),
                                  chosen.off_policy.tolist(), chosen.advantages.tolist()):
            if s < 0:
                reward = 1.0 if demo_rewards is None else float(demo_rewards[p])
                rows.append(Row(p, batch.prompt_ids[p], batch.demo_ids[p], adv, True, reward))
            else:
                smp = samples[p][s]
                rows.append(Row(p, batch.prompt_ids[p], smp.token_ids, adv, off, float(rewards[p, s]), smp.logprobs.tolist()))
        return rows

    def _micro_batches(self, rows: list[Row]) -> list[MicroBatch]:
        """``rows`` packed into micro-batches of at most ``deepspeed.micro_batch_tokens``, on the device."""
        pad = self.tokenizer.pad_token_id
        return [collate(rows, g, pad).to(self.device) for g in pack(rows, self.cfg.deepspeed.micro_batch_tokens)]

    def _old_logp(self, updates: list[list[MicroBatch]]) -> list[list[Optional[Tensor]]]:
        """log pi_old for each micro-batch of each of the step's updates, [B, T] float32, or None
        where the ratio is exactly 1.

        With one optimizer update per step the policy that sampled is the one being trained, so
        the ratio is 1 and no forward is spent on it. Otherwise: the sampler's log-probs
        (rollout.old_logprobs = "sampler") or a no-grad forward of the fused op ("recompute"), run
        for every update before the first one changes the weights: a later update's pi_old is
        still the policy that sampled, not the one the earlier updates left.
        """
        if self._updates_per_step() == 1:
            return [[None] * len(mbs) for mbs in updates]
        if self.cfg.rollout.old_logprobs == "sampler":
            return [[mb.sample_logprobs for mb in mbs] for mbs in updates]
        temperature = self.cfg.rollout.temperature
        n_local = sum(map(len, updates))
        with torch.no_grad():
            old = [[self.engine(mb, temperature=temperature) for mb in mbs] for mbs in updates]
            # under ZeRO-3 every forward gathers the weights from all ranks: each runs as many
            for _ in range(int(_all_max(n_local, self.device)) - n_local):
                self.engine(self._idle_batch())
        return old

    def _update(
        self, rule: str, mbs: list[MicroBatch], old: list[Optional[Tensor]], stats: StepStats
    ) -> Optional[dict[str, float]]:
        """One optimizer update on micro-batches ``mbs`` (with their log pi_old ``old``): backward
        on each, clip / skip, step; its loss and gradient norm. Merges the loss's statistics into
        ``stats``. None, and no step, when no rank has a micro-batch."""
        loss_fn = self.losses[rule]
        est = loss_fn.estimator
        counts = [dataclasses.astuple(est.normalizers(mb.mask, mb.off_policy)) for mb in mbs]
        # every rank must run the same number of backward passes (collectives in DeepSpeed)
        n_local = len(mbs)
        # a rank may have no rows at all (SFT prompts without a demonstration): still all-reduce
        totals = _all_sum([sum(c[i] for c in counts) for i in range(len(dataclasses.fields(Normalizers)))], self.device)
        n_max = int(_all_max(n_local, self.device))
        if n_max == 0:  # no rank has a row (SFT prompts without demonstrations): no gradient, no step
            return None
        norm = Normalizers(*(int(x) for x in totals))
        loss_sum = 0.0
        for k in range(n_max):
            self.engine.set_gradient_accumulation_boundary(k == n_max - 1)
            if k < n_local:
                loss, mb_stats = self.engine(mbs[k], loss_fn, old_logp=old[k], normalizers=norm)
                stats.add(mb_stats, mbs[k])
            else:
                # a rank with fewer micro-batches joins the collectives with a zero loss that still
                # runs through every parameter (ZeRO's gradient hooks fire per parameter)
                loss = self.engine(self._idle_batch()).sum() * 0.0
            self.engine.backward(loss * self.world)
            loss_sum += float(loss.detach())
        lr = self.scheduler.get_last_lr()[0]  # this update's: the engine's step moves the schedule on
        skip = self.cfg.optim.skip_grad_norm_above
        grad_norm = self._grad_norm() if (skip is not None or self.zero_stage == 0) else None
        if skip is not None and grad_norm > skip:
            self.skipped += 1
            # the engine clears parameters' .grad; ZeRO's optimizer also drops its partitioned sums
            # (stage 3 would otherwise add the next step's gradient to this one)
            self.engine.zero_grad()
            self.optimizer.zero_grad()
        else:
            self.engine.step()
        if grad_norm is None:  # ZeRO computed it during the step (for clipping)
            grad_norm = float(self.engine.get_global_grad_norm())
        loss_total, = _all_sum([loss_sum], self.device)
        return {"loss": loss_total, "grad_norm": grad_norm, "lr": lr}

    def _idle_batch(self) -> MicroBatch:
        """A one-token micro-batch for a rank that has run out of micro-batches of its own."""
        pad = self.tokenizer.pad_token_id
        return collate([Row(0, [pad], [pad], 0.0, True, 0.0)], [0], pad).to(self.device)

    def _grad_norm(self) -> float:
        """The global norm of the accumulated gradient, before clipping; collective under ZeRO."""
        if self.zero_stage == 0:
            return _grad_norm(self.model)
        from deepspeed.utils import safe_get_full_grad

        # each parameter's full gradient is assembled from its partitions, one at a time
        sq = sum(float(g.float().pow(2).sum()) for g in map(safe_get_full_grad, self.model.parameters()) if g is not None)
        return sq ** 0.5

    def train_step(self) -> dict[str, float]:
        """Rollout -> reward -> batch rule -> update(s) -> weights to the engine; returns metrics."""
        cfg = self.cfg
        rule = cfg.algorithm.batch_rule(self.step)
        t0 = time.perf_counter()
        # each mini-batch (one optimizer update) is split over the ranks, so that every update sees
        # the same global prompts whatever the number of ranks
        mini = cfg.train.mini_batch_prompts or cfg.train.prompts_per_step
        prompts = self.sampler.next_batch(cfg.train.prompts_per_step)
        indices = [i for k in range(0, len(prompts), mini) for i in shard(prompts[k:k + mini], self.rank, self.world)]
        batch = self.train_set.batch(indices)
        n_gen = cfg.rollouts_per_prompt(rule)
        samples = [[] for _ in indices]
        if n_gen:
            samples = self.rollout.generate(
                batch.prompt_ids, n=n_gen, max_new_tokens=cfg.data.max_response_length,
                temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                stop_token_ids=self.stop_token_ids, seed=_seed(cfg.train.seed, self.step, self.rank),
            )
        self.rollout.sleep()  # hand the engine's memory to training
        t1 = time.perf_counter()
        texts = [self.tokenizer.decode(s.token_ids, skip_special_tokens=True) for group in samples for s in group]
        truths = [gt for gt, group in zip(batch.ground_truths, samples) for _ in group]
        scores = self.rewards.score(texts, truths)
        rewards = torch.as_tensor(scores.rewards, dtype=torch.float32).reshape(len(indices), n_gen)
        undecided = scores.undecided
        demo_rewards = None
        if rule == "luffy":
            demo_texts = [self.tokenizer.decode(d or [], skip_special_tokens=True) for d in batch.demo_ids]
            demo_scores = self.rewards.score(demo_texts, batch.ground_truths)
            demo_rewards = torch.as_tensor(demo_scores.rewards, dtype=torch.float32)
            undecided += demo_scores.undecided
        rows = self._rows(rule, batch, samples, rewards, demo_rewards)
        t2 = time.perf_counter()

        per_update = (cfg.train.mini_batch_prompts or cfg.train.prompts_per_step) // self.world
        batches = [self._micro_batches([r for r in rows if start <= r.prompt_index < start + per_update])
                   for start in range(0, len(indices), per_update)]
        # the training forward passes' own draws (dropout) also come from (seed, step, rank), so a
        # resumed run draws what the uninterrupted one would have
        torch.manual_seed(_seed(cfg.train.seed, "train", self.step, self.rank))
        olds = self._old_logp(batches)
        stats, skipped_before = StepStats(self.device), self.skipped
        updates = [u for mbs, old in zip(batches, olds) if (u := self._update(rule, mbs, old, stats)) is not None]
        t3 = time.perf_counter()
        if self.skipped - skipped_before < len(updates):  # the weights changed (skips agree across ranks)
            self.rollout.update_weights()
        t4 = time.perf_counter()
        self.step += 1

        sums = _all_sum([
            float(rewards.sum()), float(rewards.numel()),
            sum(1.0 for r in rows if r.off_policy), float(len(indices)),
            float(sum(len(s.token_ids) for g in samples for s in g)),
            float(sum(len(r.response_ids) for r in rows)),
            float(undecided),
        ], self.device)
        metrics = {
            "step": self.step,
            "rule": rule,
            "sft_fraction": sums[2] / max(sums[3], 1.0),
            "train_tokens": sums[5],
            "skipped_steps": self.skipped,
            "lr": self.scheduler.get_last_lr()[0],  # with no update: the next one's
            "time_rollout": t1 - t0,
            "time_reward": t2 - t1,
            "time_train": t3 - t2,
            "time_weight_update": t4 - t3,
            "tokens_per_s": (sums[4] + sums[5]) / max(t4 - t0, 1e-9),
        }
        if sums[1]:  # rollout statistics only where there were rollouts (not on SFT steps)
            metrics.update(reward_mean=sums[0] / sums[1], response_length=sums[4] / sums[1], reward_undecided=sums[6])
        for key in ("loss", "grad_norm", "lr"):
            if updates:
                metrics[key] = sum(u[key] for u in updates) / len(updates)
        for key, value in stats.result(max(len(updates), 1)).items():
            # the estimator's stats are per row or token of the batch; where a name is taken by a step
            # metric (sft_fraction: prompts trained on a demonstration) the row-level one is logged as batch_<name>
            metrics[f"batch_{key}" if key in metrics else key] = value
        return metrics

    # ---- evaluation and the run ----------------------------------------------------------------

    def validate(self) -> dict[str, float]:
        """avg@n and pass@n per validation set, over all ranks."""
        v = self.cfg.validation
        out = {}
        for vs in self.val_sets:
            # every problem once over the ranks; each rank generates as many prompts (lockstep under
            # ZeRO-3 and in vLLM's tensor-parallel groups), the padding repeats problem 0 unscored
            per = -(-len(vs) // self.world)
            mine = list(range(self.rank * per, min((self.rank + 1) * per, len(vs))))
            batch = vs.batch(mine + [0] * (per - len(mine)))
            samples = self.rollout.generate(
                batch.prompt_ids, n=v.n, max_new_tokens=self.cfg.data.max_response_length,
                temperature=v.temperature, top_p=v.top_p if v.temperature > 0 else 1.0,
                stop_token_ids=self.stop_token_ids, seed=_seed(self.cfg.train.seed, "val", self.rank),
                logprobs_needed=False,
            )
            self.rollout.sleep()
            samples = samples[: len(mine)]
            texts = [self.tokenizer.decode(s.token_ids, skip_special_tokens=True) for g in samples for s in g]
            truths = [gt for gt, g in zip(batch.ground_truths, samples) for _ in g]
            r = torch.as_tensor(self.rewards.score(texts, truths).rewards).reshape(len(mine), v.n)
            correct, passed, count = _all_sum([float(r.sum()), float((r > 0).any(1).sum()), float(len(mine))], self.device)
            out[f"val/{vs.name}/avg@{v.n}"] = correct / max(count * v.n, 1)
            out[f"val/{vs.name}/pass@{v.n}"] = passed / max(count, 1)
        return out

    def fit(self) -> dict[str, float]:
        """Train to ``train.total_steps`` (validating and checkpointing on schedule); returns the last metrics."""
        cfg = self.cfg
        last: dict[str, float] = {}
        every = cfg.validation.every
        if every and self.step == 0:
            self.metrics.log({"step": 0, **self.validate()})
        with self.metrics.progress(total=cfg.train.total_steps, initial=self.step) as bar:
            while self.step < cfg.train.total_steps:
                last = self.train_step()
                if every and (self.step % every == 0 or self.step == cfg.train.total_steps):
                    last.update(self.validate())
                self.metrics.log(last)
                bar.update(last)
                k = cfg.train.checkpoint_every
                if (k and self.step % k == 0) or self.step == cfg.train.total_steps:
                    self.save()
        return last

    def close(self) -> None:
        self.rewards.close()
        self.metrics.close()


def _grad_norm(model: torch.nn.Module) -> float:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    # each norm summed and returned in float32: a bf16 norm carries 3 significant digits, too few
    # for skip_grad_norm_above's comparison and for the log
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads])
    return float(torch.linalg.vector_norm(norms))


def leave_process_group() -> None:
    """Destroy the default process group, for a program about to exit after its run ended
    normally (``python -m hpt_fast.train``). Left to the interpreter's exit, gloo's worker threads
    can outlive it and abort the process ("terminate called without an active exception",
    pytorch#190489; once in a 2-rank CI run here), and NCCL warns. Not after an error, when another
    rank may still be inside a collective the destruction would wait on; and not inside ``main``,
    whose caller may run another trainer in the group (DeepSpeed keeps its sub-groups of it).
    """
    if dist.is_initialized():
        dist.destroy_process_group()


def _all_max(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)
