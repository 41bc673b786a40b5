"""One typed config for a training run: dataclasses, loaded from YAML, overridden with ``key=value``.

``Config()`` is the embedded default, the toy HPT run (``configs/toy.yaml`` holds the same values).
``load_config(path, overrides)`` reads a YAML file over those defaults, applies command-line
overrides such as ``rollout.n=4`` or ``optim.lr=1e-5`` (dotted keys, values parsed by the field's
type), and validates the result; ``dump_config`` writes the resolved config back as YAML (the
trainer saves it in the run directory).

YAML files:
- sections and keys are those of the dataclasses below; an unknown key, a value of the wrong type
  or out of range is a ``ConfigError`` naming the dotted key (with close matches for a misspelling);
- a top-level ``base: other.yaml`` (a path relative to the file) loads that file first, then this
  one over it: sections merge key by key, every other value (lists, ``estimator_hparams``) is
  replaced whole;
- YAML 1.1 reads ``5e-6`` as a string: a string given for a float or int field is parsed as a number.

Override values: ``null`` / ``none`` set an optional field to None; lists take ``[a, b]`` or
``a,b``; ``algorithm.estimator_hparams`` takes a YAML mapping (``{clip_high: 0.28}``) or single
keys (``algorithm.estimator_hparams.clip_high=0.28``).

The value ``"toy"`` (``TOY``) of ``model.path``, of an entry of ``data.train_files`` or of
``validation.files`` stands for the embedded toy task's model, training file or validation files
(``hpt_fast.toy.use_toy`` builds them and puts in the real paths).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import torch
import yaml

from hpt_fast.estimator import PRESETS, Estimator, get_estimator
from hpt_fast.hpt import SFTThenRL

TOY = "toy"

Method = Literal["hpt", "grpo", "sft", "sft_then_rl", "luffy", "srft"]
# the batch rules of hpt_fast.hpt: hpt -> assemble_hpt_rows, rl -> assemble_rl_rows,
# sft -> assemble_sft_rows, luffy -> assemble_luffy_rows
BatchRule = Literal["hpt", "rl", "sft", "luffy"]
# each method's batch rules (sft_then_rl: "sft", then "rl") and the default preset of its RL or mixed rule
_METHOD_RULES = {
    "hpt": ("hpt",), "grpo": ("rl",), "sft": ("sft",), "sft_then_rl": ("sft", "rl"), "luffy": ("luffy",),
    "srft": ("luffy",),
}
_METHOD_PRESET = {"hpt": "hpt", "grpo": "grpo", "sft": "sft", "sft_then_rl": "grpo", "luffy": "luffy", "srft": "srft"}


def rl_advantage_kind(preset: str) -> str:
    """The ``compute_advantages`` kind of the "rl" rule's rollout rows under ``preset``: the
    preset's own, except ppo's per-token GAE (there is no value model), which takes grpo's."""
    kind = PRESETS[preset].advantage
    return "grpo" if kind == "gae" else kind


# the temperatures vLLM samples at as asked (hpt_fast.rollout.vllm): its SamplingParams refuses
# more than 2 and raises (0, 0.01) to 0.01, where its log-probs would belong to another temperature
VLLM_TEMPERATURE_RANGE = (0.01, 2.0)


class ConfigError(ValueError):
    """A bad config: unknown key, wrong type or out-of-range value; the message starts with the key."""


@dataclass
class ModelConfig:
    """The policy model.

    Attributes:
        path: a Hugging Face model directory or hub name, or "toy".
        tokenizer: the tokenizer's directory or name; None: the model's.
        trust_remote_code: let transformers run code shipped with the model (off unless set).
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        liger_kernels: Liger's RMSNorm / SwiGLU / RoPE kernels, applied on CUDA only.
    """

    path: str = TOY
    tokenizer: Optional[str] = None
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    liger_kernels: bool = False


