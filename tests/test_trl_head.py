"""hpt_fast's op serving TRL's fused LM head (hpt_fast.trl_head), against float64 and TRL's own."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="TRL is not installed (the test extra brings it)")

import trl.trainer.utils as trl_utils  # noqa: E402
from trl.trainer import add_fused_lm_head  # noqa: E402

import hpt_fast.trl_head as trl_head  # noqa: E402
from hpt_fast.trl_head import patch_trl_fused_head  # noqa: E402
from tiny_models import READ_OTHERWISE, tiny_causal_lm  # noqa: E402

TRL_HEAD = trl_utils._ChunkedLogProbFunction
TRL_COMPACTS = trl_utils._use_triton


@pytest.fixture
def op_calls(monkeypatch):
    """The keyword arguments of each call the patch made to hpt_fast's op (not TRL's head), and
    under "rows" the number of positions it scored."""
    calls = []
    op = trl_head.fused_token_logprobs

    def counted(hidden, *args, **kwargs):
        calls.append({**kwargs, "rows": hidden.shape[0]})
        return op(hidden, *args, **kwargs)

    monkeypatch.setattr(trl_head, "fused_token_logprobs", counted)
    return calls


def _call(head, inputs, *args):
    """logp, entropy and the gradients of hidden, weight, bias of one call of a head's apply,
    backward through sum(g_logp * logp + g_ent * entropy), all float64; and the call's
    (log_sum_sq_probs, mean_logits, is_top1)."""
    h, w, b, t, g_logp, g_ent = inputs
    h, w, b = (x.clone().requires_grad_() for x in (h, w, b))
    logp, entropy, *rest = head.apply(h, w, b, t, *args)
    torch.autograd.backward((logp, entropy), (g_logp.to(logp.dtype), g_ent.to(entropy.dtype)))
    return [x.detach().double() for x in (logp, entropy, h.grad, w.grad, b.grad)], rest


def _inputs(dtype, n=37, hidden=24, vocab=301, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (2 * torch.randn(n, hidden, generator=g)).to(dtype)
    w = torch.randn(vocab, hidden, generator=g).to(dtype)
    b = torch.randn(vocab, generator=g).to(dtype)
    t = torch.randint(0, vocab, (n,), generator=g)
    return h, w, b, t, torch.randn(n, generator=g), torch.randn(n, generator=g)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap, scale", [(None, 1.0), (5.0, 1.0), (5.0, 0.25), (None, 3.0)])
def test_the_patched_head_computes_trls_logits_against_float64(backend, dtype, softcap, scale, op_calls):
    """TRL's head's logits, softcap * tanh(scale * (h W^T + b) / softcap) / T, through the op: log-probs,
    entropies and the gradients of hidden, weight and bias against float64 (logits rounded to the
    GEMM's dtype, as any bf16 GEMM rounds them), with a temperature, a bias, soft caps and logit
    scales; closer to it than TRL's own head in bf16, which adds the bias in bf16. is_top1 where
    the top two logits are clearly apart (half the targets made the argmax), mean_logits and
    log_sum_sq_probs."""
    inputs = _inputs(dtype)
    h, w, b, t, g_logp, g_ent = inputs
    raw = h.double() @ w.double().t() + b.double()
    t[::2] = raw[::2].argmax(-1)
    outputs = ("log_probs", "entropy", "is_top1", "mean_logits", "log_sum_sq_probs")
    args = (0.7, 64, softcap, scale, outputs)
    hr, wr, br = (x.double().requires_grad_() for x in (h, w, b))
    # the same logits, written as TRL writes them: the GEMM's output (rounded to its dtype, the
    # gradient straight through), then the scale, the cap and T
    logits = hr @ wr.t() + br
    if dtype != torch.float32:
        logits = logits + (logits.detach().to(dtype).double() - logits.detach())
    logits = scale * logits
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp_all = torch.log_softmax(logits / 0.7, dim=-1)
    ref_logp = logp_all.gather(1, t[:, None]).squeeze(1)
    ref_ent = -(logp_all.exp() * logp_all).sum(-1)
    torch.autograd.backward((ref_logp, ref_ent), (g_logp.double(), g_ent.double()))
    want = [ref_logp.detach(), ref_ent.detach(), hr.grad, wr.grad, br.grad]

    with patch_trl_fused_head(backend=backend):
        got, (sq, mean, top1) = _call(trl_utils._ChunkedLogProbFunction, inputs, *args)
    assert len(op_calls) == 1 and op_calls[0]["backend"] == backend
    trl_own, _ = _call(TRL_HEAD, inputs, *args)
    assert top1.dtype == torch.bool and not top1.requires_grad
    top2 = raw.topk(2, dim=-1).values
    target_raw = raw.gather(1, t[:, None]).squeeze(1)
    gap = torch.where(target_raw >= top2[:, 0], top2[:, 0] - top2[:, 1], top2[:, 0] - target_raw)
    clear = gap > (1e-3 if dtype == torch.float32 else 0.5)  # a bf16 GEMM rounds these logits by up to 0.1
    assert clear.sum() > 20
    assert torch.equal(top1[clear], (target_raw >= top2[:, 0])[clear])
    # a logit the op's bf16 GEMM rounds to the neighbouring bf16 value moves the sums by ~1e-4
    sums_tol = 1e-5 if dtype == torch.float32 else 1e-3
    for got_sum, want_sum in ((mean, logits.detach().mean(-1) / 0.7), (sq, torch.logsumexp(2 * logp_all.detach(), -1))):
        assert got_sum.dtype == torch.float32 and not got_sum.requires_grad
        torch.testing.assert_close(got_sum.double(), want_sum, rtol=sums_tol, atol=sums_tol)
    values_tol, grad_tol = (1e-5, 1e-5) if dtype == torch.float32 else (1e-5, 1e-2)
    for name, a, ref, theirs, tol in zip(("logp", "entropy", "hidden", "weight", "bias"), got, want, trl_own,
                                         (values_tol,) * 2 + (grad_tol,) * 3):
        assert torch.isfinite(a).all(), name
        assert _rel(a, ref) < tol, (name, _rel(a, ref))
        if dtype == torch.bfloat16:
            assert _rel(a, ref) <= _rel(theirs, ref), (name, _rel(a, ref), _rel(theirs, ref))


def _tiny(family: str, **settings):
    import transformers

    config = getattr(transformers, f"{family}Config")(
        vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, **settings)
    torch.manual_seed(0)
    return getattr(transformers, f"{family}ForCausalLM")(config)


@pytest.mark.parametrize("family, settings", [
    ("Qwen2", {}),
    ("Gemma2", {"final_logit_softcapping": 0.5}),  # a cap below the logits' size, so that it shows
    ("Granite", {"logits_scaling": 8.0}),  # TRL: logit_scale 1 / 8
    ("Cohere", {"logit_scale": 0.0625}),
    ("Phi", {}),  # a biased lm_head
])
def test_a_model_with_trls_fused_head_gets_its_own_logprobs_through_the_op(family, settings, op_calls):
    """``model(..., labels=labels, fused_lm_head=True)`` after ``add_fused_lm_head``, with the patch:
    log-probs, entropies, mean logits, log sum p^2, the loss and every parameter's gradient equal
    those of the model's own logits (a float64 copy of it; -100 labels and a temperature), and the
    op ran the head on the labelled positions only (TRL's forward hands its own head every
    position on the CPU)."""
    model = _tiny(family, **settings)
    if family == "Phi":
        assert model.get_output_embeddings().bias is not None
    reference = copy.deepcopy(model).double()
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy", "mean_logits", "log_sum_sq_probs"))
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[2, 8:] = -100
    g = torch.Generator().manual_seed(2)
    g_logp, g_ent = torch.randn(3, 10, generator=g), torch.randn(3, 10, generator=g)

    with patch_trl_fused_head():
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert len(op_calls) == 1
    (g_logp * out.log_probs + g_ent * out.entropy).sum().backward()

    z = reference(input_ids=ids).logits[:, :-1] / 0.7
    logp_all = torch.log_softmax(z, dim=-1)
    target, mask = labels[:, 1:], labels[:, 1:] != -100
    ref_logp = logp_all.gather(2, target.clamp(min=0)[..., None]).squeeze(2) * mask
    ref_ent = -(logp_all.exp() * logp_all).sum(-1) * mask
    (g_logp * ref_logp + g_ent * ref_ent).sum().backward()

    assert torch.equal(out.label_mask, mask) and op_calls[0]["rows"] == int(mask.sum()) < mask.numel()
    torch.testing.assert_close(out.log_probs.double(), ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy.double(), ref_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.mean_logits.double(), z.detach().mean(-1) * mask, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.log_sum_sq_probs.double(), torch.logsumexp(2 * logp_all.detach(), -1) * mask,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss.double(), -ref_logp.sum() / mask.sum(), rtol=1e-5, atol=1e-6)
    params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        ref = params[name].grad
        assert _rel(p.grad.double(), ref) < 1e-4, (name, _rel(p.grad.double(), ref))


@pytest.mark.parametrize("family", ["recurrent_gemma", "xlstm", "inkling", "mpt", "llama4"])
def test_trls_fused_head_reads_fewer_transforms_than_these_models_apply(family, op_calls):
    """What the README says of TRL 1.16's reading of a model (``add_fused_lm_head``), through the
    op: it misses RecurrentGemma's and xLSTM's soft caps and Inkling's hidden-state divisor, and
    applies the logit_scale a config of transformers' MPT sets and its forward ignores, so its
    loss is not the model's own (the loss patch's is: tests/test_causal_lm_loss.py), and it runs
    Llama 4's base_model, which is the model itself. When a TRL release reads them, this fails,
    and the README's paragraph goes."""
    model_type, settings = READ_OTHERWISE[family]
    model = tiny_causal_lm(model_type, **settings)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    own = model(input_ids=ids, labels=ids).loss
    add_fused_lm_head(model)
    with patch_trl_fused_head():
        if family == "llama4":
            with pytest.raises(AttributeError, match="no attribute 'last_hidden_state'"):
                model(input_ids=ids, labels=ids, fused_lm_head=True)
            return
        trl = model(input_ids=ids, labels=ids, fused_lm_head=True).loss
    assert len(op_calls) == 1 and abs(float(trl.detach() - own.detach())) > 1e-3 * float(own.detach())


