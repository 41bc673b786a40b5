"""The trainer in process, on the embedded toy task: which policy gives log pi_old when a step makes
several optimizer updates, how the loss's statistics merge over micro-batches and updates, the
model's mode, validation over ranks, and data the run cannot train on."""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist

from hpt_fast import train
from hpt_fast.batching import MicroBatch
from hpt_fast.checkpoint import latest_checkpoint
from hpt_fast.config import ConfigError, load_config
from hpt_fast.data import DataError, render_prompt
from hpt_fast.reward import Scores
from hpt_fast.rollout import end_token_ids
from hpt_fast.step_stats import StepStats
from hpt_fast.toy import build_toy, default_toy_dir, use_toy
from hpt_fast.trainer import Trainer, _grad_norm, _load_tokenizer
from tiny_models import READ_OTHERWISE, tiny_causal_lm, unreadable_forward

# 4 prompts x 2 rollouts of at most 24 tokens, as tests/test_trainer.py
SMALL = ["train.prompts_per_step=4", "rollout.n=2", "data.max_response_length=24", "validation.every=0",
         "train.total_steps=1", "optim.warmup_steps=0"]
MakeTrainer = Callable[..., Trainer]  # the make_trainer fixture: overrides -> a Trainer


@pytest.fixture(scope="module", autouse=True)
def _own_process_group():
    """A trainer in this process joins a one-process group and sets the launcher's variables
    (WORLD_SIZE, MASTER_PORT, ...) in os.environ; undo both afterwards, or the subprocesses of
    later tests would inherit them and try to listen on the port this process holds."""
    saved = dict(os.environ)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def make_trainer(tmp_path):
    made = []

    def make(*overrides: str) -> Trainer:
        cfg = use_toy(load_config(None, [f"train.output_dir={tmp_path / 'run'}", *SMALL, *overrides]))
        made.append(Trainer(cfg))
        return made[-1]

    yield make
    for trainer in made:
        trainer.close()


def _rewards(trainer: Trainer, per_prompt: list[list[float]]) -> None:
    """Make the verifier return ``per_prompt[p][s]`` for rollout s of prompt p of the step."""
    flat = np.asarray(per_prompt, dtype=np.float32).reshape(-1)

    def score(texts, truths):
        assert len(texts) == flat.size
        return Scores(rewards=flat.copy(), outcomes=tuple("match" if r else "wrong" for r in flat))

    trainer.rewards.score = score


def _spy_updates(trainer: Trainer) -> list[tuple[list, list]]:
    """Record the (micro-batches, log pi_old) each optimizer update of the trainer is given."""
    seen, update = [], trainer._update

    def spy(rule, mbs, old, stats):
        seen.append((mbs, old))
        return update(rule, mbs, old, stats)

    trainer._update = spy
    return seen


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recomputed_old_logprobs_are_those_of_the_policy_that_sampled(make_trainer, temperature):
    """Two updates per step: the second update's pi_old must be the sampling policy, not the one the
    first update left (which made every ratio exactly 1 and switched clipping off)."""
    # also at a temperature other than 1, so a recompute at the wrong temperature shows
    trainer = make_trainer("algorithm.method=grpo", "train.mini_batch_prompts=2", "rollout.old_logprobs=recompute",
                           "optim.lr=0.05", f"rollout.temperature={temperature}")
    _rewards(trainer, [[1, 0], [0, 1], [1, 0], [0, 1]])
    seen = _spy_updates(trainer)
    metrics = trainer.train_step()
    assert len(seen) == 2
    for mbs, old in seen:
        for mb, o in zip(mbs, old):
            # the native engine samples in float32: its log-probs are the sampling policy's
            rollout = mb.mask & ~mb.off_policy[:, None]
            assert rollout.any()
            torch.testing.assert_close(o[rollout], mb.sample_logprobs[rollout], atol=1e-4, rtol=0)
    # the first update moved the policy, so the second one's ratios are not all 1
    assert abs(metrics["ratio_mean"] - 1.0) > 1e-6 and metrics["approx_kl"] != 0.0


