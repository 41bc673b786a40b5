"""Data files (openr1 parquet, validation JSON), tokenisation with length limits, the resumable order."""
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import PreTrainedTokenizerFast

from hpt_fast.data import (
    DataError, Problem, PromptSampler, PromptSet, Ragged, load_prompt_set, read_problems, read_train_parquet,
    read_validation_json, render_prompt, shard, validation_name, write_train_parquet, write_validation_json,
)
from hpt_fast.toy import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _problem(i: int, target="<think>\nx\n</think>\n\\boxed{1}") -> Problem:
    return Problem(prompt=[{"role": "user", "content": f"What is {i}+1?"}], ground_truth=str(i + 1),
                   target=target, data_source="src", index=i)


def _table(**columns) -> pa.Table:
    base = {
        "prompt": pa.array([[{"role": "user", "content": "q"}]]),
        "target": pa.array([[{"role": "assistant", "content": "<think>\na\n</think>"}]]),
        "reward_model": pa.array([{"ground_truth": "1"}]),
    }
    base.update(columns)
    return pa.table({k: v for k, v in base.items() if v is not None})


# ---- files -------------------------------------------------------------------------------------


def test_parquet_round_trip_in_the_published_schema(tmp_path):
    problems = [_problem(0), _problem(1, target=None), _problem(2)]
    write_train_parquet(tmp_path / "train.parquet", problems)
    schema = pq.read_schema(tmp_path / "train.parquet")
    assert schema.names == ["data_source", "prompt", "target", "ability", "reward_model", "extra_info"]
    assert read_train_parquet(tmp_path / "train.parquet") == problems


def test_parquet_target_as_string_and_extra_columns(tmp_path):
    table = _table(target=pa.array(["<think>\nb", None], type=pa.large_string()),
                   prompt=pa.array([[{"role": "user", "content": "q1"}], [{"role": "user", "content": "q2"}]]),
                   reward_model=pa.array([{"ground_truth": "1", "style": "rule"}, {"ground_truth": "2", "style": "rule"}]),
                   unused=pa.array([1, 2]))
    pq.write_table(table, tmp_path / "t.parquet")
    problems = read_train_parquet(tmp_path / "t.parquet")
    assert [p.target for p in problems] == ["<think>\nb", None]
    assert [p.ground_truth for p in problems] == ["1", "2"] and problems[0].data_source == ""


@pytest.mark.parametrize("columns, message", [
    (dict(prompt=None), r"missing column 'prompt'"),
    (dict(reward_model=None), r"missing column 'reward_model'"),
    (dict(target=None), r"missing column 'target'"),
    (dict(prompt=pa.array(["q"])), r"column 'prompt' must be a list of \{role, content\} messages, got string"),
    (dict(prompt=pa.array([[{"role": "user"}]])), r"column 'prompt' must be a list of \{role, content\}"),
    (dict(prompt=pa.array([[]], type=pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))),
     r"column 'prompt', row 0: expected a non-empty list"),
    (dict(target=pa.array([3])), r"column 'target' must be a string or a list of \{role, content\} messages, got int64"),
    (dict(reward_model=pa.array(["1"])), r"column 'reward_model' must be a struct with a string 'ground_truth'"),
    (dict(reward_model=pa.array([{"answer": "1"}])), r"column 'reward_model' must be a struct with a string 'ground_truth'"),
    (dict(reward_model=pa.array([{"ground_truth": None}], type=pa.struct([("ground_truth", pa.string())]))),
     r"column 'reward_model', row 0: null \(or null ground_truth\)"),
    (dict(reward_model=pa.array([None], type=pa.struct([("ground_truth", pa.string())]))),
     r"column 'reward_model', row 0: null"),
    (dict(data_source=pa.array([1])), r"column 'data_source' must be a string, got int64"),
    (dict(reward_model=pa.array([{"ground_truth": " "}])), r"column 'reward_model', row 0: ground_truth: blank ' '"),
    (dict(reward_model=pa.array([{"ground_truth": "\\boxed{}"}])),
     r"column 'reward_model', row 0: ground_truth: '\\\\boxed\{\}' has an empty or unclosed \\boxed: no answer"),
    (dict(target=pa.array([""])), r"column 'target', row 0: blank demonstration ''"),
    (dict(target=pa.array([[{"role": "assistant", "content": "\n"}]])), r"column 'target', row 0: blank demonstration"),
    # a whole conversation is not a demonstration: its first turn would be the question
    (dict(target=pa.array([[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]])),
     r"column 'target', row 0: a demonstration given as messages must be one assistant message, "
     r"got roles \['user', 'assistant'\]"),
    (dict(target=pa.array([[{"role": "user", "content": "a"}]])), r"column 'target', row 0: .* one assistant message, got roles \['user'\]"),
    (dict(prompt=pa.array([None], type=pa.null())), r"column 'prompt', row 0: expected a non-empty list"),
    (dict(prompt=pa.array([[{"role": "usr", "content": "q"}]])),
     r"column 'prompt', row 0: unknown message role\(s\) \['usr'\]; a prompt's roles are \['system', 'user', 'assistant', 'tool'\]"),
    (dict(prompt=pa.array([[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]])),
     r"column 'prompt', row 0: a prompt must end with a user message \(the model answers it\), ends with 'assistant'"),
    (dict(prompt=pa.array([[{"role": "system", "content": "s"}, {"role": "user", "content": " "}]])),
     r"column 'prompt', row 0: the last user message is blank"),
])
def test_bad_parquet_names_file_and_column(tmp_path, columns, message):
    path = tmp_path / "bad.parquet"
    pq.write_table(_table(**columns), path)
    with pytest.raises(DataError, match=rf"bad\.parquet: {message}"):
        read_train_parquet(path)