@dataclass
class DataConfig:
    """Training data (openr1 parquet schema, see hpt_fast.data) and length limits.

    Attributes:
        train_files: parquet files, concatenated.
        max_prompt_length: prompts longer than this (in tokens, chat template included) are dropped.
        max_response_length: the rollout length limit; demonstrations are truncated to it (EOS
            included; shorter where the prompt leaves less of the model's context), and it is the
            L of the ``token-sum-norm`` aggregation.
        prompt_template: None: the tokenizer's chat template (with the generation prompt); else a
            plain-text template with ``{prompt}``, filled with the last message's content (the
            LLaMA base-model runs), encoded with the tokenizer's BOS unless it starts with that
            text itself.
        prompt_suffix: appended to every user message (e.g. an instruction to box the answer).
        shuffle: shuffle the prompts each epoch (by train.seed and the epoch).
    """

    train_files: list[str] = field(default_factory=lambda: [TOY])
    max_prompt_length: int = 64
    max_response_length: int = 64
    prompt_template: Optional[str] = None
    prompt_suffix: str = ""
    shuffle: bool = True


@dataclass
class VLLMConfig:
    """Settings of the in-process vLLM engine (rollout.engine = "vllm"; hpt_fast.rollout.VLLMEngine).

    The engine always runs with sleep mode and eager execution, reads no weights from disk (the
    trainer streams them in), takes max_model_len = data.max_prompt_length +
    data.max_response_length and its seed from train.seed.

    Attributes:
        tensor_parallel_size: GPUs per engine.
        gpu_memory_utilization: fraction of the card's total memory the engine may take (weights +
            KV cache); that much must be free when it starts.
        kv_cache_memory_bytes: the KV cache size, overriding what gpu_memory_utilization implies.
        dtype: the rollout dtype the weights are cast to as they are streamed.
        sleep_level: 1 keeps a CPU copy of the weights while the trainer runs; 2 drops them.
        enable_prefix_caching: share the KV cache of a prompt across its n samples.
        max_num_seqs: sequences decoded at once; None: vLLM's default.
    """

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.3
    kv_cache_memory_bytes: Optional[int] = None
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    sleep_level: Literal[1, 2] = 1
    enable_prefix_caching: bool = True
    max_num_seqs: Optional[int] = None


@dataclass
class RolloutConfig:
    """Sampling of the training rollouts.

    Attributes:
        engine: "native" (embedded, shares the trainer's module) or "vllm".
        n: samples per prompt. For luffy / srft it is the group size: one demonstration and
            n - 1 sampled rollouts (``Config.rollouts_per_prompt``).
        temperature, top_p: sampling settings.
        old_logprobs: where the "pi_old" presets get log pi_old: "recompute" (a no-grad forward of
            the trainer over the batch, as the HPT code does) or "sampler" (the engine's sampling
            log-probs; only exact with the native engine in float32). Used only when a step makes
            several optimizer updates (train.mini_batch_prompts); with one, the ratio is exactly 1.
        vllm: the vLLM engine's settings.
    """

    engine: Literal["native", "vllm"] = "native"
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    old_logprobs: Literal["recompute", "sampler"] = "sampler"
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class RewardConfig:
    """The answer checks (``hpt_fast.reward.RewardPool``), per rank.

    Attributes:
        num_workers: worker processes running math-verify checks in parallel (the cheap steps
            run in the trainer); each rank has its own.
        timeout_s: the time limit of one check, in seconds; a check past it scores 0, counted as
            ``reward_undecided``.
    """

    num_workers: int = 2
    timeout_s: float = 5.0


