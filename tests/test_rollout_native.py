"""NativeEngine on tiny random Qwen2 / Llama models: against transformers' greedy generate, against
teacher-forced log-probs, against the model's softmax (statistically), and its contract."""
import math
from fractions import Fraction

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, TopKLogitsWarper

from hpt_fast.rollout import NativeEngine, RolloutEngine
from hpt_fast.rollout import native
from hpt_fast.rollout.base import GenerationRequest
from hpt_fast.rollout.native import DROP_FINISHED_FRACTION

VOCAB = 64
CONTEXT = 96
# prompts of different lengths, so batches are left-padded
PROMPTS = [[3, 17, 42, 8, 1], [5], [9, 9, 33, 60, 12, 7, 7, 2, 41], [11, 50]]


def _tiny(kind: str = "qwen2", seed: int = 0, init_std: float = 0.2) -> torch.nn.Module:
    """A random 2-layer model; init_std well above the default spreads the logits (no near-ties)."""
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=CONTEXT, initializer_range=init_std,
        tie_word_embeddings=False,
    )
    config = Qwen2Config(**common) if kind == "qwen2" else LlamaConfig(**common)
    torch.manual_seed(seed)
    model = (Qwen2ForCausalLM if kind == "qwen2" else LlamaForCausalLM)(config).float()
    model.train()  # as the trainer leaves it
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the models are tiny: a second thread only adds synchronisation (and stalls on a busy machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def qwen():
    return _tiny("qwen2")


def _teacher_forced_logprobs(model, prompt, tokens, temperature):
    """log_softmax(logits / T) of each generated token, from one unpadded forward: float32 [len(tokens)]."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].float()
    scale = temperature if temperature > 0 else 1.0
    logp = (logits[len(prompt) - 1:-1] / scale).log_softmax(-1)
    return logp.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


def _hf_greedy(model, prompt, max_new_tokens):
    model.eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0, eos_token_id=None,
        )
    model.train()
    return out[0, len(prompt):].tolist()


def _record_batch_sizes(model):
    sizes = []
    handle = model.register_forward_hook(lambda mod, args, kwargs, out: sizes.append(kwargs["input_ids"].shape[0]),
                                         with_kwargs=True)
    return sizes, handle


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_greedy_matches_transformers_generate(kind):
    model = _tiny(kind)
    out = NativeEngine(model).generate(PROMPTS, n=2, max_new_tokens=12, temperature=0.0)
    for prompt, samples in zip(PROMPTS, out):
        expected = _hf_greedy(model, prompt, 12)
        assert [s.token_ids for s in samples] == [expected, expected]
        assert all(s.finish_reason == "length" for s in samples)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 10, 0.9), (0.0, 0, 1.0), (1.3, 0, 0.5)])
def test_logprobs_equal_teacher_forced(kind, temperature, top_k, top_p):
    model = _tiny(kind)
    # stop tokens end samples at different steps, so finished rows are dropped along the way
    out = NativeEngine(model).generate(
        PROMPTS, n=3, max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p,
        stop_token_ids=list(range(0, VOCAB, 5)), seed=3,
    )
    for prompt, samples in zip(PROMPTS, out):
        for s in samples:
            assert s.logprobs.dtype == torch.float32 and s.logprobs.shape == (len(s.token_ids),)
            assert bool((s.logprobs <= 0).all())
            expected = _teacher_forced_logprobs(model, prompt, s.token_ids, temperature)
            torch.testing.assert_close(s.logprobs, expected, rtol=0, atol=1e-4)


def _chi_square_critical(dof: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square(dof) (Wilson-Hilferty; z = the normal's 0.999 quantile)."""
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + z * math.sqrt(c)) ** 3