def test_a_bf16_head_cast_to_float32_by_trl(op_calls):
    """``cast_lm_head_to_fp32=True``: TRL hands float32 hidden states, autocast off, with the bf16 head;
    the op computes in float32 and the head's gradient comes back in bf16, as TRL's own does."""
    model = _tiny("Qwen2").to(torch.bfloat16)
    twin = copy.deepcopy(model)
    for m in (model, twin):
        add_fused_lm_head(m, temperature=0.7, outputs=("log_probs", "entropy"), cast_lm_head_to_fp32=True)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    with patch_trl_fused_head():
        ours = model(input_ids=ids, labels=ids, fused_lm_head=True)
    theirs = twin(input_ids=ids, labels=ids, fused_lm_head=True)
    assert len(op_calls) == 1 and ours.log_probs.dtype == torch.float32
    for out in (ours, theirs):
        (out.log_probs.sum() + out.entropy.sum()).backward()
    torch.testing.assert_close(ours.log_probs, theirs.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.entropy, theirs.entropy, rtol=1e-5, atol=1e-5)
    head, twin_head = model.get_output_embeddings().weight, twin.get_output_embeddings().weight
    assert head.grad.dtype == torch.bfloat16
    assert _rel(head.grad.double(), twin_head.grad.double()) < 1e-2


