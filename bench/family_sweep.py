"""Every transformers causal-LM family through the loss patch and the trainer's policy, against its own logits.

Usage (from the repository root):
    python -m bench.family_sweep [--families llama,qwen2,...] [--router] [--train] [--timeout 60]

For each model type that transformers maps to ``AutoModelForCausalLM``, a tiny random model (the
first of its ``FAMILY_SIZES`` and ``SIZES`` that builds and computes its own loss; every logit
scale and soft cap field its config has set to ``HEAD_SCALE`` / ``HEAD_CAP``, values a default of
1 or no cap would hide) in evaluation mode (no dropout), float32, ``use_cache=False`` where its
forward takes it: ``model(input_ids, labels=labels)`` as the model
computes it and through the patch (``skip_logits=True``, the torch backend), and every
parameter's gradient; and the trainer's policy (``FusedHeadPolicy``), its log-probs of two
right-padded rows against the log-softmax of the model's own logits (within 1e-4). Each ends as:
- ``same``: for the patch, the loss within 1e-5 (relative) and every gradient within 1e-4 of the
  larger of its own largest element and 1e-3 of the model's largest (a gradient that is zero in
  exact arithmetic, such as an attention key bias's, is compared at the model's scale, not its own
  rounding's);
- ``refused``: a ``ValueError`` raised by hpt_fast (what the op cannot compute; the reason is printed);
- ``DIFFERENT``: a silent wrong result; the exit status is then 1;
- ``error``: anything else raised;
- ``not built``: no size tried built and ran the model's own loss (the reason).
With ``--router`` only the families whose config has ``output_router_logits`` run, with it on
(and ``router_aux_loss_coef`` 0.5), so that the MoE load-balancing loss is compared too; the
policy, which adds no auxiliary loss, is not run then.
With ``--train`` the models run as a trainer runs them: in training mode, every dropout
probability of the config at 0.1, an MoE router's jitter noise at 0.1, and gradient checkpointing
on where the model supports it. Each compared forward starts from the same seed, so the model's
own and the patched (or the policy's) forward draw the same masks wherever they run the same
modules in the same order; a draw after the head, or one the patch skips, shows as DIFFERENT.
"""
from __future__ import annotations

import argparse
import inspect
import signal
import sys
import traceback
import warnings
from typing import Optional

import torch

from bench.cli import cli_description

VOCAB = 256
_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
             eos_token_id=2, moe_intermediate_size=32, num_experts=4, num_local_experts=4, n_routed_experts=4,
             num_experts_per_tok=2, shared_expert_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
             kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1,
             topk_group=1, rotary_dim=8,
             n_embd=64, n_layer=2, n_head=4, d_model=64, n_positions=256, ffn_dim=128, num_layers=2, num_heads=4,
             hidden_dropout=0.0, attention_dropout=0.0)
_HEAD_DIMS = ("head_dim", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "kv_lora_rank", "q_lora_rank")
_DERIVED = {k: v for k, v in _BASE.items() if k not in _HEAD_DIMS}
# tried in order: explicit head sizes; the rotary part's (MLA models, which also need as many
# key/value heads as query heads); sizes the config derives; more layers, for hybrid models whose
# first layers have no attention
SIZES = (_BASE, {**_BASE, "head_dim": 8, "num_key_value_heads": 4}, _DERIVED,
         {**_BASE, "num_hidden_layers": 4, "num_layers": 4}, {**_DERIVED, "num_hidden_layers": 8, "num_layers": 8},
         {**_BASE, "num_key_value_heads": 4})
