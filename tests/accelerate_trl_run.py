"""A few steps of a real TRL trainer on a tiny Qwen2, launched the way users launch TRL: by
``accelerate launch`` with a DeepSpeed ZeRO-3 config file, on two CPU ranks (accelerate runs FSDP
only on accelerators):

    accelerate launch --config_file CONFIG THIS {GRPO,DPO} {patched,trl} MODEL_DIR OUT_DIR

``patched`` trains with hpt_fast's op behind TRL's fused LM head (``patch_trl_fused_head``),
``trl`` with TRL's own head; MODEL_DIR holds the tiny model (``save_tiny_model``). Each rank saves
to OUT_DIR/rank_R.pt the first step's full gradients (reduced over the ranks; read just before the
DeepSpeed engine's step, which runs inside accelerate's backward), every step's logged
metrics, how many calls the op served, and whether the head was partitioned at each step's
start, for tests/test_trl_head.py to compare.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path

import torch
import trl
from datasets import Dataset
from transformers import Qwen2Config, Qwen2ForCausalLM, Trainer, TrainerCallback

import hpt_fast.trl_head as trl_head
from hpt_fast import zero3
from hpt_fast.toy import build_tokenizer

STEPS = 3


def _reward(prompts, completions, **kwargs):
    return [float(sum(map(ord, c)) % 3) for c in completions]


def save_tiny_model(model_dir: Path) -> None:
    """The policy both runs and every rank load, as users pass TRL a model's name: a two-layer
    Qwen2 with random weights and the project's tokenizer."""
    tok = build_tokenizer()
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)).save_pretrained(model_dir)


def _trainer(kind: str, model_dir: Path, out_dir: Path) -> Trainer:
    common = dict(output_dir=str(out_dir / "run"), report_to="none", use_cpu=True, max_steps=STEPS, seed=0,
                  save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
                  per_device_train_batch_size=4, learning_rate=1e-2, max_grad_norm=0.0)
    if kind == "GRPO":
        args = trl.GRPOConfig(num_generations=4, max_completion_length=8, beta=0.04, temperature=0.9, top_k=0,
                              remove_unused_columns=False, **common)
        rows = [{"prompt": f"{i}+{i}="} for i in range(8)]
    else:
        args = trl.DPOConfig(max_length=32, **common)
        rows = [{"prompt": f"{i} + {i} =", "chosen": f" {2 * i}", "rejected": f" {2 * i + 1}"} for i in range(16)]
    # by name: TRL loads the policy, and the reference model (GRPO's with beta > 0, DPO's) from
    # it, each prepared for the config file's sharding (under ZeRO-3, built partitioned)
    extra = {"reward_funcs": [_reward]} if kind == "GRPO" else {}
    return getattr(trl, f"{kind}Trainer")(model=str(model_dir), args=args, processing_class=build_tokenizer(),
                                          train_dataset=Dataset.from_list(rows), **extra)


class _Record(TrainerCallback):
    """The first step's full gradients, each step's logs, and whether the head was partitioned."""

    def __init__(self, trainer):
        self.trainer, self.grads, self.logs, self.released = trainer, {}, [], []

    def on_train_begin(self, args, state, control, **kwargs):
        from deepspeed.utils import safe_get_full_grad

        if not self.trainer.is_deepspeed_enabled:
            raise RuntimeError("launch with a DeepSpeed config file: accelerate runs no DeepSpeed here")
        engine = self.trainer.model_wrapped
        step = engine.step

        def recorded_step(*a, **k):
            if not self.grads:  # a collective: every rank reads every gradient
                self.grads = {name: safe_get_full_grad(p).detach().clone()
                              for name, p in self.trainer.model.named_parameters()}
            return step(*a, **k)

        engine.step = recorded_step

    def on_step_begin(self, args, state, control, **kwargs):
        self.released.append(zero3.is_released(self.trainer.model.lm_head.weight))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.logs.append(dict(logs))


def main(kind: str, mode: str, model_dir: Path, out_dir: Path) -> None:
    trainer = _trainer(kind, model_dir, out_dir)
    record = _Record(trainer)
    trainer.add_callback(record)
    op, calls = trl_head.fused_token_logprobs, []

    def counted_op(*args, **kwargs):
        calls.append(kwargs.get("return_entropy", False))
        return op(*args, **kwargs)

    trl_head.fused_token_logprobs = counted_op
    try:
        with (trl_head.patch_trl_fused_head() if mode == "patched" else contextlib.nullcontext()):
            with warnings.catch_warnings():
                warnings.filterwarnings("error", message="hpt_fast's TRL head")  # no call falls back
                trainer.train()
    finally:
        trl_head.fused_token_logprobs = op
    rank = trainer.accelerator.process_index
    torch.save({"grads": record.grads, "logs": record.logs, "released": record.released, "op_calls": calls,
                "world": trainer.accelerator.num_processes}, out_dir / f"rank_{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