def _assert_frequencies_match(counts: torch.Tensor, probs: torch.Tensor) -> None:
    """Pearson's chi-square test at the 0.1% level; bins expecting < 5 draws are pooled."""
    total = counts.sum()
    expected = probs.double() * total
    big = expected >= 5
    observed = torch.cat([counts[big].double(), counts[~big].double().sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    if expected[-1] == 0:
        assert observed[-1] == 0, "tokens drawn outside the distribution's support"
        observed, expected = observed[:-1], expected[:-1]
    stat = float(((observed - expected) ** 2 / expected).sum())
    assert stat < _chi_square_critical(len(expected) - 1), f"chi-square {stat:.1f} over {len(expected) - 1} dof"


def _first_token_probs(model, prompt, temperature):
    with torch.no_grad():
        return (model(torch.tensor([prompt])).logits[0, -1].float() / temperature).softmax(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampled_tokens_follow_the_softmax(temperature):
    model = _tiny(init_std=0.1)  # a spread-out distribution: every token gets drawn
    prompt = [4, 8, 15, 16, 23]
    out = NativeEngine(model).generate([prompt], n=6000, max_new_tokens=1, temperature=temperature, seed=0)
    counts = torch.bincount(torch.tensor([s.token_ids[0] for s in out[0]]), minlength=VOCAB)
    _assert_frequencies_match(counts, _first_token_probs(model, prompt, temperature))


def test_top_k_top_p_sample_the_truncated_renormalised_softmax():
    model = _tiny(init_std=0.1)
    prompt = [4, 8, 15, 16, 23]
    out = NativeEngine(model).generate([prompt], n=6000, max_new_tokens=1, top_k=20, top_p=0.6, seed=1)
    probs = _first_token_probs(model, prompt, 1.0)
    sorted_probs, order = probs.sort(descending=True)
    kept = sorted_probs[:20] / sorted_probs[:20].sum()
    # top-p keeps a token while the (renormalised top-k) mass before it is below 0.6
    kept = kept * ((kept.cumsum(0) - kept) < 0.6)
    truncated = torch.zeros_like(probs)
    truncated[order[:20]] = kept / kept.sum()
    counts = torch.bincount(torch.tensor([s.token_ids[0] for s in out[0]]), minlength=VOCAB)
    assert int(counts[truncated == 0].sum()) == 0
    _assert_frequencies_match(counts, truncated)


def _nucleus_size(probs: list[float], top_p: float) -> int:
    """How many tokens top-p keeps by transformers' TopPLogitsWarper / vLLM's apply_top_k_top_p rule,
    in exact arithmetic: ascending order, a token goes while the mass up to and including it is at
    most 1 - top_p, and the most likely token always stays."""
    ascending = sorted(Fraction(p) for p in probs)
    removed, mass = 0, Fraction(0)
    for p in ascending[:-1]:
        mass += p
        if mass > 1 - Fraction(top_p):
            break
        removed += 1
    return len(probs) - removed


# dyadic probabilities (exact in float32, summing to exactly 1) with ties at the cut-off
TIED_THREE = [1 / 8, 1 / 4, 1 / 8, 1 / 4, 1 / 4]


@pytest.mark.parametrize("probs,top_p,exact_cut", [
    (TIED_THREE, 0.4, False),  # the cut falls inside the tie: two of the three stay
    (TIED_THREE, 0.5, True),  # two of the tie already reach top_p: the third goes
    (TIED_THREE, 0.625, False),  # the whole tie stays, the next token goes
    ([1 / 8] * 8, 0.3, False),  # every token tied
    ([1 / 8] * 8, 0.05, False),  # every token tied, top_p below one token: the most likely stays
])
def test_top_p_keeps_the_positional_count_of_tokens_tied_at_the_cut(probs: list[float], top_p: float,
                                                                    exact_cut: bool) -> None:
    """Top-p keeps as many tokens of a tie at its cut as the positional rule of transformers and vLLM."""
    # not the whole tie, not none of it; each kept token keeps its own probability
    expected = _nucleus_size(probs, top_p)
    cut = sorted(probs, reverse=True)[expected - 1]
    p = torch.tensor(probs)
    truncated = native._truncate(p[None], 0, top_p)[0]
    kept = set(truncated.nonzero().squeeze(-1).tolist())
    assert len(kept) == expected
    # everything more likely than the cut stays, nothing less likely; which tied tokens fill the
    # last places is the sort's choice, not part of the contract
    assert {i for i, q in enumerate(probs) if q > cut} <= kept <= {i for i, q in enumerate(probs) if q >= cut}
    assert torch.equal(truncated[sorted(kept)], p[sorted(kept)])
    if exact_cut:
        return  # a softmax's rounding decides a cut that falls exactly on the mass: only _truncate pins it
    request = GenerationRequest(prompts=[[0]], n=1, max_new_tokens=1, temperature=1.0, top_p=top_p, top_k=0,
                                stop_token_ids=(), seed=0)
    tokens, _ = native.sample_tokens(p.log().expand(4000, -1).clone(), request, torch.Generator().manual_seed(0))
    drawn = set(tokens.tolist())
    # each kept token has at least a third of the kept mass: all of them are drawn in 4000 tries
    assert len(drawn) == expected and drawn <= {i for i, q in enumerate(probs) if q >= cut}


@pytest.mark.parametrize("probs,top_k", [
    (TIED_THREE, 2),  # the k-th place falls inside a tie of three: all three stay
    (TIED_THREE, 3),  # the tie fills the k places exactly: the tokens below go
    ([1 / 8] * 8, 1),  # every token tied with the most likely: all stay
    ([1 / 2, 1 / 4, 1 / 8, 1 / 8], 3),  # the tie at the k-th place runs one past it
    ([1 / 2, 1 / 4, 1 / 8, 1 / 8], 9),  # k above V: nothing goes
])
def test_top_k_keeps_every_token_tied_with_the_kth(probs: list[float], top_k: int) -> None:
    """Top-k keeps what transformers' TopKLogitsWarper and vLLM keep: every token at least as
    likely as the k-th most likely, so a tie at the k-th place stays whole."""
    p = torch.tensor(probs)
    kth = sorted(probs, reverse=True)[min(top_k, len(probs)) - 1]
    truncated = native._truncate(p[None], top_k, 1.0)[0]
    expected = [q if q >= kth else 0.0 for q in probs]
    assert truncated.tolist() == expected
    warper = TopKLogitsWarper(top_k=top_k)
    kept_by_transformers = warper(torch.zeros(1, 1, dtype=torch.long), p.log()[None])[0].isfinite()
    assert (truncated > 0).tolist() == kept_by_transformers.tolist()


def test_weights_changed_in_place_are_used_with_no_copy(qwen):
    engine = NativeEngine(qwen)
    before = engine.generate(PROMPTS, max_new_tokens=8, temperature=0.0)
    pointers = [p.data_ptr() for p in qwen.parameters()]
    with torch.no_grad():
        qwen.lm_head.weight.mul_(-1.0)  # what an optimizer step does: same tensors, new values
    engine.update_weights()
    try:
        after = engine.generate(PROMPTS, max_new_tokens=8, temperature=0.0)
        assert [p.data_ptr() for p in qwen.parameters()] == pointers
        assert engine.model is qwen
        assert [s[0].token_ids for s in after] != [s[0].token_ids for s in before]
        assert [s[0].token_ids for s in after] == [_hf_greedy(qwen, p, 8) for p in PROMPTS]
    finally:
        with torch.no_grad():
            qwen.lm_head.weight.mul_(-1.0)


def test_stop_tokens_and_length_limits(qwen):
    stops = [0, 1, 2, 3, 4, 5, 6, 7]
    out = NativeEngine(qwen).generate(PROMPTS, n=16, max_new_tokens=6, stop_token_ids=stops, seed=0)
    reasons = {s.finish_reason for samples in out for s in samples}
    assert reasons == {"stop", "length"}
    for samples in out:
        for s in samples:
            assert not set(s.token_ids[:-1]) & set(stops)
            if s.finish_reason == "stop":
                assert s.token_ids[-1] in stops and len(s.token_ids) <= 6
            else:
                assert s.token_ids[-1] not in stops and len(s.token_ids) == 6


def test_generation_stops_at_the_context_length(qwen):
    long_prompt = [i % VOCAB for i in range(CONTEXT - 3)]  # leaves room for 3 tokens
    out = NativeEngine(qwen).generate([long_prompt, [1, 2]], max_new_tokens=10, seed=0)
    assert len(out[0][0].token_ids) == 3 and out[0][0].finish_reason == "length"
    assert len(out[1][0].token_ids) == 10
    assert len(NativeEngine(qwen, max_context=20).generate([[1] * 15], max_new_tokens=10)[0][0].token_ids) == 5


def test_kv_cache_growth_keeps_the_numbers(qwen, monkeypatch):
    monkeypatch.setattr(native, "KV_FIRST_NEW_POSITIONS", 2)  # the cache doubles several times
    out = NativeEngine(qwen).generate(PROMPTS, n=2, max_new_tokens=20, stop_token_ids=[7], seed=2)
    for prompt, samples in zip(PROMPTS, out):
        for s in samples:
            torch.testing.assert_close(s.logprobs, _teacher_forced_logprobs(qwen, prompt, s.token_ids, 1.0),
                                       rtol=0, atol=1e-4)
    greedy = NativeEngine(qwen).generate(PROMPTS, max_new_tokens=20, temperature=0.0)
    assert [g[0].token_ids for g in greedy] == [_hf_greedy(qwen, p, 20) for p in PROMPTS]


def test_finished_sequences_leave_the_batch(qwen):
    sizes, handle = _record_batch_sizes(qwen)
    try:
        out = NativeEngine(qwen).generate([[1, 2, 3]], n=32, max_new_tokens=20,
                                          stop_token_ids=list(range(0, VOCAB, 3)), seed=0)
    finally:
        handle.remove()
    lengths = [len(s.token_ids) for s in out[0]]
    assert sizes[0] == 1  # the prompt is prefilled once for its 32 samples
    assert len(sizes) == max(lengths)  # the prefill and one forward per fed-back token, none after the last
    decode = sizes[1:]
    assert decode == sorted(decode, reverse=True) and decode[-1] < decode[0] < 32
    for t, size in enumerate(decode):
        live = sum(length > t + 1 for length in lengths)
        # every unfinished sample is in the batch; finished ones are dropped once they are 1/8 of it
        assert live <= size < max(live / (1 - DROP_FINISHED_FRACTION), live + 1) + 1e-9


def test_seeds_reproduce(qwen):
    engine = NativeEngine(qwen)
    kwargs = dict(n=4, max_new_tokens=8, stop_token_ids=[3], temperature=0.9, top_p=0.95)
    first, again = engine.generate(PROMPTS, seed=7, **kwargs), engine.generate(PROMPTS, seed=7, **kwargs)
    other = engine.generate(PROMPTS, seed=8, **kwargs)
    flat = lambda out: [(s.token_ids, s.logprobs.tolist(), s.finish_reason) for g in out for s in g]  # noqa: E731
    assert flat(first) == flat(again)
    assert flat(first) != flat(other)
    assert len(flat(engine.generate(PROMPTS, seed=None, **kwargs))) == len(PROMPTS) * 4


def test_eval_and_no_grad_during_generation_then_train_mode_back(qwen):
    seen = []
    handle = qwen.register_forward_hook(lambda mod, args, out: seen.append((mod.training, torch.is_grad_enabled())))
    try:
        out = NativeEngine(qwen).generate(PROMPTS, max_new_tokens=3)
    finally:
        handle.remove()
    assert seen and set(seen) == {(False, False)}
    assert qwen.training and all(m.training for m in qwen.modules())
    assert not out[0][0].logprobs.requires_grad
    qwen.model.layers[0].eval()  # a part the trainer keeps in eval mode stays so
    NativeEngine(qwen).generate(PROMPTS, max_new_tokens=2)
    assert qwen.training and not any(m.training for m in qwen.model.layers[0].modules())
    assert qwen.model.layers[1].training
    qwen.train()


def _sdpa_flags() -> tuple[bool, bool, bool, bool]:
    cuda = torch.backends.cuda
    return (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(),
            cuda.math_sdp_enabled())


@pytest.fixture
def sdpa_flags_restored():
    before = _sdpa_flags()
    yield
    for enable, on in zip((torch.backends.cuda.enable_cudnn_sdp, torch.backends.cuda.enable_flash_sdp,
                           torch.backends.cuda.enable_mem_efficient_sdp, torch.backends.cuda.enable_math_sdp), before):
        enable(on)


@pytest.mark.parametrize("flash_before", [True, False])
def test_decode_runs_attention_without_cudnn_then_restores_the_flags(qwen, flash_before, sdpa_flags_restored):
    """Every decode step is a new attention shape, and cuDNN's SDPA plans each new shape anew: the
    model's forwards during generation see cuDNN attention off and the other backends as the user
    left them; afterwards every flag is back."""
    torch.backends.cuda.enable_cudnn_sdp(True)
    torch.backends.cuda.enable_flash_sdp(flash_before)
    seen = []
    handle = qwen.register_forward_hook(lambda mod, args, out: seen.append(_sdpa_flags()))
    try:
        NativeEngine(qwen).generate(PROMPTS, max_new_tokens=3)
    finally:
        handle.remove()
    assert len(seen) == 3 and set(seen) == {(False, flash_before, True, True)}
    assert _sdpa_flags() == (True, flash_before, True, True)


def test_cudnn_attention_stays_where_it_is_the_only_backend_on(sdpa_flags_restored):
    for enable in (torch.backends.cuda.enable_flash_sdp, torch.backends.cuda.enable_mem_efficient_sdp,
                   torch.backends.cuda.enable_math_sdp):
        enable(False)
    torch.backends.cuda.enable_cudnn_sdp(True)
    with native._sdpa_without_cudnn():
        assert _sdpa_flags() == (True, False, False, False)


@pytest.mark.parametrize("prompts,kwargs,error,match", [
    ([], {}, ValueError, "prompt_ids is empty"),
    ([[1, 2], []], {}, ValueError, "prompt 1 is empty"),
    ([[1, 2]], {"n": 0}, ValueError, "n must be >= 1"),
    ([[1, 2]], {"max_new_tokens": 0}, ValueError, "max_new_tokens must be >= 1"),
    ([[1] * CONTEXT], {}, ValueError, "leaves no room"),
    ([[1, VOCAB]], {}, ValueError, f"token id {VOCAB}, outside the vocabulary"),
    ([[-1, 2]], {}, ValueError, "token id -1, outside"),
    ([[1, 2]], {"stop_token_ids": [VOCAB + 3]}, ValueError, "stop_token_ids holds token id"),
    ([[1, 2.0]], {}, TypeError, "must hold ints"),
    ("12", {}, TypeError, "prompt_ids must be a list"),
    ([[1, 2]], {"temperature": -0.5}, ValueError, "temperature"),
    ([[1, 2]], {"top_p": 0.0}, ValueError, "top_p"),
    ([[1, 2]], {"top_k": -1}, ValueError, "top_k"),
    ([[1, 2]], {"n": 2.0}, TypeError, "n must be an int"),
    ([[1, 2]], {"seed": "x"}, TypeError, "seed"),
])
def test_bad_input_fails_before_any_work(qwen, prompts, kwargs, error, match):
    sizes, handle = _record_batch_sizes(qwen)
    try:
        with pytest.raises(error, match=match):
            NativeEngine(qwen).generate(prompts, **{"max_new_tokens": 4, **kwargs})
    finally:
        handle.remove()
    assert sizes == []


def test_follows_the_protocol_and_refuses_layers_without_a_kv_cache(qwen):
    engine = NativeEngine(qwen)
    assert isinstance(engine, RolloutEngine)
    engine.sleep()
    engine.wake()
    assert engine.generate([[1]], max_new_tokens=1)[0][0].finish_reason == "length"
    model = _tiny()
    model.config.layer_types = ["full_attention", "chunked_attention"]  # as Llama 4's
    model.config.attention_chunk_size = 8
    with pytest.raises(ValueError, match=r"full_attention and sliding_attention layers only; this model has "
                                         r"\['chunked_attention'\] layers"):
        NativeEngine(model)


WINDOW = 4


def _sliding(family: str, window: int = WINDOW) -> torch.nn.Module:
    """A random 4-layer model with sliding-window attention (``window`` >= CONTEXT: the same
    weights, in effect with full attention): Qwen2's first layer full and the rest sliding,
    Gemma 2 alternating (with its attention and final soft caps), Gemma 3 five sliding to one
    full, Mistral and Phi-3 sliding everywhere (a config-wide window, no layer types), Qwen3 two
    full layers then two sliding, Gemma 4 (multimodal, text only here) sliding but its last layer."""
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=CONTEXT, initializer_range=0.2,
                  tie_word_embeddings=False, sliding_window=window)
    config = {
        "qwen2": lambda: transformers.Qwen2Config(**common, use_sliding_window=True, max_window_layers=1),
        "gemma2": lambda: transformers.Gemma2Config(**common, head_dim=16, final_logit_softcapping=5.0,
                                                    attn_logit_softcapping=20.0),
        "gemma3": lambda: transformers.Gemma3TextConfig(**common, head_dim=16),
        "mistral": lambda: transformers.MistralConfig(**common),
        "phi3": lambda: transformers.Phi3Config(**common, pad_token_id=0),
        "qwen3": lambda: transformers.Qwen3Config(**common, use_sliding_window=True, max_window_layers=2),
        # multimodal: the layers sit in the text config
        "gemma4": lambda: transformers.Gemma4Config(
            text_config=dict(common, head_dim=16, hidden_size_per_layer_input=0, final_logit_softcapping=None),
            vision_config=None, audio_config=None),
    }[family]()
    torch.manual_seed(0)
    if family == "gemma4":
        model = transformers.Gemma4ForConditionalGeneration(config).float()
    else:
        model = transformers.AutoModelForCausalLM.from_config(config).float()
    model.train()
    return model


@pytest.mark.parametrize("family, window, first_new", [("qwen2", WINDOW, 256), ("gemma2", WINDOW, 256),
                                                      ("gemma3", WINDOW, 256), ("mistral", WINDOW, 256),
                                                      ("gemma4", WINDOW, 256), ("phi3", WINDOW, 256),
                                                      ("qwen3", WINDOW, 256), ("gemma2", 2 * WINDOW, 2)])
def test_sliding_window_layers_generate_what_the_model_computes(family, window, first_new, monkeypatch):
    """Models whose layers attend to the last ``window`` positions only, prompts and completions
    far longer than the window (left-padded, finished rows dropped; with ``first_new`` 2 the
    sliding buffers double before they move): greedy samples equal transformers' generate (its
    sliding-window cache), sampled log-probs equal a teacher-forced forward's, which differ from
    the same weights' without the window. A sliding layer's buffer never holds more than
    2 (window - 1) positions, a full layer's grows with the sequence."""
    monkeypatch.setattr(native, "KV_FIRST_NEW_POSITIONS", first_new)
    capacities = {}
    update = native.KVBuffer.update

    def recorded(layer, *args, **kwargs):
        out = update(layer, *args, **kwargs)
        capacities[layer.window] = max(capacities.get(layer.window, 0), layer.key_buffer.shape[2])
        return out

    monkeypatch.setattr(native.KVBuffer, "update", recorded)
    model = _sliding(family, window)
    kinds = set(getattr(model.config.get_text_config(), "layer_types", None) or ["sliding_attention"])
    assert "sliding_attention" in kinds and max(map(len, PROMPTS)) > window
    engine = NativeEngine(model)
    out = engine.generate(PROMPTS, n=2, max_new_tokens=12, temperature=0.0)
    for prompt, samples in zip(PROMPTS, out):
        assert [s.token_ids for s in samples] == [_hf_greedy(model, prompt, 12)] * 2
    out = engine.generate(PROMPTS, n=3, max_new_tokens=12, seed=1, stop_token_ids=list(range(0, VOCAB, 5)))
    unwindowed, gap = _sliding(family, window=CONTEXT), 0.0
    for prompt, samples in zip(PROMPTS, out):
        for s in samples:
            expected = _teacher_forced_logprobs(model, prompt, s.token_ids, 1.0)
            torch.testing.assert_close(s.logprobs, expected, rtol=0, atol=1e-4)
            full = _teacher_forced_logprobs(unwindowed, prompt, s.token_ids, 1.0)
            gap = max(gap, float((full - expected).abs().max()))
    assert gap > 1e-2  # the window shows in these samples' log-probs
    assert capacities[window] == 2 * (window - 1)
    if "full_attention" in kinds:
        assert capacities[None] >= max(map(len, PROMPTS)) + 11