def test_target_column_is_optional_when_not_required(tmp_path):
    pq.write_table(_table(target=None), tmp_path / "rl.parquet")
    assert read_train_parquet(tmp_path / "rl.parquet", require_target=False)[0].target is None


def test_a_categorical_data_source_is_read_as_strings(tmp_path):
    """pandas writes a categorical column dictionary-encoded."""
    pq.write_table(_table(data_source=pa.array(["math"]).dictionary_encode()), tmp_path / "cat.parquet")
    assert read_train_parquet(tmp_path / "cat.parquet")[0].data_source == "math"


def test_all_null_optional_columns_read_as_absent_values(tmp_path):
    """pandas writes an optional column holding only None with Arrow type null."""
    pq.write_table(_table(target=pa.array([None]), data_source=pa.array([None])), tmp_path / "nulls.parquet")
    assert pq.read_schema(tmp_path / "nulls.parquet").field("target").type == pa.null()
    problem = read_train_parquet(tmp_path / "nulls.parquet", require_target=False)[0]
    assert problem.target is None and problem.data_source == ""
    # a method that trains on demonstrations would train on none: SFT made no step and exited 0
    with pytest.raises(DataError, match=r"nulls\.parquet: column 'target' holds no demonstration \(null on every row\)"):
        read_train_parquet(tmp_path / "nulls.parquet", require_target=True)


