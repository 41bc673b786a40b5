"""A stand-in for the ``vllm`` package (0.33), for testing VLLMEngine where vLLM cannot run.

It mirrors the signatures and defaults of the real objects VLLMEngine uses (read from the vllm
0.33.0 wheel: ``vllm/entrypoints/llm.py``, ``sampling_params.py``, ``outputs.py``, ``logprobs.py``,
``engine/arg_utils.py``), and the behaviour the engine relies on:
- ``LLM(**kwargs)`` passes unknown keywords to ``EngineArgs``, which rejects names it lacks;
- ``sleep(level)`` pauses scheduling and, from level 1, frees the KV cache and offloads (1) or
  discards (2) the weights; ``wake_up(tags)`` restores the memory tags given (None: all) and
  resumes scheduling once all memory is back, returning whether it is; generating while paused fails;
- the model is reachable in-process as ``llm.llm_engine.model_executor.driver_worker.model_runner.model``
  and takes Hugging Face-named tensors through ``load_weights``.

Every call is appended to ``LLM.events`` as a tuple, so tests can check the order; generating from
dummy or discarded weights raises (vLLM would silently produce garbage). Generation is
not a model: completion j of a prompt is ``(prompt[-1] + j + k) % FAKE_VOCAB`` at step k, each with
log-prob ``-0.25 * (k + 1)``, ending at a stop token (kept) or after ``max_tokens``.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Optional, Sequence, TypedDict

import torch

FAKE_VOCAB = 50
MEMORY_TAGS = ("weights", "kv_cache")

# the EngineArgs fields a caller may pass through LLM(**kwargs), with vLLM 0.33's defaults
ENGINE_ARGS_DEFAULTS: dict[str, Any] = {
    "enable_sleep_mode": False,
    "load_format": "auto",
    "logprobs_mode": "raw_logprobs",
    "distributed_executor_backend": None,
    "max_model_len": None,
    "max_num_seqs": None,
    "enable_prefix_caching": None,
}
LOGPROBS_MODES = ("raw_logits", "raw_logprobs", "processed_logits", "processed_logprobs")
EXECUTOR_BACKENDS = ("ray", "mp", "uni", "external_launcher")


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]


@dataclass
class Logprob:
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: Sequence[int]
    cumulative_logprob: Optional[float]
    logprobs: Optional[list[dict[int, Logprob]]]
    routed_experts: Any = None
    finish_reason: Optional[str] = None
    stop_reason: Any = None


class RequestOutput:
    def __init__(self, request_id: str, prompt: Optional[str], prompt_token_ids: Optional[list[int]],
                 prompt_logprobs: Any, outputs: list[CompletionOutput], finished: bool, **kwargs: Any):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.prompt_logprobs = prompt_logprobs
        self.outputs = outputs
        self.finished = finished


@dataclass(kw_only=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    detokenize: bool = True


class FakeModel:
    """vLLM's model as the worker holds it: ``load_weights`` copies each (HF name, tensor) pulled."""

    def __init__(self, events: list):
        self.events = events
        self.weights: dict[str, torch.Tensor] = {}
        self.garbage = True  # dummy weights until loaded

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = set()
        for name, tensor in weights:
            self.events.append(("load_weights", name, tensor.dtype))
            self.weights[name] = tensor.clone()
            loaded.add(name)
        self.garbage = False
        return loaded


class LLM:
    def __init__(
        self,
        model: str,
        *,
        skip_tokenizer_init: bool = False,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        seed: int = 0,
        gpu_memory_utilization: float = 0.92,
        enforce_eager: bool = False,
        kv_cache_memory_bytes: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        unknown = set(kwargs) - set(ENGINE_ARGS_DEFAULTS)
        if unknown:
            raise TypeError(f"EngineArgs.__init__() got unexpected keyword arguments {sorted(unknown)}")
        engine_args = {**ENGINE_ARGS_DEFAULTS, **kwargs}
        if engine_args["logprobs_mode"] not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode {engine_args['logprobs_mode']!r}")
        backend = engine_args["distributed_executor_backend"]
        if backend is not None and backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend {backend!r}")
        self.init_kwargs = dict(
            model=model, skip_tokenizer_init=skip_tokenizer_init, tensor_parallel_size=tensor_parallel_size,
            dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
            kv_cache_memory_bytes=kv_cache_memory_bytes, **engine_args,
        )
        self.events: list[tuple] = [("init",)]
        self.sleeping: set[str] = set()
        self.paused = False
        self.model = FakeModel(self.events)
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(
            model_runner=SimpleNamespace(model=self.model))))

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        if not self.init_kwargs["enable_sleep_mode"]:
            raise ValueError("Sleep mode is not enabled")
        self.events.append(("sleep", level))
        self.paused = True
        if level >= 1:
            self.sleeping = set(MEMORY_TAGS)
        if level == 2:
            self.model.garbage = True

    def wake_up(self, tags: Optional[list[str]] = None) -> bool:
        if tags is not None and not set(tags) <= {*MEMORY_TAGS, "scheduling"}:
            raise ValueError(f"tags {tags}")
        self.events.append(("wake_up", None if tags is None else tuple(tags)))
        memory = MEMORY_TAGS if tags is None else [t for t in tags if t != "scheduling"]
        self.sleeping -= set(memory)
        if not self.sleeping:
            self.paused = False
        return not self.sleeping

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self.events.append(("reset_prefix_cache",))
        return True

    def generate(
        self,
        prompts: Any,
        sampling_params: Optional[SamplingParams] = None,
        *,
        use_tqdm: bool | Callable[..., Any] = True,
        lora_request: Any = None,
        priority: Any = None,
        tokenization_kwargs: Optional[dict[str, Any]] = None,
        mm_processor_kwargs: Optional[dict[str, Any]] = None,
    ) -> list[RequestOutput]:
        if self.paused:
            raise RuntimeError(f"generate while the scheduler is paused ({sorted(self.sleeping)} asleep)")
        if self.model.garbage:
            # real vLLM would generate from dummy weights without a word: a tripwire for the engine
            raise RuntimeError("generate with dummy or discarded weights")
        params = sampling_params or SamplingParams()
        self.events.append(("generate", len(prompts), params))
        stops = set(params.stop_token_ids or ())
        outputs = []
        for i, prompt in enumerate(prompts):
            ids = prompt["prompt_token_ids"]
            completions = []
            for j in range(params.n):
                tokens, logprobs, reason = [], [], "length"
                for k in range(params.max_tokens):
                    token = (ids[-1] + j + k) % FAKE_VOCAB
                    tokens.append(token)
                    logprobs.append({token: Logprob(-0.25 * (k + 1), rank=1)})
                    if token in stops:
                        reason = "stop"
                        break
                completions.append(CompletionOutput(j, "", tokens, None, logprobs, finish_reason=reason))
            outputs.append(RequestOutput(str(i), None, ids, None, completions, True))
        return outputs