def test_a_frozen_head_and_a_reference_pass_under_inference_mode(op_calls):
    """A frozen lm_head (PEFT / LoRA trains the trunk only) gets no gradient while the trunk's equal
    those through TRL's head; a reference model's pass under inference_mode runs too."""
    model = _tiny("Qwen2")
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    for m in (model, twin):
        m.get_output_embeddings().weight.requires_grad_(False)
        add_fused_lm_head(m, temperature=0.7, outputs=("log_probs", "entropy"))
    with patch_trl_fused_head():
        ours = model(input_ids=ids, labels=ids, fused_lm_head=True)
        with torch.inference_mode():
            reference = model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
    theirs = twin(input_ids=ids, labels=ids, fused_lm_head=True)
    assert len(op_calls) == 2 and op_calls[1]["return_entropy"] is True
    torch.testing.assert_close(reference, theirs.log_probs.detach(), rtol=1e-5, atol=1e-5)
    for out in (ours, theirs):
        (out.log_probs.sum() + out.entropy.sum()).backward()
    assert model.get_output_embeddings().weight.grad is None
    params = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert _rel(p.grad.double(), params[name].grad.double()) < 1e-5, name


def test_a_batch_without_a_scored_label_gives_a_differentiable_zero(op_calls):
    """TRL hands the op no rows when every label is -100: zero log-probs that backward through."""
    model = _tiny("Qwen2")
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(4))
    with patch_trl_fused_head():
        out = model(input_ids=ids, labels=torch.full_like(ids, -100), fused_lm_head=True)
    assert len(op_calls) == 1
    assert not out.log_probs.any() and not out.entropy.any()
    (out.log_probs.sum() + out.loss).backward()
    assert not model.get_output_embeddings().weight.grad.any()