@dataclass
class AlgorithmConfig:
    """The training method: batch rule and estimator.

    Attributes:
        method: "hpt", or a baseline: "sft", "grpo", "sft_then_rl" (SFT for sft_steps steps, then
            RL), "luffy", "srft".
        gamma: HPT's gate, a fraction in [0, 1]: a prompt is trained with RL when more than
            gamma * n of its rollouts are correct, else with SFT on its demonstration
            (hpt_fast.hpt). Qwen2.5-Math: 0; LLaMA-3.1-8B (SFT when <= 2 of 8 correct): 0.25.
        sft_steps: sft_then_rl's number of SFT steps.
        estimator: the estimator preset (hpt_fast.PRESETS) of the method's RL or mixed rule; None:
            the method's own (hpt, grpo, sft, grpo, luffy, srft). The SFT phase of sft_then_rl
            always uses "sft".
        estimator_hparams: settings passed to ``hpt_fast.get_estimator`` (clip_low, clip_high,
            loss_agg, sft_agg, rl_coef, sft_coef, shaping_gamma, ...), checked against the preset.
            max_response_length comes from data.max_response_length and entropy_coef from below.
        entropy_coef: the entropy bonus; None: the preset's default (0.001 for the mixed presets).
    """

    method: Method = "hpt"
    gamma: float = 0.0
    sft_steps: int = 0
    estimator: Optional[str] = None
    estimator_hparams: dict[str, Any] = field(default_factory=dict)
    entropy_coef: Optional[float] = None

    @property
    def uses_demonstrations(self) -> bool:
        """Whether any of the method's batch rules trains on demonstrations (the data's ``target``)."""
        return any(rule != "rl" for rule in _METHOD_RULES[self.method])

    def batch_rule(self, step: int) -> BatchRule:
        """The batch rule of training step ``step`` (0-based)."""
        if self.method == "sft_then_rl":
            return SFTThenRL(self.sft_steps).rule(step)
        return _METHOD_RULES[self.method][0]


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule.

    Attributes:
        lr: peak learning rate.
        schedule: after warm-up, "constant", "cosine" (to min_lr_ratio * lr at the last step) or
            "linear" (likewise, in a straight line).
        warmup_steps: linear warm-up from 0 to lr over these optimizer updates (any schedule); a
            training step makes prompts_per_step / mini_batch_prompts updates, and the schedule
            counts updates throughout.
        min_lr_ratio: the final learning rate of "cosine" and "linear", as a fraction of lr.
        weight_decay: AdamW's decoupled weight decay.
        grad_clip: clip the gradient to this global norm; None: no clipping.
        skip_grad_norm_above: skip the optimizer step (and count it) when the pre-clip gradient
            norm exceeds this; None: never (the Qwen2.5-Math-7B HPT run: 80).
    """

    lr: float = 3e-4
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    grad_clip: Optional[float] = 1.0
    skip_grad_norm_above: Optional[float] = None

    def lr_factor(self, step: int, total_steps: int) -> float:
        """Multiplier of lr at optimizer step ``step`` (0-based) of ``total_steps``, in [0, 1]."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        span = max(total_steps - self.warmup_steps - 1, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.schedule == "cosine" else 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * decay


@dataclass
class TrainConfig:
    """The run.

    Attributes:
        total_steps: training steps (one batch of prompts each).
        prompts_per_step: prompts per step, over all ranks.
        mini_batch_prompts: prompts per optimizer update (HPT: 64 of 128, two updates per step);
            None: prompts_per_step. Must divide prompts_per_step.
        seed: seeds the data order, sampling and initialisation.
        output_dir: the run directory (config, metrics, checkpoints).
        checkpoint_every: write a checkpoint every this many steps (and always at the end); 0:
            only at the end.
        keep_checkpoints: keep only the newest this many checkpoints (a 7B run's are about
            106 GB each by arithmetic: bf16 weights, float32 master weights and Adam moments);
            0: keep all.
    """

    total_steps: int = 200
    prompts_per_step: int = 32
    mini_batch_prompts: Optional[int] = None
    seed: int = 0
    output_dir: str = "runs/toy"
    checkpoint_every: int = 0
    keep_checkpoints: int = 0


@dataclass
class ValidationConfig:
    """Held-out evaluation during training (avg@n accuracy per file).

    Attributes:
        files: validation JSON files (hpt_fast.data); one benchmark each.
        every: validate every this many steps (and before the first and after the last); 0: never.
        n: samples per problem.
        temperature: sampling temperature; 0: greedy.
        top_p: nucleus sampling.
    """

    files: list[str] = field(default_factory=lambda: [TOY])
    every: int = 50
    n: int = 4
    temperature: float = 0.6
    top_p: float = 0.95


