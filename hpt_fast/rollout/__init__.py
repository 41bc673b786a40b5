"""Rollout engines behind one protocol (``RolloutEngine``): ``NativeEngine`` generates with the
trainer's own module (zero copy), ``VLLMEngine`` drives an in-process vLLM (optional extra)."""
from hpt_fast.rollout.base import (
    GenerationRequest, RolloutEngine, Sample, context_length, end_token_ids, validate_request,
)
from hpt_fast.rollout.native import NativeEngine
from hpt_fast.rollout.vllm import VLLMEngine

__all__ = ["RolloutEngine", "Sample", "GenerationRequest", "validate_request", "end_token_ids", "context_length", "NativeEngine", "VLLMEngine"]
