"""What a transformers causal LM does to ``lm_head``'s output, in the fused op's terms.

The op computes ``log_softmax(softcap(hidden @ W.T + b) / T)``. Some transformers models transform
the head's output before it is their logits:
- a constant factor ``s``: Cohere's ``logit_scale``, Falcon-H1's ``lm_head_multiplier``, the Muse
  models' ``output_multiplier``, ``1 / logits_scaling`` for Granite and MiniCPM3 (which divide by
  it) and ``logits_scaling`` for HyperCLOVA X (which multiplies);
- then a tanh soft cap ``c * tanh(z / c)``: ``final_logit_softcapping`` (Gemma 2 and later,
  Inkling 2, the Muse models after their factor).
Sampling at temperature T from ``c * tanh(s z / c)`` is the op at soft cap ``c / s`` and
temperature ``T / s`` (``s > 0``). The fields are read from the config and from its text config,
where multimodal models keep them; the list is what a search of transformers 5.24's model code
found. A head that is not a plain ``nn.Linear`` (Dory's learned per-token scale, an adapter on
``lm_head``) computes something the op does not, so it is refused rather than silently bypassed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from torch import nn

# config fields that scale the logits (1.0 leaves them unchanged)
_SCALE_FIELDS = ("logits_scaling", "logit_scale", "lm_head_multiplier", "output_multiplier")
# models whose logits_scaling multiplies the logits (Granite and MiniCPM3 divide by it)
_MULTIPLYING_LOGITS_SCALING = ("hyperclovax",)


@dataclass(frozen=True)
class LogitTransform:
    """Logits = ``softcap * tanh(scale * lm_head(hidden) / softcap)`` (no tanh when softcap is None)."""

    scale: float = 1.0
    softcap: Optional[float] = None

    def op_args(self, temperature: float = 1.0) -> dict[str, Any]:
        """The fused op's ``temperature`` and ``softcap`` for sampling temperature ``temperature``."""
        return {"temperature": temperature / self.scale,
                "softcap": None if self.softcap is None else self.softcap / self.scale}


def _configs(model: nn.Module) -> list[Any]:
    config = getattr(model, "config", None)
    if config is None:
        return []
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [config] if text is config else [config, text]


def _field(configs: list[Any], name: str, neutral: Any = None) -> tuple[Any, Any]:
    """(value, config holding it) of the first config that sets ``name`` to neither None nor
    ``neutral``, or (None, None)."""
    for config in configs:
        value = getattr(config, name, None)
        if value is not None and value != neutral:
            return value, config
    return None, None


def logit_transform(model: nn.Module) -> LogitTransform:
    """The transform ``model`` applies after its output embedding (see the module docstring).

    Raises:
        ValueError: the output embedding is missing or not a plain ``nn.Linear``; two scale
            fields are set; a scale or cap is not a finite number > 0.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (get_output_embeddings() is None)")
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise ValueError(
            f"{type(model).__name__}'s output embedding is a {type(head).__module__}.{type(head).__qualname__}, "
            "not a plain torch.nn.Linear: "
            "the fused head computes hidden @ weight.T + bias and would skip what its forward adds"
        )
    configs = _configs(model)
    scales = []
    for name in _SCALE_FIELDS:
        value, config = _field(configs, name, neutral=1.0)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"{type(model).__name__} sets {name}={value!r}: a logit scale the fused head can "
                             "express is a finite number > 0")
        divides = name == "logits_scaling" and getattr(config, "model_type", None) not in _MULTIPLYING_LOGITS_SCALING
        scales.append((1.0 / value if divides else float(value), f"{name}={value}"))
    if len(scales) > 1:
        raise ValueError(f"{type(model).__name__} sets {' and '.join(text for _, text in scales)}: no model is "
                         "known to apply two logit scales, so which of them it applies is not known here")
    softcap, _ = _field(configs, "final_logit_softcapping")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not (math.isfinite(softcap) and softcap > 0)):
        raise ValueError(f"{type(model).__name__} sets final_logit_softcapping={softcap!r}, not a finite number > 0")
    return LogitTransform(scale=scales[0][0] if scales else 1.0, softcap=None if softcap is None else float(softcap))