# an encoder-decoder's sizes, for its decoder-only causal LM
_ENC_DEC = dict(d_model=64, encoder_attention_heads=4, decoder_attention_heads=4, encoder_layers=1, decoder_layers=2,
                encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
# one of BLT's four parts (its defaults are full-size: over a minute to build)
_BLT_PART = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=128)
# families none of SIZES builds, tried first: their own names for the sizes, or validated layouts
FAMILY_SIZES = {
    "blt": dict(vocab_size=260, max_position_embeddings=256, encoder_hash_byte_group_vocab=512,
                encoder_hash_byte_group_size=[3, 4], local_attention_window_len=64, pad_token_id=0, bos_token_id=1,
                eos_token_id=2, patcher_config=_BLT_PART, global_config=dict(_BLT_PART, num_hidden_layers=2),
                encoder_config=dict(_BLT_PART, hidden_size_global=64),
                decoder_config=dict(_BLT_PART, hidden_size_global=64)),
    "cohere_compass_text": dict(_BASE, rope_parameters={kind: dict(rope_type="default", rope_theta=10000.0)
                                                        for kind in ("full_attention", "sliding_attention")}),
    "dbrx": dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=256, vocab_size=VOCAB,
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=128, moe_num_experts=4, moe_top_k=2)),
    "dots3_note": dict(_BASE, num_key_value_heads=4, vision_config=dict(adapter_out_dim=64),
                       audio_config=dict(adapter_out_dim=64)),
    "gemma3n_text": dict(_BASE, num_hidden_layers=4, num_kv_shared_layers=0, hidden_size_per_layer_input=16,
                         layer_types=["sliding_attention", "full_attention"] * 2, vocab_size_per_layer_input=VOCAB,
                         laurel_rank=8, activation_sparsity_pattern=[0.0] * 4),
    "gpt_neo": dict(num_layers=2, attention_types=[[["global", "local"], 1]], hidden_size=64, num_heads=4,
                    vocab_size=VOCAB, max_position_embeddings=256),
    "granitemoehybrid": dict(_BASE, layer_types=["mamba", "attention"], mamba_n_heads=8, mamba_d_head=16,
                             mamba_n_groups=1, mamba_d_state=16, mamba_expand=2),
    "lfm2_moe": dict(_BASE, num_dense_layers=1, layer_types=["full_attention", "conv"]),
    "mamba2": dict(hidden_size=64, num_heads=8, head_dim=16, expand=2, n_groups=1, num_hidden_layers=2,
                   vocab_size=VOCAB, state_size=16),
    "plbart": dict(_ENC_DEC, max_position_embeddings=256),
    "prophetnet": dict(hidden_size=64, num_encoder_attention_heads=4, num_decoder_attention_heads=4,
                       num_encoder_layers=1, num_decoder_layers=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
                       vocab_size=VOCAB, max_position_embeddings=256, ngram=2),
    # in training mode Reformer takes only sequences as long as axial_pos_shape's product (the
    # sweep's 12 tokens); in evaluation mode its reversible layers cannot backpropagate at all
    "reformer": dict(is_decoder=True, hidden_size=64, num_attention_heads=4, attention_head_size=16,
                     feed_forward_size=128, vocab_size=VOCAB, max_position_embeddings=12, axial_pos_shape=[3, 4],
                     axial_pos_embds_dim=[32, 32], attn_layers=["local", "lsh"], local_attn_chunk_length=4,
                     lsh_attn_chunk_length=4, pad_token_id=0, eos_token_id=2),
    "whisper": dict(_ENC_DEC, max_target_positions=256, decoder_start_token_id=1),
    "xlnet": dict(d_model=64, n_layer=2, n_head=4, d_inner=128, vocab_size=VOCAB),
    "xmod": dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128, vocab_size=VOCAB,
                 max_position_embeddings=256, pad_token_id=0, is_decoder=True, languages=["en_XX"],
                 default_language="en_XX"),
    "zamba2": dict(_BASE, layers_block_type=["mamba", "hybrid"], mamba_headdim=16, n_mamba_heads=8, mamba_ngroups=1),
    "zaya": dict(_BASE, num_experts_per_tok=1),
}


class _Timeout(BaseException):
    """A family over ``--timeout``: a BaseException, so that the per-size ``except Exception`` lets it through."""