@pytest.mark.parametrize("family", ["gemma2", "granite"])
def test_a_model_that_transforms_its_logits_trains_end_to_end(make_trainer, tmp_path, family):
    """A model given by model.path whose logits are not lm_head(hidden): a Gemma 2 (sliding-window
    layers, attention and final logit soft caps) or a Granite (logits divided by logits_scaling).
    The native engine's log-probs of its rollouts (longer than Gemma's window) are those the fused
    head (with the cap, or the scale in its temperature) recomputes as pi_old, and a GRPO step trains."""
    import transformers

    from hpt_fast.toy import build_tokenizer

    tok = build_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, initializer_range=0.5,
                  max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    if family == "gemma2":
        config = transformers.Gemma2Config(**common, sliding_window=4, attn_logit_softcapping=1.0,
                                           final_logit_softcapping=1.0)
        model_class = transformers.Gemma2ForCausalLM
    else:
        config = transformers.GraniteConfig(**common, logits_scaling=0.25)
        model_class = transformers.GraniteForCausalLM
    torch.manual_seed(0)
    lm = model_class(config)
    ids = torch.tensor([[tok.bos_token_id, 5, 6, 7]])
    with torch.no_grad():  # the cap or the scale shows in the logits
        head = lm.get_output_embeddings()(lm.get_decoder()(input_ids=ids).last_hidden_state)
        assert float((lm(ids).logits - head).abs().max()) > 0.1
    lm.save_pretrained(tmp_path / family)
    trainer = make_trainer(f"model.path={tmp_path / family}", "model.tokenizer=toy", "algorithm.method=grpo",
                           "rollout.old_logprobs=recompute", "train.mini_batch_prompts=2")
    _rewards(trainer, [[1, 0], [0, 1], [1, 0], [0, 1]])
    seen = _spy_updates(trainer)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.train_step()
    mb, old = seen[0][0][0], seen[0][1][0]
    if family == "gemma2":
        assert int(mb.mask.sum(-1).max()) > 2 * config.sliding_window
    # the engine's cached decoding against the full recompute, in float32: Granite's logits are 4x
    # larger here (log-probs down to -6.5), so its rounding is too
    torch.testing.assert_close(old[mb.mask], mb.sample_logprobs[mb.mask], atol=1e-4, rtol=1e-4)
    assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(trainer.model.parameters(), before))


def test_the_gates_rows_reach_the_micro_batches_with_their_advantages(make_trainer):
    """HPT at gamma 0: prompt 0 (no rollout right) trains on its demonstration (advantage 1), the
    others on their rollouts with r - mean of their group; each row keeps its own reward."""
    trainer = make_trainer("algorithm.method=hpt")
    _rewards(trainer, [[0, 0], [1, 1], [1, 0], [0, 1]])
    seen = _spy_updates(trainer)
    metrics = trainer.train_step()
    # the loss parts add up to the step's loss
    assert metrics["loss"] == pytest.approx(metrics["rl_loss"] + metrics["sft_loss"] + metrics["entropy_loss"], rel=1e-5)
    got = sorted((bool(off), float(adv), float(r)) for mbs, _ in seen for mb in mbs
                 for off, adv, r in zip(mb.off_policy, mb.advantages, mb.rewards))
    want = sorted([(True, 1.0, 1.0), (False, 0.0, 1.0), (False, 0.0, 1.0)] + [(False, 0.5, 1.0), (False, -0.5, 0.0)] * 2)
    assert got == want


def test_updates_with_and_without_rollouts_merge_their_statistics(make_trainer):
    """HPT, two updates: the first one's prompts all go to SFT, so only the second has ratio statistics
    (this raised KeyError); the step's are the second update's."""
    trainer = make_trainer("algorithm.method=hpt", "train.mini_batch_prompts=2")
    _rewards(trainer, [[0, 0], [0, 0], [1, 0], [0, 1]])
    seen = _spy_updates(trainer)
    metrics = trainer.train_step()
    assert [bool(mb.off_policy.all()) for mbs, _ in seen for mb in mbs] == [True] * len(seen[0][0]) + [False] * len(seen[1][0])
    assert metrics["sft_fraction"] == 0.5
    # demonstration rows: prompts 0 and 1; rollout rows: 2 per RL prompt
    assert metrics["batch_sft_fraction"] == pytest.approx(2 / 6)
    assert 0.0 <= metrics["clip_fraction"] <= 1.0 and metrics["ratio_max"] >= metrics["ratio_mean"] > 0.0


