"""``model(input_ids, labels=labels).loss`` through the fused op: no ``[tokens x vocab]`` logits.

A transformers causal LM computes its loss from logits it materialises (and upcasts to float32).
``patch_causal_lm_loss(model)`` gives that one model a forward that, when it is given ``labels`` (or
pre-shifted ``shift_labels``) and is training, runs the trunk (``logit_head.trunk_name``), and hands
the last hidden states and the output embedding to the fused op: the same loss, the cross-entropy
of each next token summed over the labels that are not ``-100`` and divided by
``num_items_in_batch`` (what the transformers ``Trainer`` passes under gradient accumulation) or
else by their count, with ``logits=None`` in the output. So the ``Trainer``, accelerate loops and
any code that reads ``outputs.loss`` train through the op unchanged. Not training, or without
labels, the model's own forward runs (evaluation metrics and ``generate`` see the logits).

Mode B (the default) computes the gradients in the forward, three GEMMs' worth of work, and holds
them (a ``[V, H]`` weight gradient in the weight's dtype) until the backward; mode A computes
them in the backward, four GEMMs' worth, holding nothing. The model's transform of the head's output
(a scale, a soft cap: ``hpt_fast.logit_head``) is applied; a head that is not a plain ``nn.Linear``
is refused. With no label in a batch the loss is 0 (transformers' own mean gives NaN), still
connected to the model. With ``output_router_logits`` the MoE load-balancing loss is added as the
model's own forward adds it (``_MOE_AUX_LOSS_SOURCE``), or nothing where its forward adds no
auxiliary loss (DeepSeek-V3, GLM-4-MoE, Llama 4 ...); a family that adds one otherwise is refused.

Which loss a model computes is read from its forward's source, as the patch replaces that forward:
it must compute transformers' causal-LM loss (``self.loss_function``, ``ForCausalLMLoss``, which
shifts the labels). Models with a loss of their own (CpmAnt and TrOCR take unshifted labels, XLM
its own head's) or a custom ``loss_function`` are refused.

Under DeepSpeed ZeRO-3 the engine's forward gathers the partitioned head when it is read; outside
an engine the patch gathers it around the op's call. Under FSDP2 a head in its parent's unit (the
root's, by default) is unsharded while the parent's forward runs; a head sharded as a unit of its
own is called with the op as its forward, so that FSDP2's hooks unshard it around the op and
reduce its gradient after the backward, as they do around its own forward (hooks of other kinds on
such a head see the summed loss as its output).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import re
import sys
import types
from typing import Any, Optional

import torch
from torch import Tensor, nn

from hpt_fast import fsdp2, zero3
from hpt_fast.logit_head import LogitTransform, logit_transform, trunk_name, uncompiled
from hpt_fast.op_inputs import check_options
from hpt_fast.ops import fused_linear_loss, fused_token_logprobs


# what an MoE forward adds to its loss with output_router_logits, as the patch adds it (whitespace
# removed): load_balancing_loss_func of its modeling module, times router_aux_loss_coef (Mixtral,
# Qwen2/3-MoE, OLMoE, GPT-OSS, PhiMoE, Jamba, GraniteMoE and most others in transformers 5.24)
_MOE_AUX_LOSS_SOURCE = ("aux_loss=load_balancing_loss_func(outputs.router_logits,self.num_experts,"
                        "self.num_experts_per_tok,attention_mask,)",
                        "loss+=self.router_aux_loss_coef*aux_loss.to(loss.device)")


def _forward_source(model: nn.Module) -> str:
    """``type(model).forward``'s source without docstrings, comments and whitespace ("" if unreadable)."""
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return ""
    source = re.sub(r'"""[\s\S]*?"""', "", source)
    source = re.sub(r"#[^\n]*", "", source)
    return re.sub(r"\s+", "", source)


def _check_causal_lm_loss(model: nn.Module, source: str) -> None:
    """Refuse a model whose forward's loss is not transformers' causal-LM loss of its labels."""
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    name = type(model).__name__
    if "self.loss_function(" not in source:
        raise ValueError(f"{name}.forward does not compute its loss with self.loss_function (transformers' "
                         "ForCausalLMLoss, which shifts the labels), or its source is not readable: the patch "
                         "reproduces that loss only")
    custom = getattr(model, "_loss_function", None)  # what `model.loss_function = f` sets
    loss = custom if custom is not None else LOSS_MAPPING.get(getattr(model, "loss_type", None),
                                                              LOSS_MAPPING["ForCausalLM"])
    if loss is not ForCausalLMLoss:
        raise ValueError(f"{name}'s loss_function is {getattr(loss, '__qualname__', loss)!r}, not transformers' "
                         "ForCausalLMLoss: the patch computes that loss only")


def _negative_logp(logp: Tensor, entropy: Optional[Tensor], rows: Tensor) -> Tensor:
    """Mode B's token loss: cross-entropy of each token."""
    return -logp


