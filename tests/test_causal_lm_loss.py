"""``patch_causal_lm_loss``: a transformers model's ``model(..., labels=...).loss`` through the op.

Against a float64 reference made from the model's own logits (its forward, with whatever it does
after lm_head), gradients of every parameter included; in the transformers ``Trainer`` with
gradient accumulation against the unpatched model; and the refusals.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import transformers

from hpt_fast.causal_lm_loss import patch_causal_lm_loss
from hpt_fast.logit_head import LogitTransform, logit_transform, trunk_name
from tiny_models import READ_OTHERWISE, tiny_causal_lm, unreadable_forward

VOCAB = 61
TINY = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8)


def _model(family: str, dtype: torch.dtype = torch.float32, **settings) -> torch.nn.Module:
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(**{**TINY, **settings})
    return getattr(transformers, f"{family}ForCausalLM")(config).to(dtype).train()


def _gemma4(**text_settings) -> torch.nn.Module:
    """A multimodal model: its language model's settings sit in the text config."""
    text = {**TINY, "layer_types": ["full_attention"], "hidden_size_per_layer_input": 0, **text_settings}
    torch.manual_seed(0)
    config = transformers.Gemma4Config(text_config=text, vision_config=None, audio_config=None)
    return transformers.Gemma4ForConditionalGeneration(config).train()


def _batch(seed: int = 1):
    """input_ids [3, 9], a right-padded row and a prompt of ignored labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 9), generator=g)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 6:] = 0
    labels = ids.masked_fill(attention_mask == 0, -100)
    labels[0, :3] = -100
    return ids, attention_mask, labels


def _reference(model, ids, attention_mask, labels, num_items=None):
    """float64 cross-entropy of the model's own next-token logits, and every parameter's gradient."""
    logits = model(input_ids=ids, attention_mask=attention_mask).logits[:, :-1]
    targets = labels[:, 1:]
    mask = targets != -100
    logp = logits.double().log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    loss = -(logp * mask).sum() / (mask.sum() if num_items is None else num_items)
    return loss, torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)


def _check(model, patch_kwargs, num_items=None):
    """The patched model's loss and gradients against ``_reference`` on the unpatched model: to
    float64 rounding for a float64 model (the torch backend, which alone computes in float64); for
    a float32 one, where the trunk's rounding is common to both, to float32 rounding of the head."""
    ids, attention_mask, labels = _batch()
    want, want_grads = _reference(model, ids, attention_mask, labels, num_items)
    dtype = next(model.parameters()).dtype
    with patch_causal_lm_loss(model, **patch_kwargs):
        kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
        out = model(ids, attention_mask=attention_mask, labels=labels, **kwargs)
        grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
    assert out.logits is None and out.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.loss.double(), want.double(), rtol=0, atol=1e-10 if dtype == torch.float64 else 1e-6)
    for got, ref in zip(grads, want_grads):
        if ref is None:
            assert got is None
        else:
            assert got.dtype == dtype
            if dtype == torch.float64:
                torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
            else:  # relative to the whole gradient: a trunk amplifies last-bit logit differences
                assert float((got.double() - ref).norm() / ref.double().norm()) < 1e-5
    assert "forward" not in vars(model)  # restored to the class's forward