def test_ratio_statistics_are_over_rollout_tokens_only(make_trainer):
    """One update (ratio exactly 1) whose demonstrations get micro-batches of their own: those add
    no rollout tokens, so ratio_mean and ratio_max stay 1 (they were averaged down to 2/3)."""
    trainer = make_trainer("algorithm.method=hpt", "deepspeed.micro_batch_tokens=100")
    _rewards(trainer, [[0, 0], [0, 0], [1, 0], [0, 1]])
    seen = _spy_updates(trainer)
    metrics = trainer.train_step()
    (mbs, old), = seen
    assert old == [None] * len(mbs) and any(bool(mb.off_policy.all()) for mb in mbs)
    assert metrics["ratio_mean"] == 1.0 and metrics["ratio_max"] == 1.0 and metrics["clip_fraction"] == 0.0
    assert metrics["batch_sft_fraction"] == pytest.approx(2 / 6)


def test_gradient_checkpointing_runs_in_training(make_trainer):
    """from_pretrained returns eval mode, where transformers skips checkpointing: the trainer trains
    in train mode, and each decoder layer's forward is checkpointed."""
    trainer = make_trainer("model.gradient_checkpointing=true", "algorithm.method=sft")
    assert trainer.model.training
    layers = trainer.model.get_decoder().layers
    assert all(layer.gradient_checkpointing for layer in layers)
    calls = []
    for layer in layers:
        inner = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, _f=inner, **k: calls.append(1) or _f(*a, **k)
    trainer.train_step()
    assert len(calls) >= len(layers) and trainer.model.training


def _toy_train_file(tmp_path, rows: int = 3200, null_targets: bool = False, drop_target: bool = False):
    table = pq.read_table(build_toy(default_toy_dir()).train).slice(0, rows)
    i = table.schema.get_field_index("target")
    if drop_target:
        table = table.remove_column(i)
    elif null_targets:  # all but the last row's (a file with none at all is refused)
        kept = table.column(i).slice(rows - 1)
        nulls = pa.nulls(table.num_rows - 1, table.schema.field("target").type)
        table = table.set_column(i, "target", pa.concat_arrays([nulls, kept.combine_chunks()]))
    path = tmp_path / "train.parquet"
    pq.write_table(table, path)
    return f"data.train_files=[{path}]"


@pytest.mark.parametrize("method", ["sft", "hpt", "luffy", "sft_then_rl"])
def test_a_method_with_demonstrations_needs_the_target_column(make_trainer, tmp_path, method):
    extra = ["algorithm.sft_steps=1"] if method == "sft_then_rl" else []
    with pytest.raises(DataError, match="target"):
        make_trainer(f"algorithm.method={method}", *extra, _toy_train_file(tmp_path, drop_target=True))


def test_an_update_without_any_row_makes_no_step(make_trainer, tmp_path):
    """SFT on prompts that all lack a demonstration: no rows, so no backward and no optimizer step
    (DeepSpeed's step without gradients raised IndexError)."""
    trainer = make_trainer("algorithm.method=sft", "data.shuffle=false", _toy_train_file(tmp_path, rows=64, null_targets=True))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.train_step()
    assert "loss" not in metrics and metrics["train_tokens"] == 0 and metrics["sft_fraction"] == 0.0
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


def test_fewer_prompts_than_a_step_is_a_data_error(make_trainer, tmp_path):
    with pytest.raises(DataError, match=r"3 prompts fit data.max_prompt_length .*fewer than train.prompts_per_step = 4"):
        make_trainer(_toy_train_file(tmp_path, rows=3))


def test_two_validation_files_with_one_name_are_a_data_error(make_trainer, tmp_path):
    val = build_toy(default_toy_dir()).validation["toy-add1"]
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        shutil.copy(val, tmp_path / d / "X.json")
    with pytest.raises(DataError, match="benchmark name 'X' is shared by"):
        make_trainer("validation.every=1", f"validation.files=[{tmp_path / 'a/X.json'}, {tmp_path / 'b/X.json'}]")


def test_validation_scores_every_problem_once_over_the_ranks(make_trainer, tmp_path):
    """A 10-problem set over 3 ranks: each rank generates 4 prompts (lockstep), and the problems
    scored over the ranks are the set's, each once (the last 10 % 3 were left out)."""
    problems = json.loads(build_toy(default_toy_dir()).validation["toy-add1"].read_text())[:10]
    path = tmp_path / "ten.json"
    path.write_text(json.dumps(problems))
    trainer = make_trainer("validation.every=1", f"validation.files=[{path}]", "validation.n=1")
    scored, generated = Counter(), []
    trainer.rewards.score = lambda texts, truths: scored.update(truths) or Scores(
        rewards=np.ones(len(texts), dtype=np.float32), outcomes=("match",) * len(texts))
    generate = trainer.rollout.generate
    trainer.rollout.generate = lambda prompts, **kw: generated.append(len(prompts)) or generate(prompts, **kw)
    trainer.world = 3
    for rank in range(3):
        trainer.rank = rank
        assert trainer.validate() == {"val/ten/avg@1": 1.0, "val/ten/pass@1": 1.0}
    assert generated == [4, 4, 4]
    assert scored == Counter(str(p["answer"]) for p in problems)


