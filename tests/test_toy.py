"""The embedded toy task: consistent problems, a round-tripping tokenizer, a fast cached build and a
warmed-up model that measurably solves held-out easy problems."""
import itertools
import re
import time
from collections import Counter

import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer, Qwen2Config

from hpt_fast.config import TOY, Config, ConfigError, load_config
from hpt_fast.data import Problem, read_train_parquet, read_validation_json
from hpt_fast.reward import extract_boxed
from hpt_fast.toy import (
    LEVELS, ToySpec, build_tokenizer, build_toy, content_hash, greedy_accuracy, level_problems, load_toy,
    split_problems, use_toy,
)

# one build for the module; its wall time is part of what is tested
_BUILD = {}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    start = time.perf_counter()
    paths = build_toy(root, seed=0)
    _BUILD["seconds"] = time.perf_counter() - start
    _BUILD["dir"] = root
    return paths


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_demonstrations_are_correct_worked_solutions(level):
    for p in level_problems(level, seed=0)[:300]:
        think, _, tail = p.target.partition("</think>\n")
        assert think.startswith("<think>\n") and extract_boxed(tail) == p.ground_truth
        for line in think.split("\n")[1:-1]:
            lhs, rhs = line.split("=")
            assert sum(int(t) for t in lhs.split("+")) == int(rhs), line
        expression = re.sub(r"[^0-9+]", "", p.prompt[0]["content"])
        assert sum(int(t) for t in expression.split("+")) == int(p.ground_truth)


def _operands(p: Problem) -> list[int]:
    """The numbers a problem adds, read back from its statement."""
    return [int(t) for t in re.sub(r"[^0-9+]", "", p.prompt[0]["content"]).split("+")]


@pytest.mark.parametrize("level, terms", [(2, 3), (3, 4)])
def test_chained_levels_never_carry_before_the_last_term(level: int, terms: int) -> None:
    """Levels 2 and 3 hold every digit tuple whose running sums carry at the last term at the earliest."""
    # so each worked line but the last is a level-1 fact; the last one may carry
    problems = level_problems(level, seed=0)
    tuples = {tuple(_operands(p)) for p in problems}
    no_early_carry = {t for t in itertools.product(range(10), repeat=terms)
                      if all(sum(t[:k]) < 10 for k in range(2, terms))}
    assert tuples == no_early_carry
    assert any(sum(t) >= 10 for t in tuples)  # the last addition does carry in some problems
    for p in problems[:500]:
        lines = p.target.partition("</think>")[0].split("\n")[1:-1]
        assert len(lines) == terms - 1
        for line in lines[:-1]:
            assert all(len(n) == 1 for n in re.split("[+=]", line)), line
        assert int(lines[-1].split("=")[1]) == sum(_operands(p)) == int(p.ground_truth)


def test_two_digit_demonstrations_carry_exactly_when_the_units_overflow() -> None:
    """Level 4's worked lines carry 1 exactly when the units sum past 9, and their digits make the answer."""
    # units, tens, tens + carry, then the whole sum, over every pair of two-digit numbers
    problems = level_problems(4, seed=0)
    assert {tuple(_operands(p)) for p in problems} == set(itertools.product(range(10, 100), repeat=2))
    carries = Counter()
    for p in {p.target: p for p in problems}.values():  # one demonstration per operand pair
        x, y = _operands(p)
        units, tens, carried, whole = p.target.partition("</think>")[0].split("\n")[1:-1]
        assert units == f"{x % 10}+{y % 10}={x % 10 + y % 10}" and tens == f"{x // 10}+{y // 10}={x // 10 + y // 10}"
        carry = int(x % 10 + y % 10 >= 10)
        assert carried == f"{x // 10 + y // 10}+{carry}={x // 10 + y // 10 + carry}"
        carries[carry] += 1
        # the tens line with the carry gives the leading digits, the units sum's last digit the rest
        answer = int(p.ground_truth)
        assert answer == x + y and whole == f"{x}+{y}={answer}"
        assert str(answer) == carried.split("=")[1] + units.split("=")[1][-1]
    assert carries == {1: 45 * 81, 0: 55 * 81}  # 45 of the 100 units pairs carry, for 9 * 9 tens pairs