def test_log_probs_alone_compute_no_entropy(op_calls):
    """The reference-model passes ask for log-probs only: the op skips the entropy, and TRL gets None."""
    h, w, b, t, *_ = _inputs(torch.float32, n=9, vocab=50)
    with patch_trl_fused_head() as head:
        logp, entropy, *rest = head.apply(h, w, b, t, 1.0, 64, None, 1.0, ("log_probs",))
    assert entropy is None and rest == [None, None, None]
    assert op_calls[0]["return_entropy"] is False
    torch.testing.assert_close(logp, TRL_HEAD.apply(h, w, b, t, 1.0, 64, None, 1.0, ("log_probs",))[0])


@pytest.mark.parametrize("outputs, softcap, scale, why", [
    (("log_probs", "is_top1", "a_later_field"), None, 1.0, "asks for a_later_field, which the op does not"),
    (("log_probs",), None, 0.0, "logit scale is 0.0, not a finite number > 0"),
    (("log_probs",), None, -2.0, "logit scale is -2.0"),
])
def test_a_call_the_op_cannot_serve_runs_trls_head_with_one_warning(outputs, softcap, scale, why, op_calls):
    """A field TRL 1.16 does not have (a later TRL's) is not silently left out, and a scale of 0 or
    below has no soft cap / temperature form: those calls give exactly TRL's own results, with one
    warning per reason."""
    inputs = _inputs(torch.float32, n=9, vocab=50)
    h, w, b, t, *_ = inputs
    args = (h, w, b, t, 0.7, 64, softcap, scale, outputs)
    with patch_trl_fused_head() as head:
        with pytest.warns(UserWarning, match=why):
            ours = head.apply(*args)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            head.apply(*args)  # the same reason warns once
    theirs = TRL_HEAD.apply(*args)
    assert op_calls == []
    for a, b_ in zip(ours, theirs):
        assert (a is None and b_ is None) or torch.equal(a, b_)