def _on_alarm(*_: object) -> None:
    raise _Timeout()


class _NoRouter(Exception):
    """``--router`` and a config without ``output_router_logits``: not an MoE family."""


DROPOUT = 0.1
_SEED, _OTHER_SEED = 2, 3  # every compared forward's; the one that shows the draws matter


# draws a family's model refuses to be built with (DiffLlama has no attention dropout)
_REFUSED_DRAWS = {"diffllama": ("attention_dropout",)}


def _set_if_allowed(config: object, key: str, value: float) -> None:
    """``config.key = value``, unless the config refuses it: a field declared int, which no
    probability can be set to (MPT's attn_pdrop), or a derived property (MiniCPM3's logits_scaling)."""
    from huggingface_hub.errors import StrictDataclassError

    try:
        setattr(config, key, value)
    except (AttributeError, StrictDataclassError):
        pass


def _randomise(config: object, model_type: str) -> None:
    """``--train``'s random draws: every dropout probability (``*dropout*``, ``*pdrop*``) and an MoE
    router's jitter noise at 0.1, in ``config`` (the text config or the whole one) and in each
    config nested in it (BLT keeps its dropout in its parts' configs)."""
    from transformers import PretrainedConfig

    for key, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig):
            _randomise(value, model_type)
        elif (("dropout" in key or "pdrop" in key or "jitter" in key) and isinstance(value, (int, float))
                and not isinstance(value, bool) and key not in _REFUSED_DRAWS.get(model_type, ())):
            _set_if_allowed(config, key, DROPOUT)


# what the sweep sets the logit scale and cap fields a config has to: values their defaults (a scale
# of 1, no cap) would hide, a cap that bites on a tiny random model's logits
HEAD_SCALE, HEAD_CAP = 3.0, 2.0


def _exercise_head_fields(config: object, text: object) -> None:
    """Set every logit scale and soft cap field (``hpt_fast.logit_head``) that ``config`` or its text
    config has to ``HEAD_SCALE`` / ``HEAD_CAP``, so that a field the model applies, or has but does
    not apply, shows in its row; one that cannot be set (MiniCPM3's derived ``logits_scaling``)
    keeps its value."""
    from hpt_fast.logit_head import CAP_FIELDS, SCALE_FIELDS

    for each in {id(c): c for c in (config, text)}.values():
        for fields, value in ((SCALE_FIELDS, HEAD_SCALE), (CAP_FIELDS, HEAD_CAP)):
            for name in fields:
                if hasattr(each, name):
                    _set_if_allowed(each, name, value)


def _seeded(fn, *args, seed: int = _SEED, **kwargs):  # noqa: ANN001, ANN202 - a forward under a fixed seed
    torch.manual_seed(seed)
    return fn(*args, **kwargs)