def test_a_tokenizer_without_a_pad_token_pads_with_eos(tmp_path):
    tokenizer = _load_tokenizer(str(build_toy(default_toy_dir()).model), False)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    loaded = _load_tokenizer(str(tmp_path), False)
    assert loaded.pad_token_id == loaded.eos_token_id is not None


def test_rollouts_stop_on_the_generation_configs_end_of_turn_too(make_trainer, tmp_path):
    """A chat model's end-of-turn token listed only in its generation config ends training rollouts
    as it ends evaluation's, instead of a response running past it."""
    model_dir = tmp_path / "model"
    shutil.copytree(build_toy(default_toy_dir()).model, model_dir)
    config = json.loads((model_dir / "generation_config.json").read_text())
    eos = config["eos_token_id"]
    (model_dir / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [eos, 7]}))
    trainer = make_trainer(f"model.path={model_dir}")
    assert trainer.tokenizer.eos_token_id == eos and trainer.stop_token_ids == sorted({eos, 7})
    seen = []
    generate = trainer.rollout.generate
    trainer.rollout.generate = lambda prompts, **kw: seen.append(kw["stop_token_ids"]) or generate(prompts, **kw)
    trainer.train_step()
    assert seen == [sorted({eos, 7})]


def test_end_token_ids():
    tok = SimpleNamespace(eos_token_id=5)
    assert end_token_ids(tok, None) == [5]
    assert end_token_ids(tok, SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None))) == [5]
    assert end_token_ids(tok, SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=9))) == [5, 9]
    assert end_token_ids(tok, SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[9, 5, 2]))) == [2, 5, 9]


@pytest.mark.parametrize("family, settings", [
    ("Granite", {"logits_scaling": 8.0}),
    ("Cohere", {"logit_scale": 0.0625}),
    ("FalconH1", {"lm_head_multiplier": 0.5}),
])
def test_a_model_that_scales_its_logits_after_the_head_is_trained_on_them(family, settings):
    """Granite divides its logits by logits_scaling, Cohere and Falcon-H1 multiply them: the fused
    head takes the scale into its temperature, so the policy's log-probs, loss and gradients are
    those of the model's own logits, which differ from lm_head(hidden)'s."""
    import transformers

    tiny = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(getattr(transformers, f"{family}Config")(**tiny, **settings))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        head = model.get_output_embeddings()(model.get_decoder()(input_ids=ids).last_hidden_state)
        assert not torch.allclose(model(ids).logits, head, atol=1e-3)
    _policy_matches_the_model(model, temperature=0.7)


@pytest.mark.parametrize("family", sorted(READ_OTHERWISE))
def test_families_whose_head_is_read_otherwise_are_trained_on_their_own_logits(family):
    """Llama 4 (its get_decoder() is the model itself: the policy runs the head's sibling),
    RecurrentGemma and xLSTM (soft caps under other names), Inkling (hidden states divided before
    the head, or its logits cut to unpadded_vocab_size), Inkling 2 (its cap a module of its own),
    MPT (a logit_scale its forward ignores)."""
    model_type, settings = READ_OTHERWISE[family]
    _policy_matches_the_model(tiny_causal_lm(model_type, **settings), temperature=0.7)


