"""VLLMEngine against a fake ``vllm`` (tests/fake_vllm.py) that mirrors the real API it uses:
the order of the phases, what is passed, the streamed weights, and the errors on misuse."""
import dataclasses
import inspect
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Optional, is_typeddict

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import fake_vllm
from hpt_fast.rollout import RolloutEngine, VLLMEngine
from hpt_fast.rollout.vllm import VLLM_API_USED, VLLM_MODEL_PATH, VLLM_FIELDS_USED

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def vllm(monkeypatch):
    """``import vllm`` gives the fake; the environment variable the engine sets is restored after."""
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    return fake_vllm


@pytest.fixture(scope="module")
def model():
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).float()


def _engine(model, **kwargs) -> VLLMEngine:
    return VLLMEngine(model, "Qwen/tiny", **kwargs)


def _kinds(events):
    return [e[0] if e[0] != "wake_up" else f"wake_up{list(e[1])}" for e in events if e[0] != "load_weights"]


def test_created_asleep_with_sleep_mode_dummy_weights_and_in_process(vllm, model):
    engine = _engine(model, gpu_memory_utilization=0.25, kv_cache_memory_bytes=2**30, max_model_len=48,
                     max_num_seqs=128, seed=5, sleep_level=2)
    llm = engine._llm
    assert llm.init_kwargs == dict(
        model="Qwen/tiny", skip_tokenizer_init=True, tensor_parallel_size=1, dtype="bfloat16", seed=5,
        gpu_memory_utilization=0.25, enforce_eager=True, kv_cache_memory_bytes=2**30, enable_sleep_mode=True,
        load_format="dummy", logprobs_mode="processed_logprobs", distributed_executor_backend="uni",
        max_model_len=48, max_num_seqs=128, enable_prefix_caching=True,
    )
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert llm.events == [("init",), ("sleep", 2)]
    assert isinstance(engine, RolloutEngine)


def test_one_step_runs_the_phases_in_order_and_times_them(vllm, model):
    engine = _engine(model)
    engine.update_weights()
    out = engine.generate([[1, 2, 3]], n=2, max_new_tokens=4, seed=1)
    engine.sleep()
    assert _kinds(engine._llm.events) == [
        "init", "sleep", "wake_up['weights']", "reset_prefix_cache", "wake_up['kv_cache']", "generate", "sleep",
    ]
    loads = [i for i, e in enumerate(engine._llm.events) if e[0] == "load_weights"]
    resets = [i for i, e in enumerate(engine._llm.events) if e[0] == "reset_prefix_cache"]
    assert loads and max(loads) < resets[0]  # the prefix cache is dropped after the new weights are in
    assert set(engine.timings) == {"wake_weights", "load_weights", "reset_prefix_cache", "wake_kv_cache",
                                   "generate", "sleep"}
    assert len(out) == 1 and len(out[0]) == 2


def test_weights_stream_with_hf_names_in_the_rollout_dtype(vllm, model):
    engine = _engine(model, dtype=torch.bfloat16)
    engine.update_weights()
    received = engine._llm.model.weights
    assert list(received) == [name for name, _ in model.named_parameters()]
    for name, param in model.named_parameters():
        assert received[name].dtype == torch.bfloat16
        torch.testing.assert_close(received[name], param.detach().to(torch.bfloat16), rtol=0, atol=0)


def test_each_step_streams_the_current_weights(vllm, model):
    engine = _engine(model, dtype=torch.float32)
    engine.update_weights()
    engine.generate([[1]], max_new_tokens=1)
    engine.sleep()
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # an optimizer step
    try:
        engine.update_weights()
        torch.testing.assert_close(engine._llm.model.weights["lm_head.weight"], model.lm_head.weight.detach())
    finally:
        with torch.no_grad():
            model.lm_head.weight.sub_(1.0)
    assert [e for e in _kinds(engine._llm.events) if e == "reset_prefix_cache"] == ["reset_prefix_cache"] * 2


def test_zero3_parameters_are_gathered_one_at_a_time(vllm, model, monkeypatch):
    import deepspeed

    log = []

    @contextmanager
    def gathered(params, modifier_rank=None, fwd_module=None, enabled=True):
        assert modifier_rank is None  # read-only gather
        log.append(("gather", params[0].ds_name))
        yield
        log.append(("release", params[0].ds_name))

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", gathered)
    names = [name for name, _ in model.named_parameters()]
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    for name, param in model.named_parameters():
        param.ds_id, param.ds_name, param.ds_status = 1, name, ZeroParamStatus.NOT_AVAILABLE
    try:
        engine = _engine(model)
        engine._llm.events = log  # load_weights events land in the same log as the gathers
        engine._llm.model.events = log
        engine.update_weights()
    finally:
        for _, param in model.named_parameters():
            del param.ds_id, param.ds_name, param.ds_status
    streamed = [e for e in log if e[0] in ("gather", "load_weights", "release")]
    expected = [step for name in names for step in (("gather", name), ("load_weights", name, torch.bfloat16),
                                                      ("release", name))]
    assert streamed == expected