def _build(model_type: str, router: bool, train: bool) -> tuple[torch.nn.Module, dict, torch.Tensor, tuple]:
    """A tiny model of ``model_type``, its call's kwargs, its own loss and its parameters' gradients
    of it (None where unused); raises what the family's own size raised, else the last size's error."""
    from transformers import AutoConfig, AutoModelForCausalLM

    error: Optional[Exception] = None
    for sizes in ((FAMILY_SIZES[model_type],) if model_type in FAMILY_SIZES else ()) + SIZES:
        try:
            config = AutoConfig.for_model(model_type, **sizes)
            text = config.get_text_config()
            for key, value in sizes.items():  # a multimodal model's language model
                if text is not config and hasattr(text, key):
                    setattr(text, key, value)
            _exercise_head_fields(config, text)
            if router:
                if not hasattr(text, "output_router_logits"):
                    raise _NoRouter()
                text.output_router_logits = True
                if hasattr(text, "router_aux_loss_coef"):  # the default 0.001 would hide little in the loss
                    text.router_aux_loss_coef = 0.5
            if train:
                for each in {id(c): c for c in (config, text)}.values():
                    _randomise(each, model_type)
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).train(train)
            if train and model.supports_gradient_checkpointing:
                model.gradient_checkpointing_enable()
            head = model.get_output_embeddings()
            vocab = min(VOCAB, head.weight.shape[0]) if head is not None else VOCAB
            ids = torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
            labels = ids.masked_fill(torch.arange(12) < 3, -100)  # a prompt
            call = {"input_ids": ids, "labels": labels}
            if "use_cache" in inspect.signature(model.forward).parameters:
                call["use_cache"] = False
            own = _seeded(model, **call).loss
            if own is None:
                raise ValueError("its forward gives no loss")
            own_grads = torch.autograd.grad(own, [p for p in model.parameters() if p.requires_grad],
                                            allow_unused=True)
            # the policy's batches are right-padded: a size whose forward fails under a padding
            # mask is the size's fault, not the policy's
            with torch.no_grad():
                model(input_ids=ids, attention_mask=(torch.arange(12) < 9).long().expand(2, 12),
                      **{k: v for k, v in call.items() if k == "use_cache"})
            return model, call, own.detach(), own_grads
        except _NoRouter:  # the config class has no router logits at any size: not an MoE family
            raise
        except Exception as exc:  # noqa: BLE001 - the next size may build
            error = exc if error is None or model_type not in FAMILY_SIZES else error
    assert error is not None
    raise error


def _outcome_of_failure(exc: Exception) -> tuple[str, str]:
    """``refused`` for a ValueError hpt_fast raised (its innermost frame in the package), else ``error``."""
    frames = traceback.extract_tb(exc.__traceback__)
    if isinstance(exc, ValueError) and frames and "/hpt_fast/" in frames[-1].filename.replace("\\", "/"):
        return "refused", str(exc).splitlines()[0][:200]
    return "error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


def _patch_check(model: torch.nn.Module, call: dict, own: torch.Tensor, own_grads: tuple) -> tuple[str, str]:
    """The loss patch's loss and every gradient against the model's own."""
    from hpt_fast.causal_lm_loss import patch_causal_lm_loss

    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    try:
        with patch_causal_lm_loss(model, skip_logits=True, backend="torch"):
            out = _seeded(model, **call)
            grads = torch.autograd.grad(out.loss, params, allow_unused=True)
    except Exception as exc:  # noqa: BLE001 - reported, not raised: one family's failure is a row
        return _outcome_of_failure(exc)
    loss_error = abs(float(out.loss) - float(own)) / max(abs(float(own)), 1e-12)
    largest = max(float(g.abs().max()) for g in own_grads if g is not None)
    worst, worst_name = 0.0, ""
    for name, param, want, got in zip(names, params, own_grads, grads):
        want = torch.zeros_like(param) if want is None else want
        got = torch.zeros_like(param) if got is None else got
        error = float((got - want).abs().max()) / max(float(want.abs().max()), 1e-3 * largest)
        if error > worst:
            worst, worst_name = error, name
    detail = f"loss {float(own):.6f} / {float(out.loss):.6f} (rel {loss_error:.1e}), worst gradient {worst:.1e} ({worst_name})"
    return ("same" if loss_error < 1e-5 and worst < 1e-4 else "DIFFERENT"), detail