@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_a_sharded_training_step_through_the_op_equals_trls_head(tmp_path, strategy):
    """One step on two gloo ranks, each its own batch, of a model sharded by DeepSpeed ZeRO-3 (every
    parameter partitioned) or FSDP2 (an untied head sharded as a unit of its own, which TRL hands
    the op as its full_tensor()), in float32 and in each one's bf16 mixed precision, untied and
    tied embeddings, through TRL's fused forward, with TRL's head and with the op behind it: the op
    serves the call (no fallback); the per-token outputs, the reduced gradients of every parameter
    and the weights after the update equal those through TRL's head, on both ranks
    (tests/sharded_head_run.py). FSDP2's head of its own unit is the exception to "reduced": TRL's
    forward leaves its gradient each rank's own, with TRL's head as with the op (checked against
    an unsharded copy: each rank's shard is its own batch's gradient)."""
    from sharded_head_run import compare, launch

    compare(launch(strategy, "trl", tmp_path), strategy, "trl")


# what a user's `accelerate config` writes for DeepSpeed ZeRO-3 with a config file of their own
ACCELERATE_ZERO3 = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  deepspeed_config_file: {ds_config}
  zero3_init_flag: true
num_machines: 1
num_processes: 2
use_cpu: true
"""
# every parameter partitioned, however small (the default threshold, 1e5, keeps this model's whole)
ZERO3_FILE = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "train_batch_size": "auto", "steps_per_print": 2**31 - 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


@pytest.mark.parametrize("trainer", ["GRPO", "DPO"])
def test_a_trl_trainer_under_accelerate_launch_with_zero3_trains_through_the_op(trainer, tmp_path):
    """TRL as users launch it: `accelerate launch --config_file` with DeepSpeed ZeRO-3 (every
    parameter partitioned), two CPU ranks, a model TRL loads by name with its reference model
    (GRPO with beta > 0, DPO), three steps, with the op behind TRL's head and with TRL's own head
    (tests/accelerate_trl_run.py). The op serves every policy and reference call (no fallback);
    the first step's full gradients and every step's logged metrics equal TRL's. (accelerate runs
    FSDP only on accelerators, so FSDP2 is tested by the sharded step above.)"""
    import json

    from accelerate_trl_run import STEPS, save_tiny_model

    save_tiny_model(tmp_path / "model")
    (tmp_path / "ds.json").write_text(json.dumps(ZERO3_FILE))
    config = tmp_path / "accelerate.yaml"
    config.write_text(ACCELERATE_ZERO3.format(ds_config=tmp_path / "ds.json"))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    runs = {}
    for mode in ("patched", "trl"):
        out = tmp_path / mode
        out.mkdir()
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--main_process_port", str(29500 + (os.getpid() + 700) % 1000),
               str(Path(__file__).with_name("accelerate_trl_run.py")), trainer, mode, str(tmp_path / "model"),
               str(out)]
        done = subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        runs[mode] = [torch.load(out / f"rank_{r}.pt") for r in range(2)]
    for ours, theirs in zip(runs["patched"], runs["trl"]):
        assert ours["world"] == 2
        # the head was partitioned at every step's start: the op got it through TRL's gathering
        assert ours["released"] == theirs["released"] == [True] * STEPS
        # per step the policy's call (with entropy) and the reference model's (log-probs only)
        assert theirs["op_calls"] == [] and sorted(ours["op_calls"]) == [False] * STEPS + [True] * STEPS
        assert ours["grads"].keys() == theirs["grads"].keys() and len(ours["grads"]) == 27
        for name, want in theirs["grads"].items():
            assert want.abs().max() > 0 and torch.isfinite(ours["grads"][name]).all(), name
            assert _rel(ours["grads"][name], want) < 1e-5, (name, _rel(ours["grads"][name], want))
        assert len(ours["logs"]) == len(theirs["logs"]) == STEPS
        for step, (mine, log) in enumerate(zip(ours["logs"], theirs["logs"])):
            keys = [k for k in log if k not in ("step_time", "epoch") and isinstance(log[k], float)]
            assert "loss" in keys and "grad_norm" in keys and "entropy" in keys
            for key in keys:
                assert mine[key] == pytest.approx(log[key], rel=1e-5, abs=1e-6), (step, key)


def test_patches_restore_what_was_there():
    """A patch restores TRL's head and its compaction rule (``_use_triton``) on leaving its block or
    on restore(); nested patches restore in reverse order and fall back to TRL's own head, never to
    another patch. Under a patch TRL compacts on the CPU, and still on a device it compacts on
    itself, not on an XLA-like one."""
    cpu, xla = torch.device("cpu"), torch.device("xla")
    assert not TRL_COMPACTS(cpu) and not TRL_COMPACTS(xla)
    with patch_trl_fused_head(backend="torch") as outer:
        assert trl_utils._ChunkedLogProbFunction is outer
        assert trl_utils._use_triton(cpu) and not trl_utils._use_triton(xla)
        inner = patch_trl_fused_head(chunk_size=8)
        assert trl_utils._ChunkedLogProbFunction is inner and inner.trl_head is TRL_HEAD
        with pytest.raises(RuntimeError, match="restore the patches in reverse order"):
            outer.restore()
        inner.restore()
        assert trl_utils._ChunkedLogProbFunction is outer and trl_utils._use_triton == outer.compacts
    assert trl_utils._ChunkedLogProbFunction is TRL_HEAD and trl_utils._use_triton is TRL_COMPACTS


@pytest.mark.parametrize("kwargs, match", [
    ({"backend": "cuda"}, "backend must be one of"),
    ({"grad_order": "rows"}, "grad_order must be one of"),
    ({"accum_dtype": torch.float64}, "accum_dtype must be"),
    ({"chunk_size": 0}, "chunk_size must be a positive int"),
    ({"chunk_size": True}, "chunk_size must be a positive int"),
])
def test_bad_options_are_refused_when_patching(kwargs, match):
    with pytest.raises(ValueError, match=match):
        patch_trl_fused_head(**kwargs)
    assert trl_utils._ChunkedLogProbFunction is TRL_HEAD


def test_a_trl_whose_head_takes_other_arguments_is_refused(monkeypatch):
    class OtherHead(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, targets, temperature):
            return hidden

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", OtherHead)
    with pytest.raises(RuntimeError, match=r"takes \(hidden, weight, targets, temperature\), not \(hidden, weight, "
                                           r"bias, targets"):
        patch_trl_fused_head()
    assert trl_utils._ChunkedLogProbFunction is OtherHead


def test_a_trl_without_its_compaction_rule_is_refused(monkeypatch):
    monkeypatch.delattr(trl_utils, "_use_triton")
    with pytest.raises(RuntimeError, match=r"has no trl.trainer.utils._use_triton\(device\)"):
        patch_trl_fused_head()
    assert trl_utils._ChunkedLogProbFunction is TRL_HEAD


def _trl_steps(trainer: str, patched: bool, tmp_path, steps: int = 1, bf16: bool = False, **settings):
    """The first step's gradients and every step's logged metrics of a real TRL trainer ("GRPO",
    "SFT" or "DPO") on a tiny Qwen2 and a toy dataset, through the patched head or TRL's own."""
    import trl
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM, TrainerCallback

    from hpt_fast.toy import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    grads, logs = {}, []

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if not grads:
                grads.update({k: p.grad.detach().clone() for k, p in model.named_parameters()})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                records.append(dict(logs))

    records = logs
    rows = {
        "GRPO": [{"prompt": f"{i}+{i}="} for i in range(8)],
        "SFT": [{"text": f"{i} + {i} = {2 * i}"} for i in range(8)],
        "DPO": [{"prompt": f"{i} + {i} =", "chosen": f" {2 * i}", "rejected": f" {2 * i + 1}"} for i in range(8)],
    }[trainer]
    args = getattr(trl, f"{trainer}Config")(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=bf16, fp16=False, max_steps=steps, seed=0,
        max_grad_norm=0.0, save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
        **settings)
    kwargs = {"GRPO": {"reward_funcs": [_reward]}, "SFT": {}, "DPO": {"ref_model": copy.deepcopy(model)}}[trainer]
    run = getattr(trl, f"{trainer}Trainer")(model=model, args=args, processing_class=tok, callbacks=[Record()],
                                              train_dataset=Dataset.from_list(rows), **kwargs)
    if patched:
        with patch_trl_fused_head():
            run.train()
    else:
        run.train()
    return grads, logs


