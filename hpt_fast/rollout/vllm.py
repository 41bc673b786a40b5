"""VLLMEngine: an in-process ``vllm.LLM`` whose weights are streamed from the trainer's model.

vLLM is an optional extra (``pip install hpt-fast[vllm]``); it is imported when an engine is made.
The engine follows the order veRL, TRL and OpenRLHF converged on (see the phase methods):

    created asleep, dummy weights
    each step: update_weights() = [wake_up(weights)] -> load_weights(stream) -> reset_prefix_cache()
               generate()       = [wake_up(kv_cache)] -> generate
               sleep()          = sleep(level) -> the trainer trains

Each phase is timed (``timings``, and an INFO log line). ``update_weights`` on an awake engine (its
KV cache would sit in memory during the load) raises. vLLM starts with dummy weights, and
``sleep(level=2)`` discards them: ``generate`` then streams the model's current weights first.

``VLLM_API_USED`` lists every vLLM name and keyword used here; ``bench/check_vllm_api.py`` checks
them against vLLM's source and ``tests/test_rollout_vllm.py`` checks the engine against a fake
``vllm`` with the same signatures.
"""
from __future__ import annotations

import logging
import os
import secrets
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from hpt_fast import zero3
from hpt_fast.config import VLLM_TEMPERATURE_RANGE
from hpt_fast.rollout.base import Sample, context_length, validate_request

logger = logging.getLogger(__name__)

# keywords passed to each vLLM callable; "LLM" takes its own and, through **kwargs, EngineArgs'
VLLM_API_USED: dict[str, tuple[str, ...]] = {
    "LLM": (
        "model", "skip_tokenizer_init", "tensor_parallel_size", "dtype", "seed", "gpu_memory_utilization",
        "enforce_eager", "kv_cache_memory_bytes", "enable_sleep_mode", "load_format", "logprobs_mode",
        "distributed_executor_backend", "max_model_len", "max_num_seqs", "enable_prefix_caching",
        "trust_remote_code",
    ),
    "LLM.generate": ("prompts", "sampling_params", "use_tqdm"),
    "LLM.sleep": ("level",),
    "LLM.wake_up": ("tags",),
    "LLM.reset_prefix_cache": (),
    "SamplingParams": (
        "n", "temperature", "top_p", "top_k", "seed", "stop_token_ids", "max_tokens", "logprobs",
        "detokenize", "ignore_eos",
    ),
}
# attributes read from vLLM objects: the path to the in-process model, and the fields of the
# prompts passed in and of the outputs read
VLLM_MODEL_PATH = ("llm_engine", "model_executor", "driver_worker", "model_runner", "model")
VLLM_FIELDS_USED: dict[str, tuple[str, ...]] = {
    "TokensPrompt": ("prompt_token_ids",),
    "RequestOutput": ("outputs",),
    "CompletionOutput": ("token_ids", "logprobs", "finish_reason"),
    "Logprob": ("logprob",),
}
# log-probs after temperature (the sampling distribution), as the Sample contract needs
LOGPROBS_MODE = "processed_logprobs"