def test_empty_and_unreadable_parquet(tmp_path):
    pq.write_table(_table().slice(0, 0), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match=r"empty\.parquet: no rows"):
        read_train_parquet(tmp_path / "empty.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"junk\.parquet: cannot read as parquet"):
        read_train_parquet(tmp_path / "junk.parquet")


def test_validation_json_accepted_keys(tmp_path):
    items = [
        {"prompt": "What is 1+1?", "answer": "2", "id": 7},
        {"problem": "What is 2+2?", "answer": 4},
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "answer": 0.5},
        {"prompt": "q", "answer": 0.00001}, {"prompt": "q", "answer": 1e21}, {"prompt": "q", "answer": 3.0},
        {"prompt": "q", "answer": -2.50}, {"prompt": "q", "answer": "\\boxedfoo 3"},  # a macro, not a box
    ]
    path = tmp_path / "AIME24" / "test.json"
    path.parent.mkdir()
    path.write_text(json.dumps(items))
    problems = read_validation_json(path)
    # numbers as the plain decimals a response would write, never str(float)'s "1e-05"
    assert [p.ground_truth for p in problems] == ["2", "4", "0.5", "0.00001", "1" + "0" * 21, "3", "-2.5", "\\boxedfoo 3"]
    assert problems[1].prompt == [{"role": "user", "content": "What is 2+2?"}] and len(problems[2].prompt) == 2
    assert {p.data_source for p in problems} == {"AIME24"} and validation_name(tmp_path / "math500.json") == "math500"
    write_validation_json(tmp_path / "out.json", problems)
    assert [p.prompt for p in read_validation_json(tmp_path / "out.json")] == [p.prompt for p in problems]


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "q", "answer": "1"}', r"expected a JSON list of problems, got dict"),
    ("[]", r"no problems"),
    ("[1, 2", r"not valid JSON"),
    ('["q"]', r"item 0: expected an object"),
    ('[{"prompt": "q", "problem": "q", "answer": "1"}]', r"item 0: needs exactly one of 'prompt' and 'problem'"),
    ('[{"question": "q", "answer": "1"}]', r"item 0: needs exactly one of 'prompt' and 'problem', has neither"),
    ('[{"prompt": "q", "answer": "1"}, {"prompt": "q"}]', r"item 1: missing key 'answer'"),
    ('[{"prompt": "q", "answer": null}]', r"item 0: 'answer' must be a string or a number"),
    ('[{"prompt": "q", "answer": NaN}]', r"item 0: 'answer' must be finite, got nan"),
    ('[{"prompt": "q", "answer": -Infinity}]', r"item 0: 'answer' must be finite, got -inf"),
    ('[{"prompt": "q", "answer": " "}]', r"item 0: 'answer': blank ' '"),
    ('[{"prompt": "q", "answer": "\\\\boxed{1"}]', r"item 0: 'answer': .* has an empty or unclosed \\boxed"),
    ('[{"prompt": "q", "answer": "3"}, {"prompt": "q", "answer": "\\\\boxed"}]', r"item 1: 'answer': .* has an empty or unclosed"),
    ('[{"prompt": "", "answer": "1"}]', r"item 0: 'prompt' must be a non-blank string"),
    ('[{"problem": ["q"], "answer": "1"}]', r"item 0: 'problem' must be a non-blank string"),
    ('[{"prompt": [{"role": "user"}], "answer": "1"}]', r"item 0, key 'prompt': each message needs string"),
    ('[{"problem": " \\n", "answer": "1"}]', r"item 0: 'problem' must be a non-blank string"),
    ('[{"prompt": [{"role": "system", "content": "s"}], "answer": "1"}]',
     r"item 0, key 'prompt': a prompt must end with a user message .*, ends with 'system'"),
    ('[{"prompt": [{"role": "User", "content": "q"}], "answer": "1"}]', r"item 0, key 'prompt': unknown message role\(s\) \['User'\]"),
    ('{"prompt": "q", "answer": "1"}\n{"prompt": "r", "answer": "2"}',
     r"not valid JSON: Extra data.* \(one object per line is JSON Lines: write one JSON list\)"),
    ('[{"prompt": "q", "answer": 1' + "0" * 5000 + '}]', r"Exceeds the limit \(4300 digits\)"),
])
def test_bad_validation_json_names_file_and_item(tmp_path, content, message):
    path = tmp_path / "bench.json"
    path.write_text(content)
    with pytest.raises(DataError, match=rf"bench\.json: {message}"):
        read_validation_json(path)


@pytest.mark.parametrize("encoding, error", [
    ("utf-8-sig", None),  # the byte-order mark Windows tools write
    ("utf-16", r"bench\.json: not UTF-8 text \(byte 0\); JSON files are UTF-8"),
    ("latin-1", r"bench\.json: not UTF-8 text \(byte 16\)"),  # the é
])
def test_validation_json_encodings(tmp_path, encoding, error):
    path = tmp_path / "bench.json"
    path.write_text('[{"prompt": "caf\u00e9 2+2?", "answer": "4"}]', encoding=encoding)
    if error is None:
        assert read_validation_json(path)[0].prompt[0]["content"] == "caf\u00e9 2+2?"
    else:
        with pytest.raises(DataError, match=error):
            read_validation_json(path)


def test_read_problems_dispatch(tmp_path):
    for name in ("x.csv", "x.json"):
        (tmp_path / name).write_text("")
    with pytest.raises(DataError, match=r"unknown data file type '\.csv'"):
        read_problems(tmp_path / "x.csv")
    with pytest.raises(DataError, match=r"validation JSON files have no demonstrations"):
        read_problems(tmp_path / "x.json", require_target=True)
    for name in ("missing.parquet", "missing.json"):
        with pytest.raises(DataError, match=rf"{name}: no such file$"):
            read_problems(tmp_path / name)
    with pytest.raises(DataError, match="no such file"):
        read_problems(tmp_path)  # a directory is not a data file


# ---- tokenisation ------------------------------------------------------------------------------