def _gemma4(**text_settings):
    """A tiny Gemma 4 (a multimodal model: its language model's settings sit in the text config)."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, layer_types=["full_attention"], hidden_size_per_layer_input=0,
                final_logit_softcapping=None)
    text.update(text_settings)
    torch.manual_seed(0)
    return Gemma4ForConditionalGeneration(Gemma4Config(text_config=text, vision_config=None, audio_config=None))


def test_a_scale_in_the_text_config_is_read_from_there() -> None:
    """A logit scale set in the text sub-config (``get_text_config()``) is the fused head's as a
    top-level one is (Granite 4 Vision divides by its text config's logits_scaling), under a
    forward that applies it (Gemma 4's does not: read from an unreadable one, as its family does)."""
    from hpt_fast.logit_head import logit_transform

    model = unreadable_forward(_gemma4())
    model.config.get_text_config().logits_scaling = 8.0
    assert not hasattr(model.config, "logits_scaling")  # the sub-config alone holds it
    assert logit_transform(model).scale == 1 / 8


def _policy_matches_the_model(lm, temperature: float) -> None:
    """The policy's log-probs, GRPO loss and head gradients are those of the model's own logits
    (log_softmax(logits / T) of its forward), whatever it does to them after lm_head."""
    from hpt_fast.batching import Row, collate
    from hpt_fast.estimator import get_estimator
    from hpt_fast.logit_head import logit_transform
    from hpt_fast.loss import FusedUnifiedLoss
    from hpt_fast.policy import FusedHeadPolicy

    policy = FusedHeadPolicy(lm)
    head = lm.get_output_embeddings()
    rows = [Row(0, [1, 2, 3], [4, 5, 6, 7], 1.0, False, 1.0), Row(1, [9, 8], [7], -0.5, False, 0.0)]
    mb = collate(rows, [0, 1], pad_id=0)
    logits = lm(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, :-1] / temperature
    logprobs = logits.log_softmax(-1)
    want = logprobs.gather(-1, mb.targets.clamp(min=0)[..., None]).squeeze(-1).masked_fill(~mb.mask, 0.0)
    with torch.no_grad():
        got = policy(mb, temperature=temperature)
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-5)

    est = get_estimator("grpo")
    entropy = -(logprobs.exp() * logprobs).sum(-1) if est.needs_entropy else None
    want_loss, _ = est(want, mb.mask, mb.advantages, off_policy=mb.off_policy, rewards=mb.rewards, entropy=entropy)
    loss, _ = policy(mb, FusedUnifiedLoss(est, **logit_transform(lm).op_args(temperature)))
    params = [p for p in (head.weight, getattr(head, "bias", None)) if p is not None]
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for g, w in zip(torch.autograd.grad(loss, params), torch.autograd.grad(want_loss, params)):
        assert bool(w.abs().max() > 1e-3)
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("where", ["config", "text config"])
def test_a_soft_capped_model_is_trained_on_its_capped_logits(where: str) -> None:
    """Gemma 2's final_logit_softcapping (in the config) and Gemma 4's (in its text config) go into
    the fused head as its softcap: the policy's log-probs, loss and gradients are those of the
    model's own capped logits. A cap below the logits' size, so that it shows; a loss built
    without the cap is refused."""
    import transformers

    from hpt_fast.batching import Row, collate
    from hpt_fast.estimator import get_estimator
    from hpt_fast.logit_head import logit_transform
    from hpt_fast.loss import FusedUnifiedLoss
    from hpt_fast.policy import FusedHeadPolicy

    cap = 0.1
    if where == "config":
        config = transformers.Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                           final_logit_softcapping=cap)
        torch.manual_seed(0)
        lm = transformers.Gemma2ForCausalLM(config)
    else:
        lm = _gemma4(final_logit_softcapping=cap)
    assert logit_transform(lm).softcap == cap
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        head = lm.get_output_embeddings()(lm.get_decoder()(input_ids=ids).last_hidden_state)
        torch.testing.assert_close(lm(ids).logits, cap * torch.tanh(head / cap))
        assert float((lm(ids).logits - head).abs().max()) > 0.05
    _policy_matches_the_model(lm, temperature=0.7)
    mb = collate([Row(0, [1, 2], [3, 4], 1.0, False, 1.0)], [0], pad_id=0)
    with pytest.raises(ValueError, match=f"loss_fn has softcap=None, the model's logits need the fused head's "
                                         f"softcap={cap}"):
        FusedHeadPolicy(lm)(mb, FusedUnifiedLoss(get_estimator("grpo")))


def test_a_biased_output_layer_is_trained_with_its_bias() -> None:
    """With a biased lm_head (Phi) the policy's log-probs, loss and gradients are those of the model's logits."""
    # the bias is a head parameter, which ZeRO-3 gathers around the policy's forward
    from transformers import PhiConfig, PhiForCausalLM

    from hpt_fast.policy import FusedHeadPolicy

    config = PhiConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    lm = PhiForCausalLM(config)
    with torch.no_grad():
        lm.lm_head.bias.normal_(0.0, 2.0)  # initialised to 0, where leaving it out would change nothing
    head = lm.get_output_embeddings()
    assert [id(p) for p in FusedHeadPolicy(lm).head_parameters()] == [id(head.weight), id(head.bias)]
    _policy_matches_the_model(lm, temperature=0.7)


