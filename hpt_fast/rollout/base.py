"""What every rollout engine shares: the ``Sample`` it returns, the ``RolloutEngine`` protocol, and
the checks of a generation request, done before an engine does any work.

Sampling contract (every engine):
- ``temperature > 0``: tokens are drawn from softmax(logits / temperature), truncated by ``top_k``
  (0 = off) then ``top_p`` (1.0 = off) and renormalised; ``temperature == 0``: greedy (argmax).
- ``Sample.logprobs[t]`` is the log-prob of ``token_ids[t]`` under the temperature-scaled, untruncated
  distribution, log_softmax(logits / temperature), whatever top-k / top-p did; at temperature 0
  under log_softmax(logits). These are the numbers a trainer recomputes with a teacher-forced
  forward at the same temperature, so they can stand in for the old log-probs.
- Generation of a sample ends at the first token in ``stop_token_ids`` (that token is kept in
  ``token_ids``: the policy must learn to emit it), finish_reason ``"stop"``; or after
  ``max_new_tokens`` tokens, or when the sequence fills the model's context, finish_reason ``"length"``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Protocol, Sequence, runtime_checkable

import torch

FinishReason = Literal["stop", "length"]


@dataclass
class Sample:
    """One generated completion.

    Attributes:
        token_ids: the generated tokens (the prompt excluded), length T >= 1.
        logprobs: float32 [T] on the CPU, per generated token (see the module docstring).
        finish_reason: ``"stop"`` (ended on a stop token, which is the last of ``token_ids``) or
            ``"length"`` (hit ``max_new_tokens`` or the model's context).
    """

    token_ids: list[int]
    logprobs: torch.Tensor
    finish_reason: FinishReason


@runtime_checkable
class RolloutEngine(Protocol):
    """The interface the trainer drives; see ``NativeEngine`` and ``VLLMEngine``.

    One training step: ``generate`` -> reward -> loss -> optimizer step -> ``update_weights``.
    Engines that hold device memory between steps free it in ``sleep`` and take it back in
    ``wake``; ``generate`` wakes a sleeping engine itself.
    """

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
        """``n`` samples for each prompt: result[i][j] is sample j of prompt i.

        ``logprobs_needed=False`` says the caller ignores ``Sample.logprobs`` (evaluation): an engine
        that cannot give the untruncated log-probs under top-k / top-p may then sample anyway.
        """
        ...

    def update_weights(self) -> None:
        """Make the next ``generate`` use the trainer's current weights (call after each optimizer step)."""
        ...

    def sleep(self) -> None:
        """Release the memory the engine holds between generations, before the trainer needs it."""
        ...

    def wake(self) -> None:
        """Take back what ``sleep`` released."""
        ...


@dataclass(frozen=True)
class GenerationRequest:
    """A checked ``generate`` call: what engines work from.

    Attributes:
        prompts: the prompts as lists of ints, each non-empty and within the vocabulary.
        n, max_new_tokens, temperature, top_p, top_k, seed: as passed, checked.
        stop_token_ids: the stop tokens as a sorted tuple without repeats.
    """

    prompts: list[list[int]]
    n: int
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop_token_ids: tuple[int, ...]
    seed: Optional[int]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def truncates(self) -> bool:
        """Whether top-k or top-p can cut the sampling distribution (never at temperature 0)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)


def end_token_ids(tokenizer, model) -> list[int]:
    """The tokens that end a response: the tokenizer's EOS and the EOS ids of the model's generation
    config, where chat models list their end-of-turn token (as vLLM, by default, stops on them).

    Args:
        tokenizer: a transformers tokenizer. model: a transformers model, or anything without a
            ``generation_config`` (then the tokenizer's EOS alone).
    Returns: the ids, sorted, without repeats or None.
    """
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    ids.discard(None)
    return sorted(ids)


def context_length(config) -> Optional[int]:
    """The longest sequence (prompt + completion) the model of a transformers ``config`` takes, or
    None where the config states none: what the engines generate within by default."""
    return getattr(config, "max_position_embeddings", None)


def _is_int(x: object) -> bool:
    # bool is an int subclass, but True as a token id or a count is always a caller's bug
    return isinstance(x, int) and not isinstance(x, bool)


def _check_token_ids(ids: Sequence[int], what: str, vocab_size: int) -> list[int]:
    ids = list(ids)
    bad = next((x for x in ids if not _is_int(x)), None)
    if bad is not None:
        raise TypeError(f"{what} must hold ints, got {type(bad).__name__} ({bad!r})")
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        wrong = next(x for x in ids if not 0 <= x < vocab_size)
        raise ValueError(f"{what} holds token id {wrong}, outside the vocabulary [0, {vocab_size})")
    return ids


def validate_request(
    prompt_ids: Sequence[Sequence[int]],
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    stop_token_ids: Sequence[int],
    seed: Optional[int],
    vocab_size: int,
    max_context: Optional[int],
) -> GenerationRequest:
    """Checks a ``generate`` call; raises ``TypeError`` / ``ValueError`` naming the first problem.

    Args:
        vocab_size: ids must lie in [0, vocab_size).
        max_context: the model's context length (prompt + completion), or None if unbounded; every
            prompt must leave room for at least one new token.
    """
    for name, value in (("n", n), ("max_new_tokens", max_new_tokens), ("top_k", top_k)):
        if not _is_int(value):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 turns it off), got {top_k}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 turns it off), got {top_p!r}")
    if seed is not None and not _is_int(seed):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence):
        raise TypeError(f"prompt_ids must be a list of token-id lists, got {type(prompt_ids).__name__}")
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty: give at least one prompt")
    prompts = []
    for i, prompt in enumerate(prompt_ids):
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
            raise TypeError(f"prompt {i} must be a list of token ids, got {type(prompt).__name__}")
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if max_context is not None and len(prompt) >= max_context:
            raise ValueError(
                f"prompt {i} has {len(prompt)} tokens, which leaves no room in the model's context of "
                f"{max_context} tokens"
            )
        prompts.append(_check_token_ids(prompt, f"prompt {i}", vocab_size))
    stops = _check_token_ids(stop_token_ids, "stop_token_ids", vocab_size)
    return GenerationRequest(
        prompts=prompts,
        n=n,
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=top_k,
        stop_token_ids=tuple(sorted(set(stops))),
        seed=seed,
    )