def test_prompts_use_the_chat_template(tok):
    ps = PromptSet([_problem(i) for i in range(3)], tok, max_prompt_length=64, max_response_length=32)
    text = tok.apply_chat_template(_problem(1).prompt, add_generation_prompt=True, tokenize=False)
    assert ps.prompt_texts[1] == text and text.endswith("<|im_start|>assistant\n")
    assert ps.prompts[1].tolist() == tok(text, add_special_tokens=False)["input_ids"]
    assert ps.prompts[1].dtype == np.int32 and ps.dropped == 0


def test_overlong_prompts_are_dropped_and_logged(tok, caplog):
    problems = [_problem(1), Problem(prompt=[{"role": "user", "content": "x" * 100}], ground_truth="1"), _problem(2)]
    with caplog.at_level(logging.WARNING, logger="hpt_fast.data"):
        ps = PromptSet(problems, tok, max_prompt_length=40, max_response_length=32, name="set")
    assert ps.dropped == 1 and [p.ground_truth for p in ps.problems] == ["2", "3"]
    assert "set: dropped 1 of 3 prompts longer than max_prompt_length = 40" in caplog.text
    with pytest.raises(DataError, match="every prompt is longer"):
        PromptSet(problems, tok, max_prompt_length=5, max_response_length=32)
    # a prompt that fills the model's context leaves no room to generate: dropped, not an engine
    # error hours into the run
    lengths = [len(ids) for ids in tok([render_prompt(tok, p.prompt) for p in problems], add_special_tokens=False)["input_ids"]]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hpt_fast.data"):
        ps = PromptSet(problems, tok, max_prompt_length=1000, max_response_length=32, name="set", max_context=lengths[0] + 1)
    assert ps.dropped == 1 and [p.ground_truth for p in ps.problems] == ["2", "3"]
    assert f"dropped 1 of 3 prompts longer than {lengths[0]} tokens (the model's context of {lengths[0] + 1} less one)" in caplog.text
    with pytest.raises(DataError, match="no problems"):
        PromptSet([], tok, max_prompt_length=5, max_response_length=32)


def test_prompt_length_limits_keep_a_prompt_exactly_at_the_limit(tok: PreTrainedTokenizerFast) -> None:
    """A prompt of exactly max_prompt_length tokens is kept, one token longer is dropped; against
    the model's context the limit is context - 1 (one token left to generate): a prompt of
    context - 1 tokens is kept, one that fills the context is dropped."""
    problems = [Problem([{"role": "user", "content": "x" * k}], str(k), index=k) for k in (3, 4, 5)]
    n = len(PromptSet(problems[:1], tok, 1000, 32).prompts[0])  # the 3-x prompt's length
    assert [len(PromptSet([p], tok, 1000, 32).prompts[0]) for p in problems] == [n, n + 1, n + 2]

    def kept(**limits: int) -> list[str]:
        return [p.ground_truth for p in PromptSet(problems, tok, max_response_length=32, **limits).problems]

    assert kept(max_prompt_length=n + 1) == ["3", "4"]
    assert kept(max_prompt_length=n) == ["3"]
    assert kept(max_prompt_length=1000, max_context=n + 2) == ["3", "4"]
    assert kept(max_prompt_length=1000, max_context=n + 1) == ["3"]
    # the smaller of the two limits applies, whichever it is
    assert kept(max_prompt_length=n, max_context=n + 2) == ["3"]
    assert kept(max_prompt_length=n + 1, max_context=n + 1) == ["3"]


def test_demonstrations_are_truncated_and_end_with_eos(tok):
    short, long = "<think>\n1+1=2\n</think>\n\\boxed{2}", "<think>\n" + "9" * 100
    problems = [_problem(0, target=short), _problem(1, target=None), _problem(2, target=long)]
    ps = PromptSet(problems, tok, max_prompt_length=64, max_response_length=40)
    batch = ps.batch([2, 1, 0])
    eos = tok.eos_token_id
    assert batch.has_demo == [True, False, True] and batch.demo_ids[1] is None
    assert len(batch.demo_ids[0]) == 40 and batch.demo_ids[0][-1] == eos
    assert batch.demo_ids[0][:-1] == tok(long, add_special_tokens=False)["input_ids"][:39]
    assert batch.demo_ids[2] == tok(short, add_special_tokens=False)["input_ids"] + [eos]
    assert ps.demos_truncated == 1 and batch.ground_truths == ["3", "2", "1"] and batch.indices == [2, 1, 0]
    assert batch.prompt_ids[0] == ps.prompts[2].tolist()