@dataclass
class DeepSpeedConfig:
    """DeepSpeed settings.

    Attributes:
        zero_stage: ZeRO stage 0-3.
        bf16: train in bfloat16 (float32 master weights).
        micro_batch_tokens: token budget of one micro-batch (prompt + response tokens, padding
            included) per rank. A mini-batch is packed into as many micro-batches as it needs, and
            the gradients of all of them accumulate into one optimizer step: gradient accumulation
            is the number of micro-batches, which varies with the lengths, so it is not a setting.
    """

    zero_stage: Literal[0, 1, 2, 3] = 0
    bf16: bool = False
    micro_batch_tokens: int = 8192


@dataclass
class FusedOpConfig:
    """How the fused lm_head + loss op runs (``hpt_fast.ops``; the README's "The fused op").

    Attributes:
        backend: "auto" (triton on CUDA, cpu elsewhere), "torch", "cpu" or "triton".
        chunk_size: tokens per logits block; None: from the op's memory budget
            (``HPT_FAST_MEMORY_BUDGET_MB`` MiB when set, else 1/12 of the naive float32 logits,
            within 128 MiB - 1 GiB).
        grad_order: "auto", "tokens" or "vocab": the loop order of the op's passes.
        accum_dtype: how a bfloat16 / float16 lm_head gradient is summed over token chunks:
            "float32" (a float32 [V, H] buffer, rounded once) or "inputs" (in the gradient itself,
            as Liger and cut-cross-entropy do: three GEMMs at the memory of one logits block).
    """

    backend: Literal["auto", "torch", "cpu", "triton"] = "auto"
    chunk_size: Optional[int] = None
    grad_order: Literal["auto", "tokens", "vocab"] = "auto"
    accum_dtype: Literal["float32", "inputs"] = "float32"

    def op_kwargs(self) -> dict[str, Any]:
        """These settings as keyword arguments of ``fused_token_logprobs`` / ``fused_linear_loss``
        (and ``FusedUnifiedLoss``)."""
        return dict(
            backend=self.backend, chunk_size=self.chunk_size, grad_order=self.grad_order,
            accum_dtype=torch.float32 if self.accum_dtype == "float32" else None,
        )


@dataclass
class ToyConfig:
    """Where the embedded toy task is built (hpt_fast.toy), when a path is "toy".

    Attributes:
        dir: cache directory; None: $XDG_CACHE_HOME/hpt_fast/toy (default ~/.cache/hpt_fast/toy).
        seed: seed of the toy data and model (independent of train.seed, so runs share one build).
    """

    dir: Optional[str] = None
    seed: int = 0