def test_the_logged_lr_is_the_one_the_step_trained_with(make_trainer):
    """Warm-up over 4 updates, 2 updates a step: step 1 trains at 1/4 and 2/4 of lr (logged was the
    lr after the step, one update ahead)."""
    trainer = make_trainer("optim.warmup_steps=4", "optim.lr=0.01", "train.mini_batch_prompts=2", "train.total_steps=3")
    used = []
    # A step pre-hook, not a wrapped step(): the lr scheduler warns about a replaced step().
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    first, second = trainer.train_step(), trainer.train_step()
    assert used == pytest.approx([0.0025, 0.005, 0.0075, 0.01])
    assert (first["lr"], second["lr"]) == pytest.approx((0.00375, 0.00875))


def test_resuming_with_other_settings_is_a_config_error(make_trainer, tmp_path):
    """The optimizer state would bring back the checkpoint's lr, and the checkpoint's weights
    would replace model.path's, both without a word: a changed setting is refused instead."""
    trainer = make_trainer()
    trainer.train_step()
    trainer.save()
    with pytest.raises(ConfigError, match=r"other settings \(optim.lr 0.0003 there, 1e-06 now\)"):
        make_trainer("optim.lr=1e-6")
    shutil.copytree(build_toy(default_toy_dir()).model, tmp_path / "other")
    with pytest.raises(ConfigError, match=r"model.path '.*' there, '.*other' now; deepspeed.bf16 False there"):
        make_trainer(f"model.path={tmp_path / 'other'}", "deepspeed.bf16=true")
    assert make_trainer("train.total_steps=5").step == 1  # not a kept setting: extending a run resumes


def test_a_step_without_rollouts_logs_no_rollout_reward(make_trainer):
    """SFT steps generate nothing: a reward or response length of 0 there would be no rollout's."""
    metrics = make_trainer("algorithm.method=sft").train_step()
    assert metrics["rule"] == "sft" and metrics["sft_fraction"] == 1.0
    assert "reward_mean" not in metrics and "response_length" not in metrics


@pytest.mark.skipif(not os.path.isdir("/proc/sys"), reason="needs Linux's /proc/sys")
def test_an_output_directory_that_cannot_be_written_is_a_config_error(make_trainer):
    """It exists, so creating it succeeds; writing into it did not, after the model had loaded."""
    with pytest.raises(ConfigError, match=r"train\.output_dir: cannot write in /proc/sys"):
        make_trainer("train.output_dir=/proc/sys")


def test_a_fused_op_backend_this_device_cannot_run_is_a_config_error(make_trainer, monkeypatch):
    """On CPU without Triton's interpreter, 'triton' failed only at the first loss, after the
    model had loaded and the first rollouts were generated."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match=r"fused_op\.backend: backend 'triton' needs CUDA tensors"):
        make_trainer("fused_op.backend=triton")


def test_the_gradient_norm_of_bf16_gradients_is_summed_in_float32():
    """torch's total norm of bf16 gradients is a bf16 number: 3.219 for this 3.2063."""
    model = torch.nn.Sequential(torch.nn.Linear(40, 25, bias=False), torch.nn.Linear(25, 1)).bfloat16()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.1)
    exact = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()) ** 0.5
    assert _grad_norm(model) == pytest.approx(exact, rel=1e-6)


def test_fused_op_settings_reach_both_of_the_trainers_calls_of_the_op(make_trainer, monkeypatch):
    """``fused_op.*`` reaches the loss (mode B) and the no-grad old log-probs (mode A) alike."""
    import hpt_fast.ops as ops

    seen, prepare = set(), ops._prepare

    def spy(hidden, weight, targets, bias, temperature, ignore_index, backend, chunk_size, mode, grad_order, accum,
            dtype, softcap):
        seen.add((mode, backend, chunk_size, grad_order, accum, softcap))
        return prepare(hidden, weight, targets, bias, temperature, ignore_index, backend, chunk_size, mode, grad_order,
                       accum, dtype, softcap)

    monkeypatch.setattr(ops, "_prepare", spy)
    trainer = make_trainer(
        "fused_op.backend=torch", "fused_op.chunk_size=5", "fused_op.grad_order=tokens", "fused_op.accum_dtype=inputs",
        "train.mini_batch_prompts=2", "rollout.old_logprobs=recompute",
    )
    trainer.train_step()
    # the toy Qwen2 caps no logits
    assert seen == {("A", "torch", 5, "tokens", None, None), ("B", "torch", 5, "tokens", None, None)}