def test_samples_and_sampling_params(vllm, model):
    engine = _engine(model)
    engine.update_weights()
    out = engine.generate([[3, 4], [7]], n=3, max_new_tokens=5, temperature=0.8, stop_token_ids=[24, 20], seed=11)
    params = next(e[2] for e in engine._llm.events if e[0] == "generate")
    # one request per prompt, seeded apart: vLLM gives sample j of a request its seed + j
    assert params == [fake_vllm.SamplingParams(n=3, temperature=0.8, top_p=1.0, top_k=0, seed=seed,
                                               stop_token_ids=[20, 24], max_tokens=5, logprobs=0,
                                               detokenize=False, ignore_eos=True) for seed in (11, 14)]
    assert [s.token_ids for s in out[0]] == [[15, 16, 17, 18, 19], [16, 17, 18, 19, 20], [17, 18, 19, 20]]
    assert [s.finish_reason for s in out[0]] == ["length", "stop", "stop"]
    assert [s.token_ids for s in out[1]] == [[21, 22, 23, 24], [22, 23, 24], [23, 24]]
    sample = out[0][2]
    assert sample.logprobs.dtype == torch.float32
    torch.testing.assert_close(sample.logprobs, torch.tensor([-0.25, -0.5, -0.75, -1.0]))


def test_greedy_samples_are_one_request_sample_copied(vllm, model):
    """vLLM refuses n > 1 at temperature 0 ("n must be 1 when using greedy sampling"): the engine
    asks for one sample per prompt and gives back n copies of it, each a Sample of its own."""
    engine = _engine(model)
    engine.update_weights()
    out = engine.generate([[3], [9]], n=3, max_new_tokens=4, temperature=0.0, seed=2)
    params = next(e[2] for e in engine._llm.events if e[0] == "generate")
    assert [p.n for p in params] == [1, 1]
    for group in out:
        assert len(group) == 3 and len({id(s) for s in group}) == 3
        assert all(s.token_ids == group[0].token_ids for s in group)
    group[0].logprobs.zero_()
    assert group[1].logprobs.min() < 0  # not one tensor shared
    with pytest.raises(fake_vllm.VLLMValidationError, match="n must be 1 when using greedy sampling"):
        fake_vllm.SamplingParams(n=2, temperature=0.0)


def test_an_unseeded_tensor_parallel_call_draws_one_seed_for_its_ranks(vllm, model, one_rank_group):
    """Unseeded, vLLM draws from each rank's own random state and the ranks of one engine would
    sample different tokens: the engine draws a seed, and every rank takes the first rank's."""
    import torch.distributed as dist

    engine = _engine(model)
    engine._tp_group = dist.new_group([0])
    engine.update_weights()
    engine.generate([[5], [5]], n=2, max_new_tokens=2)
    params = next(e[2] for e in engine._llm.events if e[0] == "generate")
    assert None not in [p.seed for p in params] and params[1].seed == (params[0].seed + 2) % 2**62


def test_completions_end_where_the_context_is_full(vllm, model):
    """vLLM stops a request when prompt and completion fill max_model_len, whatever max_tokens
    says; the samples then end with finish_reason "length", their log-probs as long as they are."""
    engine = _engine(model, max_model_len=10)
    engine.update_weights()
    [samples] = engine.generate([[1] * 7], n=2, max_new_tokens=8, seed=0)
    assert [len(s.token_ids) for s in samples] == [3, 3] and {s.finish_reason for s in samples} == {"length"}
    assert [len(s.logprobs) for s in samples] == [3, 3]
    with pytest.raises(ValueError, match="prompt 0 has 10 tokens, which leaves no room in the model's context of 10"):
        engine.generate([[1] * 10], max_new_tokens=2)
    # the model config's length when max_model_len is not given, as vLLM takes it
    assert _engine(model).max_context == 64