@dataclass
class Config:
    """A whole run's settings; ``Config()`` is the embedded toy HPT run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    fused_op: FusedOpConfig = field(default_factory=FusedOpConfig)
    toy: ToyConfig = field(default_factory=ToyConfig)

    def rollouts_per_prompt(self, rule: BatchRule) -> int:
        """Rollouts to sample per prompt under ``rule``: 0 for sft, n - 1 for luffy, else n."""
        return {"sft": 0, "luffy": self.rollout.n - 1}.get(rule, self.rollout.n)


# ---- typed values ------------------------------------------------------------------------------


def _is_section(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, [str(c) for c in choices], n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(c) for c in typing.get_args(tp))
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return tp.__name__


def _coerce(key: str, value: Any, tp) -> Any:
    """``value`` (from YAML) as type ``tp``, or ConfigError naming ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is Literal:
        for choice in args:
            if value == choice and type(value) is type(choice):
                return choice
            if isinstance(value, str) and not isinstance(choice, str) and value.strip() == str(choice):
                return choice
        raise ConfigError(
            f"{key}: {value!r} is not one of {', '.join(repr(c) for c in args)}{_suggest(str(value), args)}"
        )
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
    elif tp is float:
        number = value
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                pass
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            if not math.isfinite(number):
                raise ConfigError(f"{key}: must be a finite number, got {value!r}")
            return float(number)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        (item,) = args
        if isinstance(value, list):
            return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _build(cls, data: Any, prefix: str):
    """An instance of dataclass ``cls`` from a YAML mapping (missing keys keep their defaults)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of settings, got {data!r}")
    hints = _hints(cls)
    known = [prefix + k for k in hints]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"{dotted}: unknown key{_suggest(dotted, known)}; known: {', '.join(known)}")
        tp = hints[key]
        kwargs[key] = _build(tp, value, dotted + ".") if _is_section(tp) else _coerce(dotted, value, tp)
    return cls(**kwargs)


# ---- YAML files --------------------------------------------------------------------------------


def _merge(base: dict, over: dict, cls) -> dict:
    """``over`` on top of ``base``: sections merge key by key, other values are replaced."""
    hints = _hints(cls)
    out = dict(base)
    for key, value in over.items():
        tp = hints.get(key)
        if tp is not None and _is_section(tp) and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, tp)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The settings of a YAML file with its ``base`` chain resolved."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"base: {path} includes itself ({' -> '.join(str(p) for p in seen + (path,))})")
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"base: expected a file path, got {base!r} (in {path})")
    return _merge(_read_yaml(path.parent / base, seen + (path,)), data, Config)


# ---- command-line overrides --------------------------------------------------------------------


def _parse_text(key: str, text: str, tp) -> Any:
    """A command-line value for a field of type ``tp``: strings stay as typed, the rest is read
    as YAML (numbers, booleans, null, lists, mappings)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    optional = origin is Union and type(None) in args
    inner = next((a for a in args if a is not type(None)), tp) if optional else tp
    if optional and text.strip().lower() in ("null", "none", "~"):
        return None
    if inner is str or (typing.get_origin(inner) is Literal and all(isinstance(a, str) for a in typing.get_args(inner))):
        return text
    if typing.get_origin(inner) is list:
        if text.strip().startswith("["):
            try:
                return yaml.safe_load(text)
            except yaml.YAMLError as err:
                raise ConfigError(f"{key}: cannot read {text!r} as a list: {err}") from None
        return [part.strip() for part in text.split(",") if part.strip()]
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot read {text!r}: {err}") from None


def apply_override(cfg: Config, override: str) -> None:
    """Set one ``dotted.key=value`` on ``cfg`` in place, the value parsed by the field's type."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected key=value, e.g. rollout.n=4")
    parts = key.split(".")
    obj, prefix = cfg, ""
    for i, name in enumerate(parts):
        hints = _hints(type(obj))
        dotted = prefix + name
        if name not in hints:
            known = [prefix + k for k in hints]
            raise ConfigError(f"{dotted}: unknown key{_suggest(dotted, _all_keys())}; known here: {', '.join(known)}")
        tp = hints[name]
        last = i == len(parts) - 1
        if _is_section(tp):
            if last:
                raise ConfigError(f"{dotted}: is a section; set one of its keys, e.g. {dotted}.{next(iter(_hints(tp)))}=...")
            obj, prefix = getattr(obj, name), dotted + "."
            continue
        if typing.get_origin(tp) is dict and not last:
            sub = ".".join(parts[i + 1 :])
            getattr(obj, name)[sub] = _parse_text(f"{dotted}.{sub}", text, Any)
            return
        if not last:
            raise ConfigError(f"{dotted}: is a setting, not a section; cannot set {key}")
        setattr(obj, name, _coerce(dotted, _parse_text(dotted, text, tp), tp))
        return


def _all_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted setting name."""
    keys = []
    for name, tp in _hints(cls).items():
        keys += _all_keys(tp, f"{prefix}{name}.") if _is_section(tp) else [prefix + name]
    return keys