def test_a_damaged_checkpoint_stops_the_resume_before_the_model_loads(make_trainer, tmp_path, capsys):
    trainer = make_trainer()
    trainer.train_step()
    trainer.save()
    path = latest_checkpoint(trainer.out)
    state = path / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    capsys.readouterr()
    code = train.main([f"train.output_dir={tmp_path / 'run'}", *SMALL])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"checkpoint error: checkpoint {path} is damaged: trainer_state.pt"), err
    assert "Loading weights" not in err  # transformers' progress bar: the model never started loading


def test_rewards_whose_check_did_not_finish_are_counted(make_trainer):
    """A timed-out, crashed or raising answer check scores 0; the step says how many there were."""
    trainer = make_trainer()

    def score(texts, truths):
        return Scores(rewards=np.zeros(len(texts), np.float32), outcomes=("timeout",) * len(texts))

    trainer.rewards.score = score
    assert trainer.train_step()["reward_undecided"] == 8  # 4 prompts x 2 rollouts


def test_reward_settings_reach_the_pool(make_trainer):
    trainer = make_trainer("reward.num_workers=3", "reward.timeout_s=1.5")
    assert (trainer.rewards.num_workers, trainer.rewards.timeout_s) == (3, 1.5)


def test_reward_mean_and_validation_avg_and_pass_with_mixed_rewards(make_trainer: MakeTrainer, tmp_path: Path) -> None:
    """rollout.n = 3 with some samples of a prompt right and some wrong: reward_mean is the mean over
    all samples; validation with n = 3 gives avg@3 = right samples / all samples and pass@3 = problems
    with a right sample / problems."""
    problems = [{"prompt": f"What is {a}+1?", "answer": str(a + 1)} for a in range(1, 5)]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(problems))
    trainer = make_trainer("rollout.n=3", "validation.every=1", f"validation.files=[{path}]", "validation.n=3")
    _rewards(trainer, [[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 0, 1]])
    assert trainer.train_step()["reward_mean"] == pytest.approx(4 / 12)

    # validation rewards by answer and sample: problem "2" right twice, "3" once, "4" and "5" never;
    # samples grouped by sample index instead of by problem would give pass@3 = 3/4
    plan = {"2": [1, 1, 0], "3": [1, 0, 0], "4": [0, 0, 0], "5": [0, 0, 0]}

    def score(texts: list[str], truths: list[str]) -> Scores:
        seen: Counter = Counter()
        rewards = []
        for truth in truths:
            rewards.append(plan[truth][seen[truth]])
            seen[truth] += 1
        assert seen == Counter({truth: 3 for truth in plan})  # every problem once, n samples each
        rewards = np.asarray(rewards, dtype=np.float32)
        return Scores(rewards=rewards, outcomes=tuple("match" if r else "wrong" for r in rewards))

    trainer.rewards.score = score
    assert trainer.validate() == pytest.approx({"val/mixed/avg@3": 3 / 12, "val/mixed/pass@3": 2 / 4})


def _group_advantages(group: list[float], kind: str) -> list[float]:
    """The advantages of one prompt's group, from the definitions (hpt_fast.advantages' table)."""
    mean = statistics.fmean(group)
    if kind == "grpo":
        return [(r - mean) / (statistics.stdev(group) + 1e-6) for r in group]
    assert kind == "dr_grpo"
    return [r - mean for r in group]