def test_held_out_statements_are_unseen():
    train, val = split_problems(seed=1, train_per_level=100, val_per_level=20)
    assert len(train) == 100 * len(LEVELS) and all(len(v) == 20 for v in val.values())
    seen = {p.prompt[0]["content"] for p in train}
    assert not seen & {p.prompt[0]["content"] for v in val.values() for p in v}
    assert all(p.target is None for v in val.values() for p in v)


def test_tokenizer_round_trips(tmp_path):
    tok = build_tokenizer()
    text = "".join(chr(c) for c in range(32, 127)) + "\n<think>\n12+30=42\n</think>\n\\boxed{42}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.unk_token_id not in ids  # one token per character
    assert tok.decode(ids) == text and tok.decode(tok("naïve ∑", add_special_tokens=False)["input_ids"]) == "naïve ∑"
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<bos><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    chat_ids = tok(chat, add_special_tokens=False)["input_ids"]
    assert chat_ids[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<|im_start|>")]
    # saved beside a Qwen2 config, as in a toy build: AutoTokenizer then picks Qwen2Tokenizer
    Qwen2Config(vocab_size=len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for s in (text, chat):
        assert loaded(s, add_special_tokens=False)["input_ids"] == tok(s, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == text and len(loaded) == len(tok)
    assert loaded.eos_token == "<|im_end|>" and loaded.pad_token == "<pad>" and loaded.chat_template == tok.chat_template


def test_build_is_quick_complete_and_cached(toy):
    assert _BUILD["seconds"] < 120, f"the toy build took {_BUILD['seconds']:.0f} s"
    assert (toy.model / "model.safetensors").exists() and (toy.model / "tokenizer.json").exists()
    assert load_file(toy.model / "model.safetensors")
    train = read_train_parquet(toy.train)
    assert len(train) == ToySpec().train_per_level * len(LEVELS) and all(p.target for p in train)
    assert sorted(toy.validation) == sorted(f"toy-{lvl.name}" for lvl in LEVELS.values())
    assert all(len(read_validation_json(f)) == ToySpec().val_per_level for f in toy.validation.values())
    start = time.perf_counter()
    again = build_toy(_BUILD["dir"], seed=0)
    assert again == toy and time.perf_counter() - start < 1.0


def test_warmed_up_model_solves_held_out_easy_problems(toy):
    model, tok = load_toy(toy)
    easy = read_validation_json(toy.validation["toy-add1"])
    hard = read_validation_json(toy.validation["toy-add2digit"])
    easy_acc, hard_acc = greedy_accuracy(model, tok, easy), greedy_accuracy(model, tok, hard)
    # measured at build time 1.0 and 0.0: easy rollouts succeed, hard ones are left for SFT
    assert easy_acc >= 0.5 and hard_acc < easy_acc


def test_use_toy_replaces_the_toy_paths(toy):
    cfg = Config()
    cfg.toy.dir = str(_BUILD["dir"])
    cfg.validation.files = [TOY, "extra.json"]
    resolved = use_toy(cfg)
    assert resolved.model.path == str(toy.model) and resolved.data.train_files == [str(toy.train)]
    assert resolved.validation.files == [str(p) for p in toy.validation.values()] + ["extra.json"]
    assert cfg.model.path == TOY  # the input is left as it was
    cfg.model.path, cfg.data.train_files, cfg.validation.files = "m", ["t.parquet"], []
    assert use_toy(cfg) is cfg


def test_content_hash_covers_seed_and_spec():
    assert content_hash(0, ToySpec()) == content_hash(0, ToySpec())
    assert content_hash(1, ToySpec()) != content_hash(0, ToySpec())
    assert content_hash(0, ToySpec(warmup_steps=10)) != content_hash(0, ToySpec())


def test_an_uncreatable_toy_dir_is_a_config_error(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match=r"toy\.dir: cannot create .*a_file/toy"):
        use_toy(load_config(None, [f"toy.dir={tmp_path / 'a_file' / 'toy'}"]))