# ---- validation --------------------------------------------------------------------------------


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _preset_name(alg: AlgorithmConfig) -> str:
    """The preset of the method's RL or mixed rule: ``algorithm.estimator``, else the method's own."""
    return alg.estimator or _METHOD_PRESET[alg.method]


def build_estimators(cfg: Config) -> dict[BatchRule, Estimator]:
    """The estimator of each batch rule ``cfg`` uses: {rule: Estimator}.

    The method's RL or mixed rule gets ``algorithm.estimator`` (default: the method's preset) with
    ``estimator_hparams``, ``entropy_coef`` and, where the preset takes it, max_response_length =
    data.max_response_length; sft_then_rl's SFT phase gets the plain "sft" preset.
    """
    alg = cfg.algorithm
    name = _preset_name(alg)
    if name not in PRESETS:
        raise ConfigError(f"algorithm.estimator: unknown preset {name!r}{_suggest(name, PRESETS)}; known: {', '.join(PRESETS)}")
    for own in ("max_response_length", "entropy_coef"):
        if own in alg.estimator_hparams:
            where = "data.max_response_length" if own == "max_response_length" else "algorithm.entropy_coef"
            raise ConfigError(f"algorithm.estimator_hparams.{own}: set {where} instead")
    hparams = dict(alg.estimator_hparams)
    preset = PRESETS[name]
    if "max_response_length" in preset.accepted:
        hparams["max_response_length"] = cfg.data.max_response_length
    if alg.entropy_coef is not None:
        hparams["entropy_coef"] = alg.entropy_coef
    try:
        main = get_estimator(name, **hparams)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"algorithm.estimator_hparams: {err}") from None
    out: dict[BatchRule, Estimator] = {}
    for rule in _METHOD_RULES[alg.method]:
        est = get_estimator("sft", max_response_length=cfg.data.max_response_length) if (
            alg.method == "sft_then_rl" and rule == "sft"
        ) else main
        _check_rule(rule, est)
        out[rule] = est
    return out


# what each batch rule's rows need of a preset: (the rows, whether the preset takes them)
_RULE_ROWS = {
    "hpt": ("rollout rows and SFT demonstration rows", lambda p: p.rollout is not None and p.sft),
    "rl": ("rollout rows", lambda p: p.rollout is not None),
    "sft": ("SFT demonstration rows", lambda p: p.sft),
    "luffy": ("rollout rows and demonstrations in their group", lambda p: p.rollout is not None and p.demo is not None),
}


def _check_rule(rule: BatchRule, est: Estimator) -> None:
    """The estimator must take the rows its batch rule produces."""
    what, takes = _RULE_ROWS[rule]
    if not takes(est.preset):
        fitting = [name for name, preset in PRESETS.items() if takes(preset)]
        raise ConfigError(
            f"algorithm.estimator: preset {est.name!r} cannot train the {rule!r} batch rule's {what}; "
            f"presets that can: {', '.join(fitting)}"
        )


def _missing_local_dir(value: Optional[str]) -> bool:
    """Whether ``value`` can only mean a local directory (absolute, ``.`` / ``~`` relative, or
    with more slashes than a hub id's one) and there is none: transformers would report it as a
    malformed hub id, after the run has started."""
    if not value:
        return False
    local = value.startswith(("/", ".", "~")) or value.count("/") > 1
    return local and not Path(value).expanduser().is_dir()


# a file every directory save_pretrained writes holds, per what is loaded from it
_SAVED_FILES = {"model": ("config.json",), "tokenizer": ("tokenizer_config.json", "tokenizer.json")}


def local_dir_problem(value: Optional[str], kind: str) -> Optional[str]:
    """What is wrong with ``value`` as a local ``kind`` ("model" / "tokenizer") directory, or None
    (also for a hub id): a directory without the files ``save_pretrained`` writes, such as a run
    directory given for its checkpoint, which transformers would report as a missing library."""
    if not value or not Path(value).expanduser().is_dir():
        return None
    names = _SAVED_FILES[kind]
    if any((Path(value).expanduser() / name).is_file() for name in names):
        return None
    return (f"{value} has no {' or '.join(names)}: not a {kind} directory written by save_pretrained "
            "(a run's checkpoints are its checkpoints/step_N directories)")


