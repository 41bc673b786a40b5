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
not a model: completion j of a prompt is ``(prompt[-1] + s + k) % FAKE_VOCAB`` at step k, where s
is the sample's seed (vLLM's: the request's seed + j; j when unseeded), each with log-prob
``-0.25 * (k + 1)``, ending at a stop token (kept), after ``max_tokens``, or when prompt and
completion fill ``max_model_len`` (vLLM's ``check_stop``; the default is the model directory's
``max_position_embeddings``, unbounded for a hub id); a prompt that fills it is refused with vLLM's
error, and so is greedy sampling (temperature 0) with ``n`` > 1, as vLLM's ``SamplingParams`` does.
``sampling_params`` may be one ``SamplingParams`` for every prompt or a list with one per prompt,
as in vLLM.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Optional, Sequence, TypedDict

import torch

FAKE_VOCAB = 50


class VLLMValidationError(Exception):
    """vllm.exceptions.VLLMValidationError (a VLLMClientError, not a ValueError): a refused request."""

MEMORY_TAGS = ("weights", "kv_cache")

# the EngineArgs fields the fake acts on, with vLLM 0.33's defaults
ENGINE_ARGS_DEFAULTS: dict[str, Any] = {
    "enable_sleep_mode": False,
    "load_format": "auto",
    "logprobs_mode": "raw_logprobs",
    "distributed_executor_backend": None,
    "max_model_len": None,
    "max_num_seqs": None,
    "enable_prefix_caching": None,
}
# every field of vLLM 0.33's EngineArgs (vllm/engine/arg_utils.py): the keywords LLM(**kwargs) accepts
ENGINE_ARGS_FIELDS = frozenset((
    "model", "enable_return_routed_experts", "return_sampling_mask", "model_weights",
    "served_model_name", "tokenizer", "hf_config_path", "runner", "convert", "skip_tokenizer_init",
    "enable_prompt_embeds", "tokenizer_mode", "trust_remote_code", "allowed_local_media_path",
    "allowed_media_domains", "download_dir", "safetensors_load_strategy",
    "safetensors_prefetch_num_threads", "safetensors_prefetch_block_size", "load_format",
    "config_format", "dtype", "kv_cache_dtype", "seed", "max_model_len", "cudagraph_capture_sizes",
    "max_cudagraph_capture_size", "ir_op_priority", "distributed_executor_backend",
    "pipeline_parallel_size", "master_addr", "master_port", "nnodes", "node_rank",
    "distributed_timeout_seconds", "cpu_distributed_timeout_seconds", "numa_bind", "numa_bind_nodes",
    "numa_bind_cpus", "device_ids", "tensor_parallel_size", "prefill_context_parallel_size",
    "decode_context_parallel_size", "dcp_comm_backend", "dcp_q_replicate",
    "dcp_kv_cache_interleave_size", "cp_kv_cache_interleave_size", "data_parallel_size",
    "data_parallel_rank", "data_parallel_start_rank", "data_parallel_size_local",
    "data_parallel_address", "data_parallel_rpc_port", "data_parallel_hybrid_lb",
    "data_parallel_external_lb", "data_parallel_multi_port_external_lb", "data_parallel_backend",
    "enable_hc_sp", "enable_expert_parallel", "enable_batch_sharded_sampling",
    "enable_ep_weight_filter", "moe_backend", "linear_backend", "sparse_indexer_topk_backend",
    "all2all_backend", "enable_elastic_ep", "elastic_ep_max_dp_size", "enable_dbo", "ubatch_size",
    "dbo_decode_token_threshold", "dp_sync_interval", "dbo_prefill_token_threshold",
    "disable_nccl_for_dp_synchronization", "eplb_config", "enable_eplb", "expert_placement_strategy",
    "_api_process_count", "_api_process_rank", "max_parallel_loading_workers", "block_size",
    "enable_prefix_caching", "prefix_caching_hash_algo", "prefix_cache_retention_interval",
    "disable_sliding_window", "disable_cascade_attn", "offload_backend", "cpu_offload_gb",
    "cpu_offload_params", "offload_group_size", "offload_num_in_group", "offload_prefetch_step",
    "offload_params", "gpu_memory_utilization", "kv_cache_memory_bytes", "max_num_batched_tokens",
    "max_num_scheduled_tokens", "long_prefill_token_threshold", "long_prefill_token_threshold_adaptive",
    "max_num_seqs", "max_num_active_seqs", "max_num_queued_reqs", "max_num_queued_tokens",
    "max_logprobs", "logprobs_mode", "use_fp64_gumbel", "enable_trace_replay", "disable_log_stats",
    "aggregate_engine_logging", "revision", "code_revision", "hf_token", "hf_overrides",
    "model_class_overrides", "tokenizer_revision", "quantization", "quantization_config",
    "allow_deprecated_quantization", "enforce_eager", "disable_custom_all_reduce",
    "enable_shm_tensor_arena", "language_model_only", "limit_mm_per_prompt", "enable_mm_embeds",
    "interleave_mm_strings", "media_io_kwargs", "mm_processor_kwargs", "mm_processor_cache_gb",
    "mm_processor_cache_type", "mm_hasher_algorithm", "mm_shm_cache_max_object_size_mb",
    "mm_encoder_only", "mm_encoder_tp_mode", "mm_encoder_attn_backend", "mm_encoder_attn_dtype",
    "mm_encoder_fp8_scale_path", "mm_encoder_fp8_scale_save_path", "mm_encoder_fp8_scale_save_margin",
    "io_processor_plugin", "renderer_num_workers", "skip_mm_profiling", "video_pruning_rate",
    "video_pruning_method", "mm_tensor_ipc", "mm_processor_device", "mm_ipc_gpu_memory_gb",
    "mm_device_do_normalize", "enable_lora", "max_loras", "max_lora_rank", "default_mm_loras",
    "fully_sharded_loras", "max_cpu_loras", "lora_dtype", "lora_target_modules",
    "enable_tower_connector_lora", "specialize_active_lora", "enable_mixed_moe_lora_format",
    "enable_moe_shared_loras", "max_lora_cls_labels", "ray_workers_use_nsight",
    "num_gpu_blocks_override", "model_loader_extra_config", "ignore_patterns", "enable_chunked_prefill",
    "disable_chunked_mm_input", "scheduler_reserve_full_isl", "prefill_schedule_interval", "watermark",
    "disable_hybrid_kv_cache_manager", "structured_outputs_config", "aux_output_config",
    "reasoning_parser", "reasoning_parser_plugin", "speculative_config", "spec_method", "spec_model",
    "spec_tokens", "watermark_config", "diffusion_config", "show_hidden_metrics_for_version",
    "otlp_traces_endpoint", "collect_detailed_traces", "per_request_spec_decode_metrics",
    "kv_cache_metrics", "kv_cache_metrics_sample", "custom_histogram_buckets", "cudagraph_metrics",
    "enable_layerwise_nvtx_tracing", "enable_mfu_metrics", "enable_logging_iteration_details",
    "jit_monitor_mode", "jit_monitor_verbose", "enable_mm_processor_stats", "scheduling_policy",
    "scheduler_cls", "pooler_config", "compilation_config", "attention_config", "engram_config",
    "mamba_config", "kernel_config", "enable_flashinfer_autotune", "monokernel", "worker_cls",
    "worker_extension_cls", "profiler_config", "logging_config", "log_level", "log_config_file",
    "kv_transfer_config", "kv_events_config", "ec_transfer_config", "ec_manager_config",
    "reasoning_config", "generation_config", "enable_sleep_mode", "sleep_mode_backend",
    "sleep_mode_offload_cudagraph", "sleep_preserve_parameter_names", "enable_cumem_allocator",
    "enable_nccl_comm_suspend", "override_generation_config", "model_impl", "attention_backend",
    "kv_cache_dtype_skip_layers", "mamba_cache_dtype", "mamba_ssm_cache_dtype", "mamba_block_size",
    "prefix_match_unit", "mamba_cache_mode", "enable_mamba_shared_prefix_checkpoint",
    "replayssm_buffer_len", "use_replayssm", "mamba_backend", "mamba_ssu_algorithm",
    "enable_mamba_cache_stochastic_rounding", "mamba_cache_philox_rounds", "additional_config",
    "use_tqdm_on_load", "pt_load_map_location", "logits_processors", "async_scheduling",
    "stream_interval", "kv_sharing_fast_prefill", "swa_bounded_replay", "optimization_level",
    "performance_mode", "fault_tolerance_config", "enable_fault_tolerance", "kv_offloading_size",
    "kv_offloading_backend", "tokens_only", "shutdown_timeout", "watchdog_config",
    "weight_transfer_config", "fail_on_environ_validation", "gdn_prefill_backend",
    "kda_prefill_backend", "kda_decode_backend",
))
LOGPROBS_MODES = ("raw_logits", "raw_logprobs", "processed_logits", "processed_logprobs")
# SamplingParams raises a temperature in (0, _MIN_TEMPERATURE) to it and refuses one above 2
_MIN_TEMPERATURE, _MAX_TEMPERATURE = 1e-2, 2.0
_SAMPLING_EPS = 1e-5
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

    def __post_init__(self) -> None:
        if 0 < self.temperature < _MIN_TEMPERATURE:
            self.temperature = _MIN_TEMPERATURE
        if self.seed == -1:
            self.seed = None
        if not 0 <= self.temperature <= _MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}.")
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids or ()))
        if self.temperature < _SAMPLING_EPS:  # greedy: the truncations mean nothing
            self.top_p, self.top_k = 1.0, 0
            if self.n > 1:
                raise VLLMValidationError(f"n must be 1 when using greedy sampling, got {self.n}.")


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