def test_uneven_prompt_counts_over_a_tensor_parallel_group_give_each_rank_its_own_samples(
    vllm: ModuleType, model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over a tensor-parallel group, uneven prompt counts give each prompt's samples once, in order."""
    # three ranks of one engine with 3, 1 and 1 prompts (5, not a multiple of 3): each rank's engine
    # generates the group's 5 prompts with the first rank's seed and keeps its own prompts' samples
    import torch.distributed as dist

    per_rank = [[[3], [7, 11], [20]], [[30]], [[2, 40]]]
    seeds = [21, 40, 77]  # the ranks' own seeds differ: the first rank's is the group's
    reference = _engine(model)
    reference.update_weights()
    whole = reference.generate([p for prompts in per_rank for p in prompts], n=2, max_new_tokens=3, seed=seeds[0])
    group = object()  # stands for the group: the collectives below answer as its ranks would
    monkeypatch.setattr(dist, "get_world_size", lambda g=None: len(per_rank) if g is group else 1)
    rank = 0
    monkeypatch.setattr(dist, "get_rank", lambda g=None: rank if g is group else 0)

    def all_gather_object(out: list, obj: tuple, group: object = None) -> None:
        assert obj == (per_rank[rank], seeds[rank])
        out[:] = list(zip(per_rank, seeds))

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    kept = []
    for rank, prompts in enumerate(per_rank):
        engine = _engine(model)
        engine._tp_group = group
        engine.update_weights()
        out = engine.generate(prompts, n=2, max_new_tokens=3, seed=seeds[rank])
        assert [e[1] for e in engine._llm.events if e[0] == "generate"] == [5]
        assert len(out) == len(prompts)
        kept += out
    def flat(groups: list) -> list:
        return [[(s.token_ids, s.logprobs.tolist(), s.finish_reason) for s in g] for g in groups]

    assert flat(kept) == flat(whole)
    # the fake's samples depend on each prompt's place in the batch: a shifted slice would differ
    assert len({tuple(map(tuple, (s[0] for s in g))) for g in flat(whole)}) == 5


@pytest.mark.parametrize("reason", ["abort", None])
def test_a_completion_vllm_did_not_finish_normally_is_an_error(
    vllm: ModuleType, model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, reason: Optional[str],
) -> None:
    """A completion vLLM aborted ("abort") or left unfinished (None) makes generate raise, naming the reason."""
    # an aborted request (a sleep while it ran, say) holds tokens that are no rollout to train on
    generate = vllm.LLM.generate

    def one_unfinished(self: fake_vllm.LLM, *args: Any, **kwargs: Any) -> list:
        outputs = generate(self, *args, **kwargs)
        outputs[1].outputs[0].finish_reason = reason
        return outputs

    monkeypatch.setattr(vllm.LLM, "generate", one_unfinished)
    engine = _engine(model)
    engine.update_weights()
    with pytest.raises(RuntimeError, match=f"vLLM finished a completion with reason {reason!r}"):
        engine.generate([[3], [4]], n=2, max_new_tokens=3, seed=0)


@pytest.mark.parametrize("seed", [0, -1, 2**63 - 3])
def test_every_sample_of_a_call_has_its_own_seed(vllm, model, seed):
    """Identical prompts in one call are sampled independently, as NativeEngine samples them; no
    derived seed is vLLM's -1, which means unseeded."""
    engine = _engine(model)
    engine.update_weights()
    engine.generate([[5], [5], [5]], n=2, max_new_tokens=2, seed=seed)
    params = next(e[2] for e in engine._llm.events if e[0] == "generate")
    sample_seeds = [p.seed + j for p in params for j in range(p.n)]
    assert len(set(sample_seeds)) == 6 and all(0 <= s for s in sample_seeds)
    engine.generate([[5], [5]], n=2, max_new_tokens=2)
    assert [p.seed for p in [e for e in engine._llm.events if e[0] == "generate"][-1][2]] == [None, None]


def test_truncated_sampling_when_the_caller_needs_no_logprobs(vllm, model):
    """Evaluation samples with top-p; the trainer's rollouts (logprobs_needed=True) never do."""
    engine = _engine(model)
    engine.update_weights()
    engine.generate([[3]], n=2, max_new_tokens=2, temperature=0.6, top_p=0.95, seed=1, logprobs_needed=False)
    [params] = next(e[2] for e in engine._llm.events if e[0] == "generate")
    assert params.top_p == 0.95 and params.temperature == 0.6


def test_misuse_raises(vllm, model):
    engine = _engine(model)
    engine.update_weights()
    engine.generate([[1]], max_new_tokens=2)
    with pytest.raises(RuntimeError, match="call sleep"):
        engine.update_weights()
    engine.sleep()
    # level 1 keeps the weights: they come back with the engine
    engine.generate([[1]], max_new_tokens=2)
    assert _kinds(engine._llm.events)[-3:] == ["wake_up['weights']", "wake_up['kv_cache']", "generate"]


@pytest.mark.parametrize("sleep_level", [1, 2])
def test_generate_never_runs_on_dummy_or_dropped_weights(vllm, model, sleep_level):
    """A new engine holds dummy weights, and a level-2 sleep drops them: generate streams the
    model's weights first (the fake refuses to generate from dummy or dropped ones)."""
    engine = _engine(model, sleep_level=sleep_level)
    for _ in range(2):
        engine.generate([[1]], max_new_tokens=2)
        engine.sleep()
    loads = _kinds(engine._llm.events).count("reset_prefix_cache")
    assert loads == (1 if sleep_level == 1 else 2)


@pytest.mark.parametrize("temperature", [3.0, 0.005])
def test_temperatures_vllm_would_refuse_or_change_are_refused(vllm, model, temperature):
    engine = _engine(model)
    with pytest.raises(ValueError, match=r"temperature 0 \(greedy\) or in \[0.01, 2.0\]"):
        engine.generate([[1]], max_new_tokens=2, temperature=temperature)
    # what real vLLM does with them (the fake mirrors SamplingParams' checks)
    if temperature > 2:
        with pytest.raises(ValueError, match="must be in"):
            vllm.SamplingParams(temperature=temperature)
    else:
        assert vllm.SamplingParams(temperature=temperature).temperature == 0.01


@pytest.mark.parametrize("kwargs,match", [
    ({"top_p": 0.9}, "without top-k / top-p"),
    ({"top_k": 5}, "without top-k / top-p"),
    ({"n": 0}, "n must be >= 1"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
])
def test_bad_requests_fail_before_any_work(vllm, model, kwargs, match):
    engine = _engine(model)
    engine.update_weights()
    before = list(engine._llm.events)
    with pytest.raises(ValueError, match=match):
        engine.generate([[1, 2]], **{"max_new_tokens": 3, **kwargs})
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.generate([[]], max_new_tokens=3)
    assert engine._llm.events == before
    # greedy decoding ignores top-k / top-p, so they are allowed there
    engine.generate([[1, 2]], max_new_tokens=1, temperature=0.0, top_k=5)


def _recording(target, fn, passed):
    """fn, noting the names of the arguments each call binds (the keys of **kwargs included)."""
    signature = inspect.signature(fn)

    def wrapper(*args, **kwargs):
        for name, value in signature.bind(*args, **kwargs).arguments.items():
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                passed[target] |= set(value)
            elif name != "self":
                passed[target].add(name)
        return fn(*args, **kwargs)

    return wrapper


def test_the_engine_uses_exactly_the_listed_vllm_names(vllm, model, monkeypatch):
    """VLLM_API_USED, which bench/check_vllm_api.py checks against real vLLM, is what the engine passes."""
    passed = {target: set() for target in VLLM_API_USED}
    for target in VLLM_API_USED:
        cls_name, _, meth = target.partition(".")
        cls = getattr(vllm, cls_name)
        monkeypatch.setattr(cls, meth or "__init__", _recording(target, getattr(cls, meth or "__init__"), passed))
    engine = _engine(model, sleep_level=2)
    engine.update_weights()
    engine.generate([[1, 2]], n=2, max_new_tokens=3, stop_token_ids=[4], seed=0)
    engine.sleep()
    assert passed == {target: set(keywords) for target, keywords in VLLM_API_USED.items()}


def test_the_fake_mirrors_every_name_the_engine_uses(vllm):
    """The fake accepts each listed keyword by name and has each listed field, as vLLM does."""
    for target, keywords in VLLM_API_USED.items():
        obj = vllm
        for part in target.split("."):
            obj = getattr(obj, part)
        accepted = set(inspect.signature(obj).parameters)
        if target == "LLM":
            accepted |= fake_vllm.ENGINE_ARGS_FIELDS
        assert set(keywords) <= accepted, (target, set(keywords) - accepted)
    llm = vllm.LLM("m", enable_sleep_mode=True)
    obj = llm
    for attr in VLLM_MODEL_PATH:
        obj = getattr(obj, attr)
    assert hasattr(obj, "load_weights")
    for cls, attrs in VLLM_FIELDS_USED.items():
        cls = getattr(vllm, cls)
        if dataclasses.is_dataclass(cls):
            known = {f.name for f in dataclasses.fields(cls)}
        elif is_typeddict(cls):
            known = set(cls.__annotations__)
        else:
            known = set(inspect.signature(cls).parameters)
        assert set(attrs) <= known, (cls, set(attrs) - known)


def test_importing_hpt_fast_needs_no_vllm():
    # vllm made unimportable in a fresh interpreter: the package and the native engine still work
    code = (
        "import sys; sys.modules['vllm'] = None\n"
        "import hpt_fast, hpt_fast.rollout\n"
        "from hpt_fast.rollout import NativeEngine, VLLMEngine\n"
        "try:\n"
        "    VLLMEngine(None, 'm')\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "VLLMEngine needs vLLM" in result.stdout