class CausalLMLossPatch:
    """The patch on one model made by ``patch_causal_lm_loss``; ``restore()`` (or leaving its
    ``with`` block) gives the model its own forward back."""

    def __init__(self, model: nn.Module, transform: LogitTransform, trunk: str, moe_aux_loss: Optional[bool],
                 mode: str, skip_logits: Optional[bool], op_kwargs: dict[str, Any]) -> None:
        self.model = model
        self.transform = transform
        self.trunk = trunk
        # with router logits, the forward adds: True the load-balancing loss the patch reproduces,
        # False no auxiliary loss, None one of another form
        self.moe_aux_loss = moe_aux_loss
        self.mode = mode
        self.skip_logits = skip_logits
        self.op_kwargs = op_kwargs
        self.original_forward = model.forward
        self._own_forward = "forward" in vars(model)  # an instance forward someone set before this patch
        self._parameter_names = tuple(inspect.signature(type(model).forward).parameters)[1:]

        # functools.wraps keeps the class forward's signature: the Trainer reads it for
        # num_items_in_batch, generate for its model kwargs
        @functools.wraps(type(model).forward)
        def forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return self._forward(module, args, kwargs)

        self.forward = types.MethodType(forward, model)
        model.forward = self.forward

    def _forward(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        if len(args) > len(self._parameter_names):
            raise TypeError(f"{type(model).__name__}.forward takes {len(self._parameter_names)} positional "
                            f"arguments, got {len(args)}")
        for name, value in zip(self._parameter_names, args):
            if name in kwargs:
                raise TypeError(f"{type(model).__name__}.forward got {name!r} twice")
            kwargs[name] = value
        labels, shift_labels = kwargs.get("labels"), kwargs.get("shift_labels")
        fused = (labels is not None or shift_labels is not None) and (
            model.training if self.skip_logits is None else self.skip_logits)
        if not fused:
            return self.original_forward(**kwargs)
        return self._fused_loss(model, kwargs)

    def _fused_loss(self, model: nn.Module, kwargs: dict[str, Any]) -> Any:
        from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

        labels, shift_labels = kwargs.pop("labels", None), kwargs.pop("shift_labels", None)
        num_items = kwargs.pop("num_items_in_batch", None)
        ignore_index = kwargs.pop("ignore_index", -100)
        kwargs.pop("logits_to_keep", None)  # no logits are made
        return_dict = kwargs.pop("return_dict", None)
        text_config = model.config.get_text_config()
        router = kwargs.get("output_router_logits")
        router = getattr(text_config, "output_router_logits", False) if router is None else router
        if router:
            if self.moe_aux_loss is None:
                raise ValueError(f"{type(model).__name__} is asked for router logits (output_router_logits), and its "
                                 "forward adds an auxiliary loss that is not router_aux_loss_coef * "
                                 "load_balancing_loss_func(router_logits, num_experts, num_experts_per_tok, "
                                 "attention_mask), the form patch_causal_lm_loss reproduces")
            kwargs["output_router_logits"] = True
        out = getattr(model, self.trunk)(**kwargs)
        hidden = out.last_hidden_state
        if shift_labels is None:
            # as transformers shifts: the labels, padded with an ignored last target, so that hidden
            # stays whole (a [:, :-1] slice of it would be copied before the op's own row gather)
            targets = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)
        else:
            targets = shift_labels
        if targets.shape != hidden.shape[:-1]:
            raise ValueError(f"labels give targets of shape {tuple(targets.shape)} for hidden states "
                             f"{tuple(hidden.shape[:-1])} (shift_labels must match the input's [batch, sequence])")
        head = model.get_output_embeddings()
        hidden, targets = hidden.to(head.weight.device), targets.to(head.weight.device)
        mask = targets != ignore_index
        op = dict(ignore_index=ignore_index, **self.transform.op_args(), **self.op_kwargs)

        def head_loss(hidden: Tensor) -> Tensor:
            # the head's parameters as they are when called: gathered by ZeRO-3 or unsharded by FSDP2
            kept, kept_bias = self.transform.rows(head.weight, head.bias)
            if self.mode == "B":
                return fused_linear_loss(hidden, kept, targets, _negative_logp, bias=kept_bias, **op)[0]
            return -fused_token_logprobs(hidden, kept, targets, bias=kept_bias, **op)[0].sum()

        if fsdp2.is_unit(head):
            # FSDP2 unshards a unit's parameters around its module's forward and reduces their
            # gradients after its backward: a head sharded as a unit of its own is called, with
            # the op as its forward, so that both happen
            total = fsdp2.as_forward(head, head_loss, hidden)
        else:
            # a plain call where nothing is partitioned: torch.compile cannot break a graph inside
            # gathered()'s context manager, which mode B's opaque call needs
            released = zero3.is_released(head.weight) or zero3.is_released(head.bias)
            with zero3.gathered(head.weight, head.bias) if released else contextlib.nullcontext():
                total = head_loss(hidden)
        if num_items is None:
            num_items = mask.sum().clamp(min=1)
        elif torch.is_tensor(num_items):
            num_items = num_items.to(total.device)
        loss = total / num_items
        fields = dict(logits=None, cache=getattr(out, "cache", None), hidden_states=getattr(out, "hidden_states", None),
                      attentions=getattr(out, "attentions", None))
        if hasattr(out, "router_logits"):  # an MoE model's output, as its own forward gives it
            aux = None
            if router and self.moe_aux_loss:
                balance = sys.modules[type(model).__module__].load_balancing_loss_func
                aux = balance(out.router_logits, model.num_experts, model.num_experts_per_tok,
                              kwargs.get("attention_mask"))
                loss = loss + model.router_aux_loss_coef * aux.to(loss.device)
            output = MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux, router_logits=out.router_logits, **fields)
        else:
            output = CausalLMOutputWithPast(loss=loss, **fields)
        return output.to_tuple() if return_dict is False else output

    def restore(self) -> None:
        """Give the model its own forward back."""
        if self.model.forward is not self.forward:
            raise RuntimeError("the model's forward was replaced since this patch: "
                               "restore the patches in reverse order")
        if self._own_forward:
            self.model.forward = self.original_forward
        else:
            del self.model.forward  # the class's forward again

    def __enter__(self) -> "CausalLMLossPatch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def _inner_model(model: nn.Module) -> nn.Module:
    """The model inside the wrappers of torch.compile, DDP, a DeepSpeed engine and PEFT: each
    wrapper's forward calls its inner model's, looked up when called, which the patch replaces."""
    # the engine's class, from the deepspeed that built it
    engine = sys.modules.get("deepspeed.runtime.engine")
    while True:
        model = uncompiled(model)
        if isinstance(model, nn.parallel.DistributedDataParallel) or (
                engine is not None and isinstance(model, engine.DeepSpeedEngine)):
            model = model.module
        elif callable(getattr(model, "get_base_model", None)):  # a PEFT model
            model = model.get_base_model()
        else:
            return model


