"""bench/ablations.py: the variants are valid configs, and the task-mix file drops exactly its levels."""
import json
import math

import pytest

from bench.ablations import VARIANTS, Variant, luffy_reference, task_mix_file, variant_overrides, welch_t
from bench.reproduce import CONFIGS, REPO, training_summary
from hpt_fast.config import build_estimators, load_config
from hpt_fast.data import Problem, read_train_parquet, write_train_parquet


def _problem(source: str, i: int) -> Problem:
    return Problem(prompt=[{"role": "user", "content": f"What is {i}+1?"}], ground_truth=str(i + 1),
                   target=f"<think>\n{i}+1={i + 1}\n</think>\n\\boxed{{{i + 1}}}", data_source=source, index=i)


@pytest.fixture
def train_file(tmp_path):
    path = tmp_path / "train.parquet"
    write_train_parquet(path, [_problem(s, i) for i, s in enumerate(["toy-add1", "toy-add2digit", "toy-add3"] * 3)])
    return path


def test_every_variant_is_a_valid_config(tmp_path, train_file):
    # an override the config or the estimator rejects would fail only after minutes of sweeping
    names = [v.name for v in VARIANTS]
    assert len(set(names)) == len(names)
    for v in VARIANTS:
        cfg = load_config(REPO / CONFIGS[v.method], variant_overrides(v, tmp_path / "data", train_file))
        build_estimators(cfg)
        assert cfg.algorithm.method == v.method
        if v.drop_levels:
            assert cfg.data.train_files != ["toy"]


def test_task_mix_file_drops_only_the_named_levels(tmp_path, train_file):
    path = task_mix_file(train_file, ["toy-add2digit"], tmp_path / "data")
    kept = read_train_parquet(path)
    assert [p.data_source for p in kept] == ["toy-add1", "toy-add3"] * 3
    assert [p.ground_truth for p in kept] == [p.ground_truth for p in read_train_parquet(train_file)
                                              if p.data_source != "toy-add2digit"]
    # the same levels give the same path: a resumed sweep trains on the same file
    assert task_mix_file(train_file, ["toy-add2digit"], tmp_path / "data") == path


def test_task_mix_file_rejects_an_unknown_level(tmp_path, train_file):
    with pytest.raises(ValueError, match="toy-add5"):
        task_mix_file(train_file, ["toy-add5"], tmp_path / "data")


def test_welch_t():
    assert welch_t([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 0.0
    # diff 1, both variances 1 over 3 samples: se = sqrt(2 / 3)
    assert welch_t([2.0, 3.0, 4.0], [1.0, 2.0, 3.0]) == pytest.approx(1 / math.sqrt(2 / 3))
    assert welch_t([1.0, 1.0], [1.0, 1.0]) is None
    assert welch_t([1.0], [1.0, 2.0]) is None


def test_demo_fit_per_level(tmp_path, train_file):
    import torch

    from bench.ablations import demo_fit
    from hpt_fast.toy import ToySpec, build_model, build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = build_model(tokenizer, ToySpec(hidden_size=16, intermediate_size=32, num_layers=1))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = demo_fit(tmp_path / "model", train_file, per_level=2)
    assert list(out) == ["toy-add1", "toy-add2digit", "toy-add3"]
    # an untrained model is close to uniform over its vocabulary: entropy and NLL near log V
    log_v = math.log(len(tokenizer))
    for level in out.values():
        assert 0.9 * log_v < level["entropy"] <= log_v + 1e-4
        assert abs(level["nll"] - log_v) < 0.5


def test_luffy_reference_trains_on_the_same_task_mix():
    full, no2 = Variant("l", "luffy"), Variant("l2", "luffy", drop_levels=("toy-add2digit",))
    tuned = Variant("l3", "luffy", ("algorithm.entropy_coef=0",))
    variants = [tuned, full, no2]
    assert luffy_reference(Variant("h", "hpt"), variants) == "l"
    assert luffy_reference(Variant("h2", "hpt", drop_levels=("toy-add2digit",)), variants) == "l2"
    assert luffy_reference(Variant("h3", "hpt", drop_levels=("toy-add4",)), variants) is None
    assert luffy_reference(full, variants) is None
    # the shipped sweep has a LUFFY baseline for every task mix it trains HPT on
    assert all(luffy_reference(v, VARIANTS) for v in VARIANTS if v.method == "hpt")


def test_training_summary_averages_the_demonstration_row_fraction(tmp_path):
    """The tables' fraction is the trained rows' share of demonstrations (batch_sft_fraction), not
    the share of prompts sent to SFT (sft_fraction, 1 on every LUFFY step); validation-only lines
    count for the curve, not for the training means."""
    lines = [
        {"step": 0, "val/toy-add1/avg@4": 0.5, "val/toy-add3/avg@4": 0.1},
        {"step": 1, "reward_mean": 0.2, "sft_fraction": 1.0, "batch_sft_fraction": 0.25},
        {"step": 2, "reward_mean": 0.4, "sft_fraction": 1.0, "batch_sft_fraction": 0.125,
         "val/toy-add1/avg@4": 0.75, "val/toy-add3/avg@4": 0.25},
    ]
    lines.append({"step": 3, "reward_mean": 0.3, "sft_fraction": 1.0})  # no trained row: no statistic
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    summary = training_summary(tmp_path)
    assert summary["demo_row_fraction"] == pytest.approx(0.1875)
    assert summary["reward_mean"] == pytest.approx(0.3)
    # a log from before the row share was renamed batch_sft_fraction: it is sft_fraction there
    old = [{k: v for k, v in m.items() if k != "sft_fraction"} for m in lines[:3]]
    old = [{("sft_fraction" if k == "batch_sft_fraction" else k): v for k, v in m.items()} for m in old]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in old))
    assert training_summary(tmp_path)["demo_row_fraction"] == pytest.approx(0.1875)
    assert summary["curve"][2]["toy-add1"] == 0.75 and summary["curve"][0]["overall"] == pytest.approx(0.3)


def test_steps_without_rollouts_count_for_the_row_fraction_not_the_reward(tmp_path):
    """An SFT step logs no reward (older logs wrote 0 there, with response length 0): the table's
    rollout reward is over the steps that had rollouts, and absent for a run without any."""
    lines = [
        {"step": 1, "rule": "sft", "train_tokens": 90.0, "sft_fraction": 1.0, "batch_sft_fraction": 1.0},
        {"step": 2, "rule": "sft", "reward_mean": 0.0, "response_length": 0.0, "sft_fraction": 1.0,
         "batch_sft_fraction": 1.0},
        {"step": 3, "rule": "rl", "train_tokens": 80.0, "reward_mean": 0.5, "response_length": 7.5,
         "sft_fraction": 0.0, "batch_sft_fraction": 0.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    summary = training_summary(tmp_path)
    assert summary["reward_mean"] == pytest.approx(0.5)
    assert summary["demo_row_fraction"] == pytest.approx(2 / 3)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines[:2]))
    assert training_summary(tmp_path)["reward_mean"] is None