@pytest.mark.parametrize("mode", ["A", "B"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("family, settings", [
    ("Qwen2", {}),  # tied embeddings
    ("Llama", {"tie_word_embeddings": False}),
    ("Gemma2", {"final_logit_softcapping": 3.0}),  # a soft cap
    ("Granite", {"logits_scaling": 8.0}),  # divides
    ("Cohere", {"logit_scale": 0.0625}),  # multiplies
])
def test_the_loss_and_every_gradient_are_those_of_the_models_own_logits(family, settings, backend, mode):
    model = _model(family, torch.float64 if backend == "torch" else torch.float32, **settings)
    _check(model, dict(mode=mode, backend=backend))


@pytest.mark.parametrize("mode", ["A", "B"])
def test_a_multimodal_models_text_config_cap_and_num_items_in_batch(mode):
    """Gemma 4 keeps its soft cap in the text config; the Trainer's num_items_in_batch (a tensor
    or an int) divides the sum instead of the count."""
    model = _gemma4(final_logit_softcapping=2.5)
    assert logit_transform(model).softcap == 2.5
    _check(model, dict(mode=mode, backend="cpu"), num_items=torch.tensor(40))
    _check(model, dict(mode=mode, backend="cpu"), num_items=7)


@pytest.mark.parametrize("mode", ["A", "B"])
def test_activation_checkpointing_recomputes_the_trunk_under_the_patch(mode):
    """transformers' activation checkpointing recomputes each layer in the backward; the loss's
    gradients reach it as without checkpointing."""
    model = _model("Qwen2", num_hidden_layers=2)
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    _check(model, dict(mode=mode, backend="cpu"))


@pytest.mark.parametrize("patched", ["before compiling", "after compiling"])
@pytest.mark.parametrize("mode", ["A", "B"])
def test_a_compiled_patched_model_computes_the_eager_loss_and_gradients(mode, patched):
    """torch.compile of the patched model (what the Trainer's torch_compile does), or the patch of
    a compiled model (the model inside the wrapper is patched; before, the wrapper was refused as
    a BERT-style head): mode A's custom ops compile into the graph (fullgraph=True), mode B runs as
    one opaque call between the compiled trunk's graphs; the loss and every gradient are the eager
    ones."""
    from torch._dynamo.utils import counters

    ids, attention_mask, labels = _batch()
    results = []
    torch._dynamo.reset()
    counters.clear()
    for compiled in (False, True):
        model = _model("Qwen2", num_hidden_layers=2)
        if patched == "before compiling" or not compiled:
            patch_causal_lm_loss(model, mode=mode, backend="cpu")
        run = torch.compile(model, backend="aot_eager", fullgraph=mode == "A") if compiled else model
        if patched == "after compiling" and compiled:
            patch_causal_lm_loss(run, mode=mode, backend="cpu")
            assert "forward" in vars(model)
        loss = run(input_ids=ids, attention_mask=attention_mask, labels=labels).loss
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    breaks = list(counters["graph_break"])
    torch._dynamo.reset()
    if mode == "A":
        assert breaks == [] and counters["stats"]["unique_graphs"] == 1
    else:  # the one break: mode B's call, which takes a Python function
        assert len(breaks) == 1 and "fused_linear_loss" in breaks[0], breaks
    (want, want_grads), (got, grads) = results
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def _same_as_its_own_loss(model, **call):
    """The patched model's loss (cpu backend) and every parameter's gradient against the model's
    own forward on the same call, in float32; (own output, patched output)."""
    params = list(model.parameters())
    own = model(**call)
    own_grads = torch.autograd.grad(own.loss, params, allow_unused=True)
    with patch_causal_lm_loss(model, backend="cpu"):
        got = model(**call)
    grads = torch.autograd.grad(got.loss, params, allow_unused=True)
    assert got.logits is None
    torch.testing.assert_close(got.loss, own.loss, rtol=1e-6, atol=1e-6)
    for (name, _), g, w in zip(model.named_parameters(), grads, own_grads):
        if w is None:
            assert g is None, name
        else:
            assert float((g - w).norm()) <= 1e-5 * float(w.norm()) + 1e-7, name
    return own, got


@pytest.mark.parametrize("asked", ["in the config", "in the call"])
@pytest.mark.parametrize("family, settings", [
    ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    ("Qwen2Moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                      shared_expert_intermediate_size=8)),
    ("Qwen3Moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8)),
    ("Olmoe", dict(num_experts=4, num_experts_per_tok=2)),
    ("GraniteMoe", dict(num_local_experts=4, num_experts_per_tok=2)),
    ("Phimoe", dict(num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0)),
    ("GptOss", dict(num_local_experts=4, num_experts_per_tok=2, layer_types=["full_attention"])),
])
def test_an_moe_models_load_balancing_loss_is_added_as_its_own_forward_adds_it(family, settings, asked):
    """With router logits asked for (in the config, or in the call), the patched loss is the
    model's own: cross-entropy plus router_aux_loss_coef times its load-balancing loss over the
    non-padding tokens; every gradient (the routers' included) and aux_loss are its own too. The
    families are found by their forward's source, which adds the loss in the form the patch does."""
    model = _model(family, router_aux_loss_coef=0.5, **settings)
    call = {}
    if asked == "in the config":
        model.config.output_router_logits = True
    else:
        call["output_router_logits"] = True
    ids, attention_mask, labels = _batch()
    own, got = _same_as_its_own_loss(model, input_ids=ids, attention_mask=attention_mask, labels=labels, **call)
    assert float(own.aux_loss.detach()) > 0
    torch.testing.assert_close(got.aux_loss, own.aux_loss, rtol=0, atol=0)


def test_an_moe_model_whose_forward_adds_no_auxiliary_loss_is_served_with_router_logits():
    """DeepSeek-V3's forward takes output_router_logits but adds no load-balancing loss: nor does
    the patch (its source has no auxiliary loss), and the loss and gradients are the model's own."""
    model = tiny_causal_lm("deepseek_v3", n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                           moe_intermediate_size=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                           kv_lora_rank=8, q_lora_rank=8, head_dim=4, num_key_value_heads=2, num_hidden_layers=2,
                           first_k_dense_replace=1)
    ids, attention_mask, labels = _batch()
    _, got = _same_as_its_own_loss(model, input_ids=ids, attention_mask=attention_mask, labels=labels,
                                   output_router_logits=True)
    assert got.router_logits is not None and got.aux_loss is None


def test_pre_shifted_labels_are_scored_without_a_shift():
    model = _model("Qwen2")
    ids, attention_mask, labels = _batch()
    shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    with patch_causal_lm_loss(model, backend="cpu"):
        got = model(input_ids=ids, attention_mask=attention_mask, shift_labels=shift).loss
    want, _ = _reference(copy.deepcopy(model).double(), ids, attention_mask, labels)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("mode", ["A", "B"])
@pytest.mark.parametrize("how", ["bf16 weights", "autocast"])
def test_bf16_is_as_close_to_float64_as_the_models_own_loss(mode, how):
    """A bf16 model, or a float32 one under bf16 autocast (the Trainer's ``bf16=True``):
    transformers rounds its logits to bf16 and upcasts them for the loss; the op sums in float32
    from bf16 GEMMs. Against a float64 copy of the model, the patched loss and every gradient are
    within 1.25x of the error of the model's own loss (0.4-2.5% for the gradients here)."""
    dtype = torch.bfloat16 if how == "bf16 weights" else torch.float32
    model = _model("Qwen2", dtype, hidden_size=64, intermediate_size=128, head_dim=32)
    ids, attention_mask, labels = _batch()
    want, want_grads = _reference(copy.deepcopy(model).double(), ids, attention_mask, labels)
    context = (lambda: torch.autocast("cpu", torch.bfloat16)) if how == "autocast" else contextlib.nullcontext
    with context():
        own = model(input_ids=ids, attention_mask=attention_mask, labels=labels)
    own_grads = torch.autograd.grad(own.loss, list(model.parameters()))
    with patch_causal_lm_loss(model, mode=mode, backend="cpu"), context():
        got = model(input_ids=ids, attention_mask=attention_mask, labels=labels)
    grads = torch.autograd.grad(got.loss, list(model.parameters()))
    assert got.loss.dtype == torch.float32
    want = float(want.detach())
    assert abs(float(got.loss.detach()) - want) <= 1.25 * abs(float(own.loss.detach()) - want) + 1e-6

    def error(g, w):
        return float((g.double() - w).norm() / w.norm())

    for (name, _), g, o, w in zip(model.named_parameters(), grads, own_grads, want_grads):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        assert error(g, w) <= 1.25 * error(o, w), name


def test_evaluation_runs_the_models_own_forward_unless_asked():
    """Not training (or without labels) the model's own forward runs, logits and all, and generate
    is unchanged; with skip_logits=True evaluation takes the op too, and under no_grad it computes
    no gradients."""
    model = _model("Qwen2")
    ids, attention_mask, labels = _batch()
    want = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    with patch_causal_lm_loss(model, backend="cpu"):
        assert model(input_ids=ids).logits.shape == (3, 9, VOCAB)  # no labels
        torch.testing.assert_close(model.generate(ids[:1], max_new_tokens=4, do_sample=False), want)
        model.eval()
        own = model(input_ids=ids, attention_mask=attention_mask, labels=labels)
        assert own.logits.shape == (3, 9, VOCAB)
    with patch_causal_lm_loss(model, backend="cpu", skip_logits=True), torch.no_grad():
        fused = model(input_ids=ids, attention_mask=attention_mask, labels=labels)
    assert fused.logits is None and fused.loss.grad_fn is None
    torch.testing.assert_close(fused.loss, own.loss, rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", ["A", "B"])
def test_a_batch_without_labels_gives_zero_still_connected(mode):
    """transformers' mean over no label is NaN; the patch's is 0, with zero gradients."""
    model = _model("Qwen2")
    ids, attention_mask, _ = _batch()
    with patch_causal_lm_loss(model, mode=mode, backend="cpu"):
        loss = model(input_ids=ids, attention_mask=attention_mask, labels=torch.full_like(ids, -100)).loss
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_return_dict_false_gives_a_tuple():
    model = _model("Qwen2")
    ids, attention_mask, labels = _batch()
    with patch_causal_lm_loss(model, backend="cpu"):
        out = model(input_ids=ids, attention_mask=attention_mask, labels=labels, return_dict=False)
    assert isinstance(out, tuple) and out[0].ndim == 0


def test_refusals():
    """Bad options and models the op cannot compute, before any work; bad labels with the op's error."""
    model = _model("Qwen2")
    with pytest.raises(ValueError, match="mode must be 'A' or 'B'"):
        patch_causal_lm_loss(model, mode="C")
    with pytest.raises(ValueError, match="skip_logits must be None, True or False"):
        patch_causal_lm_loss(model, skip_logits="yes")
    with pytest.raises(ValueError, match="grad_order"):
        patch_causal_lm_loss(model, grad_order="rows")
    with pytest.raises(ValueError, match="not a transformers PreTrainedModel"):
        patch_causal_lm_loss(torch.nn.Linear(3, 4))
    ids, attention_mask, labels = _batch()
    with patch_causal_lm_loss(model, backend="cpu"):
        with pytest.raises(ValueError, match=r"targets.*\[0, 61\)|out of range|outside"):
            model(input_ids=ids, labels=labels.masked_fill(labels == labels.max(), VOCAB + 3))
        with pytest.raises(ValueError, match="shift_labels must match"):
            model(input_ids=ids, shift_labels=labels[:, :-2])
        with pytest.raises(TypeError, match="got 'input_ids' twice"):
            model(ids, input_ids=ids, labels=labels)
    # Doge's forward passes load_balancing_loss_func an argument more than the form the patch reproduces
    moe = tiny_causal_lm("doge", is_moe=True, num_experts=4, num_experts_per_tok=2)
    with patch_causal_lm_loss(moe, backend="cpu"):
        moe(input_ids=ids, labels=labels).loss.backward()  # no router logits asked: served
        with pytest.raises(ValueError, match="output_router_logits.*the form patch_causal_lm_loss reproduces"):
            moe(input_ids=ids, labels=labels, output_router_logits=True)


def test_a_head_that_is_not_a_plain_linear_is_refused():
    """Dory's head multiplies by a learned per-token scale in its own forward: the op would skip
    it (and never train it). The trainer's policy refuses it too."""
    from hpt_fast.policy import FusedHeadPolicy

    config = transformers.DoryConfig(**{k: v for k, v in TINY.items() if k != "head_dim"})
    model = transformers.DoryForCausalLM(config)
    for make in (patch_causal_lm_loss, FusedHeadPolicy):
        with pytest.raises(ValueError, match=r"output embedding is a \S+\.DoryLMHead, not a plain torch\.nn\.Linear"):
            make(model)


@pytest.mark.parametrize("family", sorted(READ_OTHERWISE))
def test_families_whose_head_is_read_otherwise_give_their_own_loss(family):
    """Llama 4 (its base_model is itself: the trunk is found as the head's sibling), RecurrentGemma
    and xLSTM (soft caps under other names), Inkling (hidden states divided before the head) and
    Inkling 2 (its cap a module of its own), Inkling keeping the first unpadded_vocab_size of its
    head's logits, MPT with a logit_scale its forward ignores: the patched loss and every gradient
    are the model's own."""
    model_type, settings = READ_OTHERWISE[family]
    model = tiny_causal_lm(model_type, **settings)
    transform = logit_transform(model)
    if family == "mpt":  # the config's logit_scale, which its forward ignores, is not applied
        assert model.config.logit_scale == 3.0 and transform == LogitTransform()
    else:
        assert transform != LogitTransform() or model.base_model is model
    _, _, labels = _batch()
    if transform.vocab is not None:  # ids the model's own logits can score
        labels = torch.where(labels >= 0, labels % transform.vocab, labels)
    _same_as_its_own_loss(model, input_ids=labels.clamp(min=0), labels=labels)


@pytest.mark.parametrize("model_type, settings, error", [
    ("bert", dict(is_decoder=True), r"BertLMHeadModel's output embedding is cls\.predictions\.decoder, inside 'cls'"),
    ("xlm", dict(emb_dim=16, n_layers=1, n_heads=2), r"is pred_layer\.proj, inside 'pred_layer'"),
    ("modernbert-decoder", dict(pad_token_id=0),
     r"2 children with weights beside its output embedding \(model, lm_head\), not one trunk"),
    ("inkling_text", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                          unpadded_vocab_size=70),
     r"sets unpadded_vocab_size=70: the fused head keeps that many of its head's 61 rows, so it must be an int "
     r"in \[1, 61\]"),
])
def test_a_model_whose_logits_are_not_its_trunk_through_its_head_is_refused(model_type, settings, error):
    """BERT-style prediction heads transform the trunk's states before the output embedding,
    ModernBERT's decoder has a second module between them, Inkling's unpadded_vocab_size above its
    head's rows cannot be a cut of them: the loss patch and the trainer's policy refuse them (the op
    would silently compute other logits)."""
    from hpt_fast.policy import FusedHeadPolicy

    model = tiny_causal_lm(model_type, **settings)
    for make in (patch_causal_lm_loss, FusedHeadPolicy):
        with pytest.raises(ValueError, match=error):
            make(model)


def test_a_head_applied_to_another_trunk_output_is_refused():
    """ProphetNet's causal LM applies its head to the decoder's n-gram predicting streams
    (``outputs[1]``), not its last hidden state: read from its forward's source, the loss patch and
    the trainer's policy refuse it (the policy gave log-probs 0.3 off before this check)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hpt_fast.policy import FusedHeadPolicy

    config = AutoConfig.for_model("prophetnet", hidden_size=16, num_encoder_attention_heads=2,
                                  num_decoder_attention_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                                  encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=VOCAB, ngram=2)
    model = AutoModelForCausalLM.from_config(config)
    for make in (patch_causal_lm_loss, FusedHeadPolicy):
        with pytest.raises(ValueError, match=r"ProphetNetForCausalLM\.forward applies its output embedding "
                                             r"\(lm_head\) to outputs\[1\] of its trunk's output"):
            make(model)


class _WidthScaledLlama(transformers.LlamaForCausalLM):
    """As MiniCPM's remote code does: the hidden states divided by hidden_size / dim_model_base
    before the head, under no field the fused head reads."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(hidden_states / (self.config.hidden_size / self.config.dim_model_base))
        loss = None if labels is None else self.loss_function(logits=logits, labels=labels, vocab_size=VOCAB)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


class _MupDividedLogitsLlama(transformers.LlamaForCausalLM):
    """As Phi-3-small's remote code does: the logits divided by mup_width_multiplier after the
    head, under no field the fused head reads."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = self.lm_head(outputs[0])
        logits = logits / self.config.mup_width_multiplier
        loss = None if labels is None else self.loss_function(logits=logits, labels=labels, vocab_size=VOCAB)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


class _InPlaceScaledLogitsLlama(transformers.LlamaForCausalLM):
    """The logits scaled in place (``*=``) by a field the fused head does not read."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = self.lm_head(outputs.last_hidden_state)
        logits *= self.config.output_multiplier_scale
        loss = None if labels is None else self.loss_function(logits=logits, labels=labels, vocab_size=VOCAB)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


class _MupScaledLlama(_WidthScaledLlama):
    """The same division under a field the fused head reads as the logit scale (MiniCPM3's)."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(hidden_states.to(self.lm_head.weight.dtype) / self.config.logits_scaling)
        loss = None if labels is None else self.loss_function(logits=logits, labels=labels, vocab_size=VOCAB)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


@pytest.mark.parametrize("cls, settings, error", [
    (_WidthScaledLlama, dict(dim_model_base=4), r"_WidthScaledLlama\.forward computes its output embedding's "
     r"\(lm_head\) input as hidden_states / \(self\.config\.hidden_size / self\.config\.dim_model_base\)"),
    (_MupDividedLogitsLlama, dict(mup_width_multiplier=4.0), r"_MupDividedLogitsLlama\.forward computes its logits "
     r"from its output embedding's \(lm_head\) output as logits / self\.config\.mup_width_multiplier"),
    (_InPlaceScaledLogitsLlama, dict(output_multiplier_scale=4.0), r"_InPlaceScaledLogitsLlama\.forward computes its "
     r"logits from its output embedding's \(lm_head\) output as logits \* self\.config\.output_multiplier_scale"),
])
def test_a_transform_around_the_head_is_refused_unless_the_op_applies_it(cls, settings, error):
    """A forward (remote code, say) that transforms the trunk's last hidden state before its head,
    or the head's output after it, under no field the fused head reads is refused, naming the
    expression (the op would compute the untransformed logits: 4x too large here); the same
    division by ``logits_scaling`` is served, and the patched loss and every gradient are the
    model's own (each family of transformers that scales or caps its logits passes this reading:
    ``bench/family_sweep.py``)."""
    from hpt_fast.policy import FusedHeadPolicy

    torch.manual_seed(0)
    model = cls(transformers.LlamaConfig(**TINY, **settings))
    for make in (patch_causal_lm_loss, FusedHeadPolicy):
        with pytest.raises(ValueError, match=error):
            make(model)
    torch.manual_seed(0)
    model = _MupScaledLlama(transformers.LlamaConfig(**TINY, logits_scaling=4.0))
    assert logit_transform(model).scale == 0.25
    _, _, labels = _batch()
    _same_as_its_own_loss(model, input_ids=labels.clamp(min=0), labels=labels)


class _MultipliedScalingLlama(transformers.LlamaForCausalLM):
    """Remote code that multiplies its logits by ``logits_scaling`` (as HyperCLOVA X does) under
    another model type than the families known to multiply by it (Granite and MiniCPM3 divide)."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = self.lm_head(outputs.last_hidden_state) * self.config.logits_scaling
        loss = None if labels is None else self.loss_function(logits=logits, labels=labels, vocab_size=VOCAB)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


class _UncappedTanhLlama(transformers.LlamaForCausalLM):
    """A bare tanh on the logits (a cap of 1), under no cap field the fused head reads."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = torch.tanh(self.lm_head(outputs.last_hidden_state))
        loss = None if labels is None else self.loss_function(logits=logits, labels=labels, vocab_size=VOCAB)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


class _CapFieldWithoutTanhLlama(transformers.LlamaForCausalLM):
    """A cap field read on the way to the logits without a tanh (a division, not a cap)."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = self.lm_head(outputs.last_hidden_state) / self.config.final_logit_softcapping
        loss = None if labels is None else self.loss_function(logits=logits, labels=labels, vocab_size=VOCAB)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


def _tanh_cap(values, cap=None):
    """xLSTM's cap function's signature and computation."""
    if cap is None:
        return values
    return torch.tanh(values / cap) * cap


def _clamp_cap(values, cap):
    """A cap function of that signature that clamps instead."""
    return values.clamp(-cap, cap)


def _no_cap(values, cap=None):
    """One that returns its logits as they are."""
    return values


class _Caps:
    """The cap function _CapFunctionLlama calls (a test may set another)."""

    soft_cap = staticmethod(_tanh_cap)


class _CapFunctionLlama(transformers.LlamaForCausalLM):
    """Its logits capped by a cap function handed the cap field, as xLSTM's are (by keyword here)."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = _Caps.soft_cap(self.lm_head(outputs.last_hidden_state), cap=self.config.final_logit_softcapping)
        loss = None if labels is None else self.loss_function(logits=logits, labels=labels, vocab_size=VOCAB)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


class _CappedLlama(transformers.LlamaForCausalLM):
    """Gemma 2's cap, c * tanh(z / c) with c its final_logit_softcapping, in Gemma 2's three steps."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = self.lm_head(outputs.last_hidden_state)
        if self.config.final_logit_softcapping is not None:
            logits = logits / self.config.final_logit_softcapping
            logits = torch.tanh(logits)
            logits = logits * self.config.final_logit_softcapping
        loss = None if labels is None else self.loss_function(logits=logits, labels=labels, vocab_size=VOCAB)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


@pytest.mark.parametrize("cls, settings, scale, softcap", [
    (_MultipliedScalingLlama, dict(logits_scaling=4.0), 4.0, None),
    # a field its forward never applies (transformers' MPT has logit_scale and ignores it)
    (transformers.LlamaForCausalLM, dict(logit_scale=4.0), 1.0, None),
    (transformers.LlamaForCausalLM, dict(final_logit_softcapping=2.0), 1.0, None),
    # two fields set, one applied: the one applied
    (_MultipliedScalingLlama, dict(logits_scaling=4.0, logit_scale=2.0), 4.0, None),
    (_CappedLlama, dict(final_logit_softcapping=2.0, logits_soft_cap=5.0), 1.0, 2.0),
    # a cap function handed the field, its source read
    (_CapFunctionLlama, dict(final_logit_softcapping=2.0), 1.0, 2.0),
])
def test_the_scale_and_cap_are_those_its_forward_applies(cls, settings, scale, softcap):
    """A logit scale field is applied the way the forward's source applies it (multiplied here,
    where the field's known families divide), and a scale or cap field set in the config but
    never read on the way to the logits is not applied, nor counted against the one it applies:
    the patched loss, every gradient and the policy's log-probs are the model's own (the first
    three were silent wrong results before, the last two refused)."""
    from hpt_fast.policy import FusedHeadPolicy

    torch.manual_seed(0)
    model = cls(transformers.LlamaConfig(**TINY, **settings))
    transform = logit_transform(model)
    assert (transform.scale, transform.softcap) == (scale, softcap)
    ids, attention_mask, labels = _batch()
    _same_as_its_own_loss(model, input_ids=ids, attention_mask=attention_mask, labels=labels)
    from hpt_fast.batching import Row, collate

    rows = [Row(0, ids[0, :3].tolist(), ids[0, 3:].tolist(), 1.0, False, 1.0),
            Row(1, ids[1, :2].tolist(), ids[1, 2:6].tolist(), 1.0, False, 1.0)]
    mb = collate(rows, [0, 1], pad_id=0)
    ids, attention_mask = mb.input_ids, mb.attention_mask
    with torch.no_grad():
        got = FusedHeadPolicy(model, {"backend": "torch"})(mb)
        logits = model(input_ids=ids, attention_mask=attention_mask).logits[:, :-1]
    want = logits.log_softmax(-1).gather(-1, mb.targets.clamp(min=0)[..., None])[..., 0].masked_fill(~mb.mask, 0.0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


class _TanhTimesCapLlama(transformers.LlamaForCausalLM):
    """A cap field multiplied out of a tanh it is not divided into: c * tanh(z)."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = torch.tanh(self.lm_head(outputs.last_hidden_state)) * self.config.final_logit_softcapping
        loss = None if labels is None else self.loss_function(logits=logits, labels=labels, vocab_size=VOCAB)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


class _TanhOfDividedLlama(transformers.LlamaForCausalLM):
    """A cap field divided into a tanh and not multiplied out of it: tanh(z / c)."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = torch.nn.functional.tanh(self.lm_head(outputs.last_hidden_state) / self.config.logits_soft_cap)
        loss = None if labels is None else self.loss_function(logits=logits, labels=labels, vocab_size=VOCAB)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


_OTHER_CAP_FUNCTION = r"_Caps\.soft_cap\(.*\) \(whose source does not read as c \* tanh\(z / c\)\)"


@pytest.mark.parametrize("cls, cap_function, settings, error", [
    (_UncappedTanhLlama, None, {},
     r"_UncappedTanhLlama\.forward applies a tanh to its logits under no logit soft cap field"),
    (_CapFieldWithoutTanhLlama, None, dict(final_logit_softcapping=2.0),
     r"_CapFieldWithoutTanhLlama\.forward reads final_logit_softcapping on the way to its logits without a tanh"),
    (_TanhTimesCapLlama, None, dict(final_logit_softcapping=2.0),
     r"_TanhTimesCapLlama\.forward caps its logits with final_logit_softcapping otherwise than as c \* tanh"),
    (_TanhOfDividedLlama, None, dict(logits_soft_cap=2.0),
     r"_TanhOfDividedLlama\.forward caps its logits with logits_soft_cap otherwise than as c \* tanh"),
    (_CapFunctionLlama, _clamp_cap, dict(final_logit_softcapping=2.0), _OTHER_CAP_FUNCTION),
    (_CapFunctionLlama, _no_cap, dict(final_logit_softcapping=2.0), _OTHER_CAP_FUNCTION),
])
def test_a_cap_other_than_a_cap_fields_c_tanh_z_over_c_is_refused(cls, cap_function, settings, error, monkeypatch):
    """The fused head's cap is c * tanh(logits / c) with c a cap field: a forward that caps under
    another constant, reads a cap field otherwise, arranges the tanh otherwise, or hands the field
    to a cap function (``cap_function`` as _Caps.soft_cap) whose source computes another cap or
    none, is refused by the patch and the policy."""
    from hpt_fast.policy import FusedHeadPolicy

    if cap_function is not None:
        monkeypatch.setattr(_Caps, "soft_cap", staticmethod(cap_function))
    model = cls(transformers.LlamaConfig(**TINY, **settings))
    for make in (patch_causal_lm_loss, FusedHeadPolicy):
        with pytest.raises(ValueError, match=error):
            make(model)


def test_a_label_in_the_rows_inkling_cuts_is_refused():
    """Inkling's logits keep the first unpadded_vocab_size=50 of 61 head rows: a label of 55 has
    no logit, and is refused by the op's range check (the model's own loss cannot score it either),
    not scored against a padded row."""
    from hpt_fast.batching import Row, collate
    from hpt_fast.policy import FusedHeadPolicy

    model_type, settings = READ_OTHERWISE["inkling_unpadded"]
    model = tiny_causal_lm(model_type, **settings)
    ids = torch.tensor([[3, 4, 55, 6]])
    with patch_causal_lm_loss(model, backend="cpu"), pytest.raises(ValueError, match=r"outside \[0, 50\)"):
        model(input_ids=ids, labels=ids)
    mb = collate([Row(0, [3, 4], [55, 6], 1.0, False, 1.0)], [0], pad_id=0)
    with pytest.raises(ValueError, match=r"outside \[0, 50\)"):
        FusedHeadPolicy(model)(mb)


def test_a_module_beside_the_trunk_and_head_is_served_only_as_the_configs_cap():
    """Inkling 2's soft cap is a module of its own: it is probed, and one that caps at another
    value than the config's is refused."""
    model = tiny_causal_lm("inkling2_text", final_logit_softcapping=0.5)
    assert logit_transform(model).softcap == 0.5
    model.logit_softcap = type(model.logit_softcap)(2.0)
    with pytest.raises(ValueError, match=r"\.logit_softcap \(Inkling2Softcap\) is a module beside the trunk"):
        logit_transform(model)


def test_a_model_with_a_loss_of_its_own_is_refused():
    """CpmAnt scores unshifted labels with its own CrossEntropyLoss; a loss_function set on a model
    replaces transformers' causal-LM loss: the patch reproduces that loss only."""
    cpmant = tiny_causal_lm("cpmant")
    with pytest.raises(ValueError, match="CpmAntForCausalLM.forward does not compute its loss with self.loss_function"):
        patch_causal_lm_loss(cpmant)
    model = _model("Qwen2")
    model.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.sum()
    with pytest.raises(ValueError, match="loss_function is .*not transformers' ForCausalLMLoss"):
        patch_causal_lm_loss(model)


@pytest.mark.parametrize("settings, scale, softcap", [
    ({"logits_scaling": 4.0}, 0.25, None),
    ({"logit_scale": 0.5, "final_logit_softcapping": 3.0}, 0.5, 3.0),
    ({}, 1.0, None),
])
def test_the_transform_read_from_a_config(settings, scale, softcap):
    """Where the forward's source cannot be read, the fields as their known families apply them:
    Granite-style division, a multiplier before a cap (the Muse models' order). Where it can,
    only what it applies: Qwen2's forward applies none of these fields."""
    for readable in (True, False):
        model = _model("Qwen2") if readable else unreadable_forward(_model("Qwen2"))
        for k, v in settings.items():
            setattr(model.config, k, v)
        transform = logit_transform(model)
        want = (1.0, None) if readable else (scale, softcap)
        assert (transform.scale, transform.softcap) == want
        assert transform.op_args(0.7) == {"temperature": 0.7 / want[0],
                                          "softcap": None if want[1] is None else want[1] / want[0]}


def test_a_compiled_models_head_is_read_as_the_models_own():
    """torch.compile's wrapper holds the model as a child: read as such, its head was "inside
    '_orig_mod'" (refused as a BERT-style head); the module it wraps is read instead."""
    model = _model("Granite", logits_scaling=8.0)
    compiled = torch.compile(model)
    assert logit_transform(compiled) == logit_transform(model) == LogitTransform(scale=0.125)
    assert trunk_name(compiled) == trunk_name(model) == "model"


def test_hyperclovax_multiplies_by_its_logits_scaling():
    """Its transformers forward multiplies (read from its source: the sweep); an unreadable one
    is taken to, by its model type."""
    model = unreadable_forward(_model("Qwen2"))
    model.config.logits_scaling = 4.0
    model.config.model_type = "hyperclovax"
    assert logit_transform(model).scale == 4.0
    model.config.logit_scale = 2.0
    with pytest.raises(ValueError, match="sets logits_scaling=4.0 and logit_scale=2.0"):
        logit_transform(model)
    model.config.logit_scale = -1.0
    with pytest.raises(ValueError, match="logit_scale=-1.0: a logit scale the fused head can express"):
        logit_transform(model)


def test_restore_in_the_wrong_order_is_refused():
    model = _model("Qwen2")
    first = patch_causal_lm_loss(model)
    second = patch_causal_lm_loss(model)
    with pytest.raises(RuntimeError, match="restore the patches in reverse order"):
        first.restore()
    second.restore()
    first.restore()
    assert "forward" not in vars(model)


def _trainer_run(tmp_path, patched: bool, monkeypatch) -> tuple[list[float], dict, list]:
    """Three optimizer steps of the transformers Trainer (2 sequences x 2 accumulated micro-batches
    each) on a tiny Qwen2; the logged losses, the final weights and the op's calls."""
    import hpt_fast.causal_lm_loss as causal_lm_loss
    from hpt_fast.ops import fused_linear_loss as op

    calls = []

    def counted(hidden, *args, **kwargs):
        calls.append(tuple(hidden.shape))
        return op(hidden, *args, **kwargs)

    monkeypatch.setattr(causal_lm_loss, "fused_linear_loss", counted)
    model = _model("Qwen2", tie_word_embeddings=False)
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(12):  # lengths 4-15, prompts of 1-3 ignored tokens: micro-batches of unequal size
        ids = torch.randint(0, VOCAB, (4 + (5 * i) % 12,), generator=g)
        labels = ids.clone()
        labels[: 1 + i % 3] = -100
        rows.append({"input_ids": ids, "labels": labels})

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        pad = lambda t, value: torch.nn.functional.pad(t, (0, width - len(t)), value=value)  # noqa: E731
        return {"input_ids": torch.stack([pad(r["input_ids"], 0) for r in batch]),
                "attention_mask": torch.stack([pad(torch.ones_like(r["input_ids"]), 0) for r in batch]),
                "labels": torch.stack([pad(r["labels"], -100) for r in batch])}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / ("patched" if patched else "own")), per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-2, use_cpu=True, report_to="none",
        save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    if patched:
        with patch_causal_lm_loss(model, backend="cpu"):
            trainer.train()
    else:
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, calls


def test_the_transformers_trainer_with_gradient_accumulation_trains_as_without_the_patch(tmp_path, monkeypatch):
    """The Trainer passes num_items_in_batch (the labelled tokens of all accumulated micro-batches)
    to a forward that takes **kwargs: the patched forward divides by it, so the logged losses and
    the weights after three AdamW steps equal those of the model's own loss (to float32 rounding
    through AdamW's normalisation), and every micro-batch ran through the op."""
    own_losses, own_weights, own_calls = _trainer_run(tmp_path, False, monkeypatch)
    losses, weights, calls = _trainer_run(tmp_path, True, monkeypatch)
    assert own_calls == [] and len(calls) == 6 and len(losses) == 3
    torch.testing.assert_close(losses, own_losses, rtol=1e-5, atol=1e-6)
    for name, want in own_weights.items():
        torch.testing.assert_close(weights[name], want, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_a_sharded_training_step_through_the_patch_equals_the_models_own_loss(tmp_path, strategy):
    """One step on two gloo ranks, each its own batch, of a model sharded by DeepSpeed ZeRO-3 (every
    parameter partitioned: the patch, given the engine, patches the model inside it and gathers
    the head, which never runs as a module, for mode B's forward) or FSDP2 (an untied head a unit
    of its own: the patch calls it, the op as its forward, so that FSDP2 unshards it and reduces
    its gradient), in float32 and in each one's bf16 mixed precision, untied and tied embeddings:
    the loss, the reduced gradients of every parameter and the weights after the update equal
    those of the model's own loss on both ranks (tests/sharded_head_run.py)."""
    pytest.importorskip("deepspeed")
    from sharded_head_run import compare, launch

    compare(launch(strategy, "loss", tmp_path), strategy, "loss")


@pytest.mark.parametrize("mode", ["A", "B"])
def test_an_fsdp2_head_sharded_as_a_unit_of_its_own_is_unsharded_around_the_op(one_rank_group, mode):
    """Such a head is called with the op as its forward, so FSDP2 unshards it around the op and
    hands its gradient to the sharded parameter after the backward, as around its own forward
    (before, the op got the sharded head and was refused): the loss and every parameter's
    gradient equal those of the model's own loss under the same sharding. On two ranks, with the
    reduction: test_a_sharded_training_step_through_the_patch_equals_the_models_own_loss."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1,))
    own_model, model = (_model("Llama", tie_word_embeddings=False) for _ in range(2))
    for m in (own_model, model):
        fully_shard(m.lm_head, mesh=mesh)
        fully_shard(m, mesh=mesh)
    ids, attention_mask, labels = _batch()
    own = own_model(input_ids=ids, attention_mask=attention_mask, labels=labels)
    own.loss.backward()
    with patch_causal_lm_loss(model, mode=mode, backend="cpu"):
        got = model(input_ids=ids, attention_mask=attention_mask, labels=labels)
    got.loss.backward()
    assert got.logits is None and "forward" not in vars(model.lm_head)
    torch.testing.assert_close(got.loss, own.loss, rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), own_model.parameters()):
        want = q.grad.full_tensor()
        assert float((p.grad.full_tensor() - want).norm()) <= 1e-5 * float(want.norm()), name


@pytest.mark.parametrize("when", ["before wrapping", "after wrapping"])
@pytest.mark.parametrize("mode", ["A", "B"])
def test_lora_adapters_train_through_the_patch(when, mode):
    """PEFT LoRA on the attention projections, the head frozen: the patch (on the causal LM, or
    given the PEFT model, on the one inside it) gives the model's own loss and the adapters' own
    gradients; the frozen head gets none. An adapter on lm_head is refused (the op would skip it)."""
    peft = pytest.importorskip("peft")

    def lora(model):
        config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                 init_lora_weights=False)
        torch.manual_seed(1)
        return peft.get_peft_model(model, config).train()

    ids, attention_mask, labels = _batch()
    own = lora(_model("Qwen2"))
    want = own(input_ids=ids, attention_mask=attention_mask, labels=labels).loss
    trained = [p for p in own.parameters() if p.requires_grad]
    want_grads = torch.autograd.grad(want, trained)
    if when == "before wrapping":
        inner = _model("Qwen2")
        patch = patch_causal_lm_loss(inner, mode=mode, backend="cpu")
        model = lora(inner)
    else:
        model = lora(_model("Qwen2"))
        patch = patch_causal_lm_loss(model, mode=mode, backend="cpu")
    assert patch.model is model.get_base_model()
    out = model(input_ids=ids, attention_mask=attention_mask, labels=labels)
    assert out.logits is None and not model.get_base_model().lm_head.weight.requires_grad
    grads = torch.autograd.grad(out.loss, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(out.loss, want, rtol=0, atol=1e-6)
    assert len(grads) == len(want_grads) == 4
    for g, w in zip(grads, want_grads):
        assert bool(w.abs().max() > 0)
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    patch.restore()
    on_head = peft.get_peft_model(_model("Qwen2", tie_word_embeddings=False),
                                  peft.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match=r"output embedding is a peft\.tuners\.lora\.layer\.Linear, not a plain torch"):
        patch_causal_lm_loss(on_head)


def test_a_model_wrapped_by_ddp_is_patched_inside(one_rank_group):
    """Given DDP's wrapper (refused before, as not a transformers model), the patch patches the
    model inside; the wrapper's loss and every gradient are the model's own. (A DeepSpeed engine's
    wrapper: the two-rank ZeRO-3 step, test_a_sharded_training_step_through_the_patch_...)"""
    ids, attention_mask, labels = _batch()
    plain = _model("Llama", tie_word_embeddings=False)
    plain(input_ids=ids, attention_mask=attention_mask, labels=labels).loss.backward()
    model = _model("Llama", tie_word_embeddings=False)
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    with patch_causal_lm_loss(wrapped, backend="cpu"):
        assert "forward" in vars(model)
        got = wrapped(input_ids=ids, attention_mask=attention_mask, labels=labels)
    got.loss.backward()
    assert got.logits is None and "forward" not in vars(model)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert float((p.grad - q.grad).norm()) <= 1e-5 * float(q.grad.norm()), name


def test_a_model_wrapped_by_data_parallel_is_refused():
    """nn.DataParallel replicates the model on every call, copying its forward: the patched forward,
    bound to the original, would run there; refused with the alternatives, where it was "not a
    transformers PreTrainedModel"."""
    with pytest.raises(ValueError, match=r"nn\.DataParallel's replicas cannot run the patched forward"):
        patch_causal_lm_loss(torch.nn.DataParallel(_model("Llama")))


def test_a_zero3_partitioned_model_outside_its_engine_is_gathered_for_the_loss(one_rank_group, monkeypatch):
    """A model partitioned by zero.Init (from_pretrained under DeepSpeed's config) called outside a
    DeepSpeed engine, whose hooks would gather its parameters: the patch gathers the released head
    around the op (an evaluation loss), and the loss is the plain model's."""
    deepspeed = pytest.importorskip("deepspeed")
    from hpt_fast import zero3

    monkeypatch.setenv("LOCAL_RANK", "0")
    ids, attention_mask, labels = _batch()
    plain = _model("Llama", tie_word_embeddings=False)
    with torch.no_grad():
        want = plain(input_ids=ids, attention_mask=attention_mask, labels=labels).loss
    config = {"train_batch_size": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = _model("Llama", tie_word_embeddings=False)
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
        model.load_state_dict(plain.state_dict())
    assert zero3.is_released(model.lm_head.weight)
    trunk = [p for n, p in model.named_parameters() if not n.startswith("lm_head")]
    with patch_causal_lm_loss(model, skip_logits=True, backend="cpu"), torch.no_grad():
        with deepspeed.zero.GatheredParameters(trunk):  # the trunk's modules have no engine hooks either
            got = model(input_ids=ids, attention_mask=attention_mask, labels=labels).loss
    assert zero3.is_released(model.lm_head.weight)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