@pytest.mark.parametrize("preset, kind", [("ppo", "grpo"), ("dr_grpo", "dr_grpo")])
def test_the_rl_rules_rollout_advantages_follow_the_preset(make_trainer: MakeTrainer, preset: str, kind: str) -> None:
    """grpo with algorithm.estimator=ppo: ppo's own advantage is per-token GAE from a critic, which
    there is none of, so its rollout rows get grpo's (r - mean) / std per group (and a preset with
    an advantage of its own keeps it)."""
    trainer = make_trainer("algorithm.method=grpo", f"algorithm.estimator={preset}", "rollout.n=3")
    assert trainer.losses["rl"].estimator.name == preset
    groups = [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    _rewards(trainer, groups)
    seen = _spy_updates(trainer)
    metrics = trainer.train_step()
    assert math.isfinite(metrics["loss"]) and metrics["sft_fraction"] == 0.0
    got = sorted((float(r), float(adv)) for mbs, _ in seen for mb in mbs
                 for r, adv, off in zip(mb.rewards, mb.advantages, mb.off_policy) if not off)
    want = sorted((r, a) for g in groups for r, a in zip(g, _group_advantages(g, kind)))
    assert len(got) == 12 and [r for r, _ in got] == [r for r, _ in want]
    assert [a for _, a in got] == pytest.approx([a for _, a in want], abs=1e-5)


def test_method_sft_trains_with_its_entropy_coef_and_sft_coef(make_trainer: MakeTrainer) -> None:
    """algorithm.method=sft is not deaf to the estimator settings: entropy_coef adds the entropy
    bonus and estimator_hparams.sft_coef scales the SFT loss (settings sft does not take, such as
    clip_high, are refused: tests/test_config.py)."""
    trainer = make_trainer("algorithm.method=sft", "algorithm.entropy_coef=0.5",
                           "algorithm.estimator_hparams.sft_coef=2.0")
    nll: list[float] = []  # token-mean negative log-likelihood of the step's demonstrations
    update = trainer._update

    def spy(rule: str, mbs: list[MicroBatch], old: list, stats: StepStats) -> Optional[dict[str, float]]:
        # the plain model's log-probs, before the update changes the weights
        total, tokens = 0.0, 0
        with torch.no_grad():
            for mb in mbs:
                logits = trainer.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, :-1]
                logp = torch.log_softmax(logits.double(), -1).gather(-1, mb.targets.clamp_min(0)[..., None])[..., 0]
                total -= float(logp[mb.mask].sum())
                tokens += int(mb.mask.sum())
        nll.append(total / tokens)
        return update(rule, mbs, old, stats)

    trainer._update = spy
    metrics = trainer.train_step()
    assert len(nll) == 1
    assert metrics["sft_loss"] == pytest.approx(2.0 * nll[0], rel=1e-4)
    assert metrics["entropy_mean"] > 0
    assert metrics["entropy_loss"] == pytest.approx(-0.5 * metrics["entropy_mean"], rel=1e-4)
    assert metrics["loss"] == pytest.approx(metrics["sft_loss"] + metrics["entropy_loss"], rel=1e-5)


def test_a_prompt_one_token_short_of_the_context_trains_with_a_one_token_rollout(
    make_trainer: MakeTrainer, tmp_path: Path
) -> None:
    """A model whose context is L + 1 tokens: prompts of L tokens are kept (one token left to
    generate) and train on one-token rollouts filling the context exactly; prompts of L + 1 tokens,
    which fill it, are dropped."""
    toy = build_toy(default_toy_dir())
    tokenizer = _load_tokenizer(str(toy.model), False)
    table = pq.read_table(toy.train).slice(0, 400)
    lengths = [len(tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"])
               for p in table.column("prompt").to_pylist()]
    by_length = Counter(lengths)
    L = next(k for k in sorted(by_length) if by_length[k] >= 4 and by_length[k + 1] >= 4)
    rows = [i for k in (L, L + 1) for i in [j for j, n in enumerate(lengths) if n == k][:4]]
    path = tmp_path / "train.parquet"
    pq.write_table(table.take(rows), path)
    model_dir = tmp_path / "model"
    shutil.copytree(toy.model, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "max_position_embeddings": L + 1}))

    trainer = make_trainer(f"model.path={model_dir}", f"data.train_files=[{path}]", "algorithm.method=grpo")
    assert len(trainer.train_set) == 4 and trainer.train_set.dropped == 4
    assert trainer.train_set.prompts.lengths().tolist() == [L] * 4
    _rewards(trainer, [[1, 0], [0, 1], [1, 0], [0, 1]])
    samples, generate = [], trainer.rollout.generate
    trainer.rollout.generate = lambda prompts, **kw: samples.extend(out := generate(prompts, **kw)) or out
    seen = _spy_updates(trainer)
    metrics = trainer.train_step()
    assert [(len(s.token_ids), s.finish_reason) for g in samples for s in g] == [(1, "length")] * 8
    assert metrics["response_length"] == 1.0 and metrics["train_tokens"] == 8 and math.isfinite(metrics["loss"])
    assert {mb.input_ids.shape[1] for mbs, _ in seen for mb in mbs} == {L + 1}  # prompt + response == context