def validate(cfg: Config) -> None:
    """Raise ConfigError naming the key of the first bad or inconsistent setting."""
    # types first: a Config built in code can hold anything
    _check_types(cfg, Config, "")
    d, r, a, o, t, v, ds = cfg.data, cfg.rollout, cfg.algorithm, cfg.optim, cfg.train, cfg.validation, cfg.deepspeed
    _require(bool(cfg.model.path), "model.path", "must not be empty")
    for key, value in (("model.path", cfg.model.path), ("model.tokenizer", cfg.model.tokenizer)):
        _require(not _missing_local_dir(value), key,
                 f"no such directory: {value} (a local model directory, or a Hugging Face hub id 'namespace/name')")
    problem = local_dir_problem(cfg.model.path, "model")
    _require(problem is None, "model.path", problem or "")
    problem = local_dir_problem(cfg.model.tokenizer or cfg.model.path, "tokenizer")
    _require(problem is None, "model.tokenizer" if cfg.model.tokenizer else "model.path", problem or "")
    _require(bool(d.train_files), "data.train_files", "needs at least one file")
    for key, value in (
        ("data.max_prompt_length", d.max_prompt_length), ("data.max_response_length", d.max_response_length),
        ("rollout.n", r.n), ("rollout.vllm.tensor_parallel_size", r.vllm.tensor_parallel_size),
        ("train.total_steps", t.total_steps),
        ("train.prompts_per_step", t.prompts_per_step), ("validation.n", v.n),
        ("deepspeed.micro_batch_tokens", ds.micro_batch_tokens), ("reward.num_workers", cfg.reward.num_workers),
    ):
        _require(value >= 1, key, f"must be >= 1, got {value}")
    _require(0 < cfg.reward.timeout_s < math.inf, "reward.timeout_s", f"must be a finite number > 0, got {cfg.reward.timeout_s}")
    for key, value in (
        ("rollout.vllm.max_num_seqs", r.vllm.max_num_seqs), ("rollout.vllm.kv_cache_memory_bytes", r.vllm.kv_cache_memory_bytes),
        ("train.mini_batch_prompts", t.mini_batch_prompts), ("fused_op.chunk_size", cfg.fused_op.chunk_size),
    ):
        _require(value is None or value >= 1, key, f"must be >= 1 or null, got {value}")
    for key, value in (
        ("algorithm.sft_steps", a.sft_steps), ("optim.warmup_steps", o.warmup_steps),
        ("train.checkpoint_every", t.checkpoint_every), ("train.keep_checkpoints", t.keep_checkpoints),
        ("validation.every", v.every), ("train.seed", t.seed), ("toy.seed", cfg.toy.seed),
    ):
        _require(value >= 0, key, f"must be >= 0, got {value}")
    if d.prompt_template is not None:
        _require("{prompt}" in d.prompt_template, "data.prompt_template", "must contain {prompt}")
    _require(r.temperature > 0, "rollout.temperature", f"must be > 0, got {r.temperature}")
    _require(v.temperature >= 0, "validation.temperature", f"must be >= 0 (0: greedy), got {v.temperature}")
    for key, value in (("rollout.top_p", r.top_p), ("validation.top_p", v.top_p)):
        _require(0 < value <= 1, key, f"must be in (0, 1], got {value}")
    _require(0 < r.vllm.gpu_memory_utilization <= 1, "rollout.vllm.gpu_memory_utilization",
             f"must be in (0, 1], got {r.vllm.gpu_memory_utilization}")
    _require(0 <= a.gamma <= 1, "algorithm.gamma", f"must be a fraction in [0, 1] (SFT when at most k of n correct: k / n), got {a.gamma}")
    if a.method == "sft_then_rl":
        _require(a.sft_steps >= 1, "algorithm.sft_steps", "sft_then_rl needs at least one SFT step")
    # a centred advantage of a group of one rollout is 0: RL would learn nothing
    preset = _preset_name(a)
    centred = [rule for rule in _METHOD_RULES[a.method]
               if rule == "hpt" or (rule == "rl" and preset in PRESETS and rl_advantage_kind(preset) != "reinforce")]
    if centred:
        _require(r.n >= 2, "rollout.n", f"{a.method}'s rollout advantages are centred on each prompt's group of n "
                 f"rollouts, so with n = 1 every advantage is 0 and RL learns nothing: needs n >= 2"
                 f"{'' if 'hpt' in centred else ' (or algorithm.estimator=reinforce)'}, got {r.n}")
    if a.method in ("luffy", "srft"):
        _require(r.n >= 2, "rollout.n", f"{a.method} groups 1 demonstration with n - 1 rollouts: needs n >= 2, got {r.n}")
    _require(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _require(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    for key, value in (("optim.grad_clip", o.grad_clip), ("optim.skip_grad_norm_above", o.skip_grad_norm_above)):
        _require(value is None or value > 0, key, f"must be > 0 or null, got {value}")
    mini = t.mini_batch_prompts
    _require(mini is None or t.prompts_per_step % mini == 0, "train.mini_batch_prompts",
             f"must divide train.prompts_per_step = {t.prompts_per_step}, got {mini}")
    longest = d.max_prompt_length + d.max_response_length
    _require(ds.micro_batch_tokens >= longest, "deepspeed.micro_batch_tokens",
             f"must hold one whole sequence, max_prompt_length + max_response_length = {longest}, got {ds.micro_batch_tokens}")
    if r.engine == "vllm":
        _require(r.top_p == 1.0, "rollout.top_p", "must be 1.0 with the vLLM engine: with top-p it returns the "
                 "log-probs of the truncated distribution, not of the policy")
        low, high = VLLM_TEMPERATURE_RANGE
        for key, value, greedy in (("rollout.temperature", r.temperature, False),
                                   ("validation.temperature", v.temperature, True)):
            _require((greedy and value == 0) or low <= value <= high, key,
                     f"must be in [{low}, {high}]{' or 0' if greedy else ''} with the vLLM engine (vLLM refuses "
                     f"more and raises less to {low}), got {value}")
    several_updates = t.mini_batch_prompts is not None and t.mini_batch_prompts < t.prompts_per_step
    if r.old_logprobs == "sampler" and several_updates:  # with one update per step they are not used
        _require(r.engine == "native" and not ds.bf16, "rollout.old_logprobs",
                 "'sampler' log-probs equal the trainer's only with the native engine in float32 "
                 f"(rollout.engine = {r.engine!r}, deepspeed.bf16 = {ds.bf16}); use 'recompute'")
    if v.every > 0:
        _require(bool(v.files), "validation.files", "is empty but validation.every > 0; add files or set every=0")
    build_estimators(cfg)


def _check_types(obj, cls, prefix: str) -> None:
    for name, tp in _hints(cls).items():
        value = getattr(obj, name)
        if _is_section(tp):
            if not isinstance(value, tp):
                raise ConfigError(f"{prefix}{name}: expected a {tp.__name__} section, got {type(value).__name__}")
            _check_types(value, tp, f"{prefix}{name}.")
        else:
            setattr(obj, name, _coerce(prefix + name, value, tp))


# ---- entry points ------------------------------------------------------------------------------


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> Config:
    """The defaults, then the YAML file ``path`` (if given), then the ``key=value`` overrides; validated."""
    cfg = _build(Config, _read_yaml(Path(path)), "") if path is not None else Config()
    for override in overrides:
        apply_override(cfg, override)
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """The config as plain nested dicts and lists (what ``dump_config`` writes)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: Union[str, Path]) -> None:
    """Write the resolved config as YAML; ``load_config(path)`` reads back an equal config."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True))
