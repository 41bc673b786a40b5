"""Tiny causal LMs of families whose logits are not ``lm_head(model.base_model(...))`` as such,
for the fused head's readers (``hpt_fast.logit_head``): the loss patch and the trainer's policy."""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

TINY = dict(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8)

# id: (model_type, settings over TINY). Caps and scales well inside the logits' range, so that
# skipping one shows.
READ_OTHERWISE = {
    # its base_model is the causal LM itself: the trunk is found as the head's one sibling
    "llama4": ("llama4_text", {}),
    # soft caps under other field names
    "recurrent_gemma": ("recurrent_gemma", dict(logits_soft_cap=0.5, lru_width=16, num_hidden_layers=3,
                                                attention_window_size=16)),
    # (its cache fails at this size in transformers itself, hence use_cache=False)
    "xlstm": ("xlstm", dict(hidden_size=64, embedding_dim=64, num_heads=1, qk_dim_factor=1.0, num_blocks=1,
                            output_logit_soft_cap=0.5, use_cache=False)),
    # divides the hidden states by logits_mup_width_multiplier before its head
    "inkling": ("inkling_text", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                                     logits_mup_width_multiplier=4.0)),
    # keeps the first unpadded_vocab_size of its head's logits (ids must lie below it)
    "inkling_unpadded": ("inkling_text", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                                              unpadded_vocab_size=50)),
    # its soft cap is a module beside the trunk and the head
    "inkling2": ("inkling2_text", dict(final_logit_softcapping=0.5)),
    # sets a logit scale field its forward ignores
    "mpt": ("mpt", dict(logit_scale=3.0)),
}


def tiny_causal_lm(model_type: str, dtype: torch.dtype = torch.float32, **settings) -> torch.nn.Module:
    """A randomly initialised ``AutoModelForCausalLM`` of ``model_type`` at TINY's sizes, in training mode."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**TINY, **settings})
    return AutoModelForCausalLM.from_config(config).to(dtype).train()


def unreadable_forward(model: torch.nn.Module) -> torch.nn.Module:
    """``model``, made an instance of a subclass whose forward has no source to read (compiled, or
    built at run time) and computes the same: ``hpt_fast.logit_head`` then applies the config's
    logit fields as their known families do."""
    namespace: dict = {}
    exec("def forward(self, *args, **kwargs):\n    return base.forward(self, *args, **kwargs)",  # noqa: S102
         {"base": type(model)}, namespace)
    model.__class__ = type(f"Unreadable{type(model).__name__}", (type(model),), {"forward": namespace["forward"]})
    return model