def _config_max_len(model: str) -> Optional[int]:
    """vLLM's default max_model_len: the model config's context length (a local directory here)."""
    config = Path(model) / "config.json"
    return json.loads(config.read_text()).get("max_position_embeddings") if config.is_file() else None


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
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> None:
        unknown = set(kwargs) - ENGINE_ARGS_FIELDS
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
        self.max_model_len = engine_args["max_model_len"] or _config_max_len(model)
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
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
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
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            per_prompt = [sampling_params] * len(prompts)
        else:
            per_prompt = list(sampling_params)
            if len(per_prompt) != len(prompts):
                raise ValueError("The lengths of prompts and params must be the same.")
        self.events.append(("generate", len(prompts), sampling_params))
        outputs = []
        for i, (prompt, params) in enumerate(zip(prompts, per_prompt)):
            ids = prompt["prompt_token_ids"]
            if self.max_model_len is not None and len(ids) > self.max_model_len:
                raise VLLMValidationError(
                    f"The decoder prompt (length {len(ids)}) is longer than the maximum model length of "
                    f"{self.max_model_len}. Make sure that `max_model_len` is no smaller than the number of text tokens."
                )
            if self.max_model_len is not None and len(ids) == self.max_model_len:
                raise VLLMValidationError(
                    f"The decoder prompt (length {len(ids)}) plus the number of requested output tokens (at least 1) "
                    f"is longer than the maximum model length of {self.max_model_len}. Make sure that `max_model_len` "
                    "is no smaller than the number of text tokens (prompt + requested output tokens)."
                )
            stops = set(params.stop_token_ids)
            completions = []
            for j in range(params.n):
                tokens, logprobs, reason = [], [], "length"
                sample_seed = j if params.seed is None else params.seed + j
                for k in range(params.max_tokens):
                    token = (ids[-1] + sample_seed + k) % FAKE_VOCAB
                    tokens.append(token)
                    logprobs.append({token: Logprob(-0.25 * (k + 1), rank=1)})
                    if token in stops:
                        reason = "stop"
                        break
                    if self.max_model_len is not None and len(ids) + len(tokens) >= self.max_model_len:
                        break
                completions.append(CompletionOutput(j, "", tokens, None, logprobs, finish_reason=reason))
            outputs.append(RequestOutput(str(i), None, ids, None, completions, True))
        return outputs