def _empty_device_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class VLLMEngine:
    """Rollouts from an in-process vLLM engine fed with the trainer's weights.

    Create it before the optimizer state exists (vLLM sizes its KV cache from the free memory).

    Args:
        model: the trainer's module (under DeepSpeed, ``engine.module``); its ``named_parameters``
            must carry Hugging Face names (``model.layers.0.self_attn.q_proj.weight``, ...).
        model_path: the Hugging Face name or directory vLLM reads the config from; its weights are
            never read (``load_format="dummy"``): they come from ``model`` at each ``update_weights``.
        dtype: the rollout dtype; parameters are cast to it as they are streamed.
        sleep_level: 1 keeps a copy of the weights in CPU memory while asleep; 2 drops them (less
            host memory; they are reloaded by the next ``update_weights`` anyway).
        gpu_memory_utilization: fraction of the GPU's total memory vLLM may take (weights + KV
            cache); that much must be free when the engine starts.
        kv_cache_memory_bytes: the KV cache size, overriding what ``gpu_memory_utilization`` implies.
        max_model_len: the longest prompt + completion (default: the model's).
        max_num_seqs: the most sequences vLLM runs at once.
        tensor_parallel_size, seed, enable_prefix_caching, trust_remote_code: passed to ``vllm.LLM``.
        distributed_executor_backend: default ``"external_launcher"`` inside a torch.distributed job
            (one engine per trainer rank) and ``"uni"`` otherwise; either way the engine core runs in
            this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so its model is reachable.
            With ``"external_launcher"`` and ``tensor_parallel_size`` > 1, consecutive ranks form one
            vLLM engine: ``generate`` gathers the prompts of the ranks of a group, all of them
            generate the whole group's batch together (with the first rank's seed), and each keeps
            the samples of its own prompts.
        **llm_kwargs: any other ``vllm.LLM`` / ``EngineArgs`` keyword.
    """

    def __init__(
        self,
        model: nn.Module,
        model_path: str,
        *,
        dtype: torch.dtype = torch.bfloat16,
        sleep_level: int = 1,
        gpu_memory_utilization: float = 0.3,
        kv_cache_memory_bytes: Optional[int] = None,
        max_model_len: Optional[int] = None,
        max_num_seqs: Optional[int] = None,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        enable_prefix_caching: bool = True,
        distributed_executor_backend: Optional[str] = None,
        trust_remote_code: bool = False,
        **llm_kwargs: Any,
    ):
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dtype}")
        try:
            from vllm import LLM
        except ImportError as err:
            raise ImportError("VLLMEngine needs vLLM, on a GPU machine: pip install 'hpt-fast[vllm]'") from err

        in_job = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed_executor_backend is None:
            distributed_executor_backend = "external_launcher" if in_job else "uni"
        self._tp_group = None
        if in_job and distributed_executor_backend == "external_launcher" and tensor_parallel_size > 1:
            self._tp_group = _tensor_parallel_group(tensor_parallel_size)
        # the engine core must run in this process for its model to be reachable (load_weights)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.model = model
        self.dtype = dtype
        self.sleep_level = sleep_level
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.max_context = max_model_len or context_length(model.config)
        self.timings: dict[str, float] = {}
        self._llm = LLM(
            model=model_path,
            skip_tokenizer_init=True,
            tensor_parallel_size=tensor_parallel_size,
            dtype=str(dtype).removeprefix("torch."),
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=True,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            enable_sleep_mode=True,
            load_format="dummy",
            logprobs_mode=LOGPROBS_MODE,
            distributed_executor_backend=distributed_executor_backend,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            enable_prefix_caching=enable_prefix_caching,
            trust_remote_code=trust_remote_code,
            **llm_kwargs,
        )
        self._weights_loaded = False  # dummy weights until the first update_weights
        self._state = "awake"
        self.sleep()

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - start
        logger.info("vllm %s: %.3f s", name, self.timings[name])

    def _runner_model(self) -> nn.Module:
        """The model inside vLLM's (in-process) worker."""
        obj: Any = self._llm
        for attr in VLLM_MODEL_PATH:
            obj = getattr(obj, attr)
        return obj

    def _stream_weights(self) -> Iterator[tuple[str, Tensor]]:
        """(HF name, tensor in the rollout dtype), one parameter gathered at a time: the consumer
        copies each before asking for the next, and only then is the gathered copy released."""
        for name, param in self.model.named_parameters():
            with zero3.gathered(param):
                yield name, param.detach().to(self.dtype)

    def update_weights(self) -> None:
        """Streams the trainer's parameters into vLLM's model, then drops the now-stale prefix cache.

        Call it after each optimizer step, with the engine asleep.
        """
        if self._state == "awake":
            raise RuntimeError("update_weights() on an awake vLLM engine: call sleep() first, so the KV cache is freed")
        if self._state == "asleep":
            _empty_device_cache()
            with self._phase("wake_weights"):
                self._llm.wake_up(tags=["weights"])
            self._state = "weights"
        with self._phase("load_weights"):
            self._runner_model().load_weights(self._stream_weights())
        # cached prefixes were computed with the old weights (vLLM issue 17103)
        with self._phase("reset_prefix_cache"):
            self._llm.reset_prefix_cache()
        self._weights_loaded = True

    def wake(self) -> None:
        """Allocates the KV cache (and brings the weights back from a level-1 sleep)."""
        if self._state == "awake":
            return
        if not self._weights_loaded:
            # dummy weights (a new engine) or dropped by a level-2 sleep: the model's current ones
            self.update_weights()
        _empty_device_cache()
        if self._state == "asleep":
            with self._phase("wake_weights"):
                self._llm.wake_up(tags=["weights"])
        with self._phase("wake_kv_cache"):
            fully_awake = self._llm.wake_up(tags=["kv_cache"])
        if not fully_awake:
            raise RuntimeError("vLLM is not fully awake after waking its weights and KV cache")
        self._state = "awake"

    def sleep(self) -> None:
        """Frees the KV cache and offloads (level 1) or drops (level 2) the weights."""
        if self._state == "asleep":
            return
        with self._phase("sleep"):
            self._llm.sleep(level=self.sleep_level)
        _empty_device_cache()
        self._state = "asleep"
        if self.sleep_level == 2:
            self._weights_loaded = False

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        n: int = 1,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop_token_ids: Sequence[int] = (),
        seed: Optional[int] = None,
        logprobs_needed: bool = True,
    ) -> list[list[Sample]]:
        """``n`` samples per prompt (contract: ``hpt_fast.rollout.base``); wakes the engine if asleep.

        Top-k / top-p are refused at temperature > 0 unless ``logprobs_needed=False``: vLLM's
        log-probs are then those of the truncated distribution, not the untruncated one the
        contract (and the trainer) needs; with ``logprobs_needed=False`` (evaluation) they are
        returned as vLLM gives them.
        """
        request = validate_request(
            prompt_ids, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            stop_token_ids=stop_token_ids, seed=seed, vocab_size=self.vocab_size, max_context=self.max_context,
        )
        low, high = VLLM_TEMPERATURE_RANGE
        if request.temperature > high or 0 < request.temperature < low:
            raise ValueError(f"VLLMEngine samples at temperature 0 (greedy) or in [{low}, {high}] (vLLM's range), "
                             f"got {request.temperature}")
        if request.truncates and logprobs_needed:
            raise ValueError(
                "VLLMEngine samples without top-k / top-p (top_k=0, top_p=1.0): with them vLLM returns the "
                "log-probs of the truncated distribution; use NativeEngine for truncated sampling, or pass "
                "logprobs_needed=False when they are not used"
            )
        self.wake()
        from vllm import SamplingParams

        prompts, seed, mine = list(request.prompts), request.seed, slice(0, len(request.prompts))
        if self._tp_group is not None and seed is None:
            # unseeded, vLLM draws from each rank's own random state, and the ranks would diverge:
            # a fresh seed, the first rank's for all (below)
            seed = secrets.randbits(62)
        if self._tp_group is not None:
            # the ranks of one engine must feed it identical requests
            gathered: list = [None] * torch.distributed.get_world_size(self._tp_group)
            torch.distributed.all_gather_object(gathered, (prompts, seed), group=self._tp_group)
            me = torch.distributed.get_rank(self._tp_group)
            start = sum(len(g[0]) for g in gathered[:me])
            prompts, seed = [p for g in gathered for p in g[0]], gathered[0][1]
            mine = slice(start, start + len(request.prompts))

        # vLLM refuses n > 1 at temperature 0: one greedy sample per prompt, copied n times
        copies = request.n if request.greedy else 1
        # vLLM seeds each request's own generator with its seed, and sample j of an n-sample
        # request with seed + j: one seed for the batch would give every prompt the same noise
        params = [
            SamplingParams(
                n=request.n // copies,
                temperature=request.temperature,
                top_p=request.top_p,
                top_k=request.top_k,
                seed=None if seed is None else _request_seed(seed, i, request.n),
                stop_token_ids=list(request.stop_token_ids),
                max_tokens=request.max_new_tokens,
                logprobs=0,  # the sampled token's log-prob only
                detokenize=False,
                ignore_eos=True,  # stop on stop_token_ids only, as every engine does
            )
            for i in range(len(prompts))
        ]
        with self._phase("generate"):
            outputs = self._llm.generate(
                [{"prompt_token_ids": p} for p in prompts], sampling_params=params, use_tqdm=False
            )
        return [[_to_sample(c) for c in out.outputs for _ in range(copies)] for out in outputs[mine]]