def _reward(prompts, completions, **kwargs):
    return [float(sum(map(ord, c)) % 3) for c in completions]


@pytest.fixture
def no_launcher(monkeypatch):
    # an in-process hpt_fast Trainer (other tests) leaves these set; accelerate would read a launcher
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("bf16", [False, True])
def test_trls_grpo_trainer_trains_through_the_op(bf16, tmp_path, no_launcher, op_calls):
    """A real TRL GRPOTrainer step with the patch: the policy's forward runs the op, and the
    gradient the step's optimizer gets equals the one through TRL's own head."""
    settings = dict(num_generations=4, per_device_train_batch_size=8, max_completion_length=8, beta=0.0,
                    temperature=0.9, top_k=0, remove_unused_columns=False)
    theirs, _ = _trl_steps("GRPO", False, tmp_path, bf16=bf16, **settings)
    assert op_calls == []
    ours, _ = _trl_steps("GRPO", True, tmp_path, bf16=bf16, **settings)
    assert len(op_calls) == 1 and op_calls[0]["return_entropy"]
    assert theirs.keys() == ours.keys() and all(float(g.abs().sum()) > 0 for g in theirs.values())
    # bf16: both heads run bf16 GEMMs under the trainer's autocast, TRL adding the bias in bf16
    tol = 2e-2 if bf16 else 1e-5
    for name, g in theirs.items():
        assert _rel(ours[name], g) < tol, (name, _rel(ours[name], g))