def _policy_check(model: torch.nn.Module, call: dict) -> tuple[str, str]:
    """The trainer's policy (``FusedHeadPolicy``): its log-probs of two right-padded rows against
    the log-softmax of the model's own logits."""
    from hpt_fast.batching import Row, collate
    from hpt_fast.policy import FusedHeadPolicy

    ids = call["input_ids"].tolist()
    rows = [Row(0, ids[0][:3], ids[0][3:], 1.0, False, 1.0), Row(1, ids[1][:4], ids[1][4:9], 1.0, False, 1.0)]
    mb = collate(rows, [0, 1], pad_id=0)
    extra = {"use_cache": False} if "use_cache" in call else {}
    try:
        with torch.no_grad():
            got = _seeded(FusedHeadPolicy(model), mb)
            logits = _seeded(model, input_ids=mb.input_ids, attention_mask=mb.attention_mask, **extra).logits[:, :-1]
    except Exception as exc:  # noqa: BLE001
        return _outcome_of_failure(exc)
    want = logits.float().log_softmax(-1).gather(-1, mb.targets.clamp(min=0)[..., None]).squeeze(-1)
    error = float((got - want.masked_fill(~mb.mask, 0.0)).abs().max())
    return ("same" if error < 1e-4 else "DIFFERENT"), f"log-probs within {error:.1e}"


def check_family(model_type: str, router: bool = False, train: bool = False) -> Optional[tuple[str, str, str, str]]:
    """(the loss patch's outcome, detail, the trainer policy's outcome, detail) of ``model_type``
    (see the module docstring); None for a family without router logits under ``router``, where
    the policy (which adds no auxiliary loss) is not run."""
    try:
        model, call, own, own_grads = _build(model_type, router, train)
    except _NoRouter:
        return None
    except Exception as exc:  # noqa: BLE001 - reported, not raised: one family's failure is a row
        return "not built", f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}", "", ""
    patch = _patch_check(model, call, own, own_grads)
    if train and patch[0] != "refused":  # how far the draws move the loss: 0 would make this an eval-mode check
        with torch.no_grad():
            moved = abs(float(_seeded(model, **call, seed=_OTHER_SEED).loss) - float(own))
        patch = patch[0], f"{patch[1]}; another seed moves it by {moved:.1e}"
    return patch + (("", "") if router else _policy_check(model, call))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=cli_description(__doc__))
    parser.add_argument("--families", default="", help="comma-separated model types (default: every causal-LM one)")
    parser.add_argument("--router", action="store_true", help="MoE families only, with router logits on")
    parser.add_argument("--train", action="store_true",
                        help="training mode: dropout and router jitter 0.1, gradient checkpointing on")
    parser.add_argument("--timeout", type=int, default=60, help="seconds per family (default 60)")
    args = parser.parse_args(argv)
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    every = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    families = [f for f in args.families.split(",") if f] or every
    unknown = [f for f in families if f not in every]
    if unknown:
        parser.error(f"--families: {unknown} are not causal-LM model types of transformers {transformers.__version__}")
    if args.timeout <= 0:
        parser.error(f"--timeout must be > 0, got {args.timeout}")
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_default_handler()  # configs refusing a size print themselves whole
    signal.signal(signal.SIGALRM, _on_alarm)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}; {len(families)} families"
          f"{' (those whose config has output_router_logits, with it on)' if args.router else ''}"
          f"{'; training mode, dropout and router jitter ' + str(DROPOUT) + ', gradient checkpointing' if args.train else ''}\n")
    print("| family | loss patch | detail | trainer's policy | detail |\n| --- | --- | --- | --- | --- |")
    counts: dict[str, dict[str, int]] = {"loss patch": {}, "trainer's policy": {}}
    for family in families:
        signal.alarm(args.timeout)
        try:
            row = check_family(family, args.router, args.train)
        except _Timeout:
            row = "not built", f"over {args.timeout} s", "", ""
        finally:
            signal.alarm(0)
        if row is None:
            continue
        for column, outcome in zip(counts, row[::2]):
            if outcome:
                counts[column][outcome] = counts[column].get(outcome, 0) + 1
        print("| " + " | ".join([family] + [cell.replace("|", "/") for cell in row]) + " |", flush=True)
    print()
    for column, tally in counts.items():
        if tally:
            print(f"{column}: " + ", ".join(f"{n} {o}" for o, n in sorted(tally.items())))
    return 1 if any(tally.get("DIFFERENT") for tally in counts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