def _request_seed(seed: int, prompt: int, n: int) -> int:
    """The seed of prompt ``prompt``'s request: its samples take ``seed + prompt * n + j`` (vLLM adds
    j), disjoint across prompts; kept in [0, 2**62), so that no seed is vLLM's -1 ("unseeded") and
    seed + j stays within a torch generator's seed range."""
    return (seed + prompt * n) % 2**62


def _tensor_parallel_group(size: int):
    """This rank's group of ``size`` consecutive ranks (vLLM's external launcher groups them so)."""
    world = torch.distributed.get_world_size()
    if world % size:
        raise ValueError(f"tensor_parallel_size {size} must divide the world size {world}")
    mine, _ = torch.distributed.new_subgroups_by_enumeration(
        [list(range(start, start + size)) for start in range(0, world, size)]
    )
    return mine


def _to_sample(completion: Any) -> Sample:
    """A vLLM ``CompletionOutput`` (requested with ``logprobs=0``) as a ``Sample``."""
    if completion.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a completion with reason {completion.finish_reason!r}")
    token_ids = list(completion.token_ids)
    logprobs = [position[token].logprob for position, token in zip(completion.logprobs, token_ids)]
    return Sample(token_ids, torch.tensor(logprobs, dtype=torch.float32), completion.finish_reason)