def patch_causal_lm_loss(
    model: nn.Module,
    *,
    mode: str = "B",
    skip_logits: Optional[bool] = None,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    grad_order: str = "auto",
    accum_dtype: Optional[torch.dtype] = torch.float32,
) -> CausalLMLossPatch:
    """Compute ``model``'s causal-LM loss with the fused op (see the module docstring).

    Args:
        model: a transformers causal LM (``...ForCausalLM``, or a multimodal
            ``...ForConditionalGeneration`` whose trunk returns ``last_hidden_state``) that computes
            transformers' causal-LM loss,
            or a PEFT model around one (the causal LM inside it is patched; adapters on its
            layers train through the op, one on ``lm_head`` is refused); inside the wrapper of
            ``torch.compile`` (compiled as patched), of DDP or of a DeepSpeed engine, the model
            inside is patched.
        mode: "B" (gradients in the forward, three GEMMs) or "A" (in the backward, four).
        skip_logits: None: the fused loss while ``model.training``, the model's own forward in
            evaluation; True: the fused loss whenever labels are given; False: never (the patch
            does nothing).
        backend, chunk_size, grad_order, accum_dtype: the op's (see ``fused_linear_loss``).
    Returns:
        The patch (a ``CausalLMLossPatch``), usable as a context manager.
    Raises:
        ValueError for a bad option, a model whose head the op cannot compute
        (``hpt_fast.logit_head.logit_transform``), or one whose forward computes another loss.
    """
    if mode not in ("A", "B"):
        raise ValueError(f"mode must be 'A' or 'B', got {mode!r}")
    if skip_logits not in (None, True, False):
        raise ValueError(f"skip_logits must be None, True or False, got {skip_logits!r}")
    chunk_size = check_options(backend, chunk_size, grad_order, accum_dtype)
    model = _inner_model(model)
    if isinstance(model, nn.DataParallel):
        # its replicas, made on every call, would copy the patched forward bound to this model
        raise ValueError("nn.DataParallel's replicas cannot run the patched forward: patch the model under "
                         "DistributedDataParallel (through its wrapper or before wrapping), or unwrapped")
    if not hasattr(model, "config") or not hasattr(model, "get_output_embeddings"):
        raise ValueError(f"{type(model).__name__} is not a transformers PreTrainedModel (no config / output embedding)")
    transform = logit_transform(model)
    source = _forward_source(model)
    _check_causal_lm_loss(model, source)
    moe_aux_loss = True if all(part in source for part in _MOE_AUX_LOSS_SOURCE) else (
        False if "aux_loss" not in source else None)
    op_kwargs = dict(backend=backend, chunk_size=chunk_size, grad_order=grad_order, accum_dtype=accum_dtype)
    return CausalLMLossPatch(model, transform, trunk_name(model), moe_aux_loss, mode, skip_logits, op_kwargs)