@pytest.mark.parametrize("trainer, extra", [("SFT", {}), ("DPO", {}), ("DPO", {"use_weighting": True})],
                         ids=["SFT", "DPO", "DPO-WPO"])
def test_trls_sft_and_dpo_trainers_train_through_the_op(trainer, extra, tmp_path, no_launcher, op_calls):
    """TRL's SFTTrainer (log-probs, entropies, is_top1 for its token accuracy) and DPOTrainer (also
    mean_logits, a reference model's pass, and with WPO weighting log_sum_sq_probs): six steps
    through the patch, none falling back to TRL's head, log the loss, entropy, token accuracy and
    logit metrics of six through TRL's own head, the accuracy rising above 0; the first step's
    gradients are equal."""
    settings = dict(per_device_train_batch_size=8, learning_rate=0.05, max_length=32, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no call falls back to TRL's head
        ours, our_logs = _trl_steps(trainer, True, tmp_path, steps=6, **settings)
    # one policy call per step, and for DPO one reference-model call (log-probs only)
    assert sum(call["return_entropy"] for call in op_calls) == 6
    assert len(op_calls) == (12 if trainer == "DPO" else 6)
    calls = len(op_calls)
    theirs, their_logs = _trl_steps(trainer, False, tmp_path, steps=6, **settings)
    assert len(op_calls) == calls
    for name, g in theirs.items():
        assert _rel(ours[name], g) < 1e-5, (name, _rel(ours[name], g))
    metrics = [k for k in their_logs[0] if "accuracy" in k or k.startswith(("loss", "entropy", "logits/"))]
    assert "mean_token_accuracy" in metrics and len(our_logs) == len(their_logs) == 6
    assert max(log["mean_token_accuracy"] for log in their_logs) > 0
    for step, (mine, log) in enumerate(zip(our_logs, their_logs)):
        # the first step's metrics to float32 rounding; later ones after a few AdamW updates from
        # gradients that differ in their last bits, which the updates amplify (at lr 0.05 a
        # near-zero gradient's sign moves its weight by 0.05): up to 4e-4 by step 5 with WPO
        tol = dict(rel=1e-5, abs=1e-6) if step == 0 else dict(rel=2e-3, abs=5e-4)
        for key in metrics:
            assert mine[key] == pytest.approx(log[key], **tol), (step, key)