def test_a_demonstration_is_cut_to_the_room_its_prompt_leaves_in_the_context(tok):
    """With the model's context given, a demonstration ends where a rollout of its prompt would
    have to (prompt + demonstration, EOS included, fill the context at most), and the cut counts."""
    long = "<think>\n" + "9" * 100
    problems = [_problem(0, target=long), _problem(1, target="ok")]
    n = len(PromptSet(problems[:1], tok, 1000, 32).prompts[0])
    ps = PromptSet(problems, tok, max_prompt_length=1000, max_response_length=40, max_context=n + 10)
    batch = ps.batch([0, 1])
    assert len(batch.prompt_ids[0]) + len(batch.demo_ids[0]) == n + 10 and batch.demo_ids[0][-1] == tok.eos_token_id
    assert batch.demo_ids[0][:-1] == tok(long, add_special_tokens=False)["input_ids"][:9]
    assert batch.demo_ids[1] == tok("ok", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ps.demos_truncated == 1
    # a prompt one token short of the context leaves room for EOS alone
    ps = PromptSet(problems[:1], tok, max_prompt_length=1000, max_response_length=40, max_context=n + 1)
    assert ps.batch([0]).demo_ids[0] == [tok.eos_token_id] and ps.demos_truncated == 1
    # a context larger than prompt + max_response_length changes nothing
    wide = PromptSet(problems[:1], tok, max_prompt_length=1000, max_response_length=40, max_context=n + 41)
    assert wide.batch([0]).demo_ids[0] == tok(long, add_special_tokens=False)["input_ids"][:39] + [tok.eos_token_id]


def test_plain_template_suffix_and_think_prefix(tok):
    template = "Q: {prompt}\nA (in \\boxed{}): <think>\n"
    text = render_prompt(tok, _problem(0).prompt, template, suffix=" Box it.")
    assert text == "Q: What is 0+1? Box it.\nA (in \\boxed{}): <think>\n"
    ps = PromptSet([_problem(0, target="<think>\nok")], tok, 64, 16, template=template)
    # the prompt already opens the <think> block, so the demonstration does not repeat it
    assert ps.batch([0]).demo_ids[0] == tok("ok", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # with the chat template the suffix goes on the user turns only
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]
    text = render_prompt(tok, messages, suffix=" Box it.")
    assert "1+1? Box it." in text and "Be brief." in text and "Be brief. Box it." not in text


def test_a_tokenizer_that_adds_bos_gives_each_prompt_one_bos() -> None:
    """A base model's tokenizer adds BOS (LLaMA's): a ``prompt_template`` prompt gets it from the
    tokenizer, a chat-template prompt, or a ``prompt_template`` starting with the BOS text, from
    the template, each exactly once at the start; a demonstration, which continues the prompt,
    gets none."""
    bos_tok = build_tokenizer()
    bos_tok.add_bos_token = True
    bos = bos_tok.bos_token_id
    assert bos_tok("Q")["input_ids"] == [bos, bos_tok.convert_tokens_to_ids("Q")]  # it does add one
    template = "Question:\n{prompt}\nAnswer:"
    demo = "<think>\n1+1=2\n</think>\n\\boxed{2}"
    templates = {"template": template, "chat": None, "template with BOS": bos_tok.bos_token + template}
    for kind, chosen in templates.items():
        ps = PromptSet([_problem(1, target=demo)], bos_tok, 64, 40, template=chosen)
        ids = ps.prompts[0].tolist()
        text = ps.prompt_texts[0]
        # the chat template writes BOS into the text, as may a plain one; else the tokenizer adds it
        writes_bos = kind != "template"
        assert text.startswith(bos_tok.bos_token) == writes_bos, kind
        body = text[len(bos_tok.bos_token):] if writes_bos else text
        assert ids == [bos] + bos_tok(body, add_special_tokens=False)["input_ids"], kind
        assert ids.count(bos) == 1, kind
        demo_ids = bos_tok(demo, add_special_tokens=False)["input_ids"] + [bos_tok.eos_token_id]
        assert ps.batch([0]).demo_ids[0] == demo_ids, kind


def test_tokenizer_without_chat_template(tok):
    bare = build_tokenizer()
    bare.chat_template = None
    with pytest.raises(DataError, match="no chat template; set data.prompt_template"):
        render_prompt(bare, _problem(0).prompt)


def test_a_chat_template_that_refuses_the_messages_is_a_data_error(tok):
    """Gemma's template raises on a system turn, from inside jinja."""
    strict = build_tokenizer()
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    system = Problem(prompt=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1?"}],
                     ground_truth="2", index=7)
    with pytest.raises(DataError, match="set: problem 7: the chat template refused its messages: System role not supported"):
        PromptSet([_problem(0), system], strict, 64, 32, name="set")


def test_load_prompt_set_concatenates_files(tok, tmp_path):
    write_train_parquet(tmp_path / "a.parquet", [_problem(0)])
    write_train_parquet(tmp_path / "b.parquet", [_problem(1), _problem(2)])
    ps = load_prompt_set([tmp_path / "a.parquet", tmp_path / "b.parquet"], tok, 64, 32, require_target=True)
    assert [p.ground_truth for p in ps.problems] == ["1", "2", "3"] and ps.name == "train"


def test_ragged():
    r = Ragged([[1, 2], [], [3]])
    assert len(r) == 3 and r[0].tolist() == [1, 2] and r[1].tolist() == [] and r.lengths().tolist() == [2, 0, 1]


# ---- order -------------------------------------------------------------------------------------


def test_sampler_is_deterministic_by_seed_and_epoch():
    a, b = PromptSampler(10, seed=3), PromptSampler(10, seed=3)
    assert [a.next_batch(4) for _ in range(6)] == [b.next_batch(4) for _ in range(6)]
    c = PromptSampler(10, seed=4)
    assert c.order(0).tolist() != a.order(0).tolist()
    assert sorted(a.order(1).tolist()) == list(range(10)) and a.order(1).tolist() != a.order(0).tolist()
    assert PromptSampler(5, seed=0, shuffle=False).next_batch(5) == [0, 1, 2, 3, 4]


def test_a_batch_size_dividing_the_prompts_covers_every_epoch():
    """8 prompts in batches of 4: each epoch is two batches, every prompt once (the epoch's last
    batch is not skipped)."""
    s = PromptSampler(8, seed=1)
    for epoch in range(3):
        assert sorted(s.next_batch(4) + s.next_batch(4)) == list(range(8)), epoch
    assert s.state_dict() == {"epoch": 2, "index": 8}


def test_sampler_batches_stay_within_an_epoch():
    s = PromptSampler(10, seed=0)
    batches = [s.next_batch(4) for _ in range(3)]
    assert batches[0] + batches[1] == s.order(0)[:8].tolist()
    assert batches[2] == s.order(1)[:4].tolist() and s.state_dict() == {"epoch": 1, "index": 4}
    assert len(set(batches[0] + batches[1])) == 8


def test_sampler_in_file_order_gives_every_prompt_its_turn():
    """Without shuffling a batch runs on into the next epoch: no prompt is skipped every epoch."""
    s = PromptSampler(10, seed=0, shuffle=False)
    batches = [s.next_batch(4) for _ in range(5)]
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1], [2, 3, 4, 5], [6, 7, 8, 9]]
    assert s.state_dict() == {"epoch": 1, "index": 10}
    resumed = PromptSampler(10, seed=0, shuffle=False)
    resumed.load_state_dict({"epoch": 0, "index": 8})
    assert resumed.next_batch(4) == [8, 9, 0, 1] and resumed.state_dict() == {"epoch": 1, "index": 2}


def test_sampler_resumes_from_its_position():
    s = PromptSampler(37, seed=9)
    for _ in range(5):
        s.next_batch(8)
    state = s.state_dict()
    expected = [s.next_batch(8) for _ in range(7)]
    resumed = PromptSampler(37, seed=9)
    resumed.load_state_dict(state)
    assert [resumed.next_batch(8) for _ in range(7)] == expected


def test_sampler_errors():
    with pytest.raises(ValueError, match="batch_size must be in"):
        PromptSampler(4, 0).next_batch(5)
    with pytest.raises(ValueError, match="bad sampler position"):
        PromptSampler(4, 0).load_state_dict({"epoch": 0, "index": 9})


def test_shard():
    assert [shard(list(range(8)), r, 4) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError, match="does not split evenly"):
        shard([1, 2, 3], 0, 2)
