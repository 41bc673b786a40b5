"""hpt_fast.eval (pass@k estimator, scoring, the CLI on the toy model) and hpt_fast.plot."""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpt_fast import eval as ev
from hpt_fast import plot
from hpt_fast.data import Problem, PromptSet
from hpt_fast.reward import RewardPool
from hpt_fast.rollout.base import Sample
from hpt_fast.toy import ToySpec, build_tokenizer, build_toy

# the smallest toy build: 5 validation problems per level, a token warm-up
TINY_TOY = ToySpec(train_per_level=8, val_per_level=5, hidden_size=32, intermediate_size=64,
                   warmup_steps=2, warmup_batch=4)


# ---- pass@k ------------------------------------------------------------------------------------


def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert ev.pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_and_edges():
    assert ev.pass_at_k(1000, 0, 500) == 0.0
    assert ev.pass_at_k(1000, 501, 500) == 1.0  # fewer wrong samples than k: always a correct one
    assert ev.pass_at_k(1000, 1, 1) == pytest.approx(1e-3)
    assert ev.pass_at_k(1000, 1, 10) == pytest.approx(1e-2)


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError, match="need"):
        ev.pass_at_k(n, c, k)


def test_curve_starts_at_the_mean_accuracy():
    correct, n = [0, 1, 3, 4], 4
    curve = ev.pass_at_k_curve(correct, n)
    assert curve[0] == pytest.approx(sum(correct) / (len(correct) * n))
    assert curve[-1] == pytest.approx(3 / 4)  # problems with any correct sample
    assert curve == sorted(curve)


# ---- scoring with a scripted engine -------------------------------------------------------------


class ScriptedEngine:
    """Returns, for the prompt of problem i, n samples of which ``right[i]`` box the answer: those
    from sample i on, cyclically, so each problem's right ones sit elsewhere and a mix-up of samples
    across problems changes the counts."""

    def __init__(self, tokenizer, prompts: PromptSet, right: list[int]):
        self.tokenizer = tokenizer
        self.plan = {tuple(prompts.prompts[i].tolist()): (p.ground_truth, right[i], i)
                     for i, p in enumerate(prompts.problems)}
        self.seeds = []
        self.logprobs_needed = []

    def generate(self, prompt_ids, *, n, max_new_tokens, temperature, top_p, stop_token_ids, seed, logprobs_needed=True):
        self.seeds.append(seed)
        self.logprobs_needed.append(logprobs_needed)
        out = []
        for ids in prompt_ids:
            answer, right, i = self.plan[tuple(ids)]
            texts = [f"so \\boxed{{{answer if (j - i) % n < right else 'x'}}}" for j in range(n)]
            out.append([
                Sample(self.tokenizer.encode(t) + [self.tokenizer.eos_token_id], None, "stop" if j else "length")
                for j, t in enumerate(texts)
            ])
        return out

    def update_weights(self): ...
    def sleep(self): ...
    def wake(self): ...


def test_evaluate_set_counts_correct_samples_per_problem():
    tok = build_tokenizer()
    problems = [Problem([{"role": "user", "content": f"What is {i}+1?"}], str(i + 1), index=i) for i in range(5)]
    prompts = PromptSet(problems, tok, max_prompt_length=64, max_response_length=16, name="scripted")
    right = [0, 1, 2, 3, 3]
    engine = ScriptedEngine(tok, prompts, right)
    settings = ev.EvalSettings(n=3, batch_size=2, max_new_tokens=16)
    with RewardPool(num_workers=1) as pool:
        result = ev.evaluate_set(engine, prompts, settings, pool, [tok.eos_token_id], "scripted.json")
    assert result.correct == [0, 1, 2, 3, 3]
    assert result.indices == [0, 1, 2, 3, 4]
    assert result.avg == pytest.approx(9 / 15)
    assert result.pass_curve[-1] == pytest.approx(4 / 5)
    # what is reported: pass@2 by hand, 1 - C(3 - c, 2) / C(3, 2) per problem = 0, 2/3, 1, 1, 1
    report = result.to_json()
    assert (report["avg@3"], report["pass@3"]) == pytest.approx((9 / 15, 4 / 5))
    assert report["pass_at"] == pytest.approx({"1": 9 / 15, "2": (2 / 3 + 3) / 5, "3": 4 / 5})
    assert report["correct"] == {"0": 0, "1": 1, "2": 2, "3": 3, "4": 3}
    assert "| scripted | 5 | 0.6000 | 0.8000 |" in ev.format_tables([result])
    assert result.truncated == pytest.approx(1 / 3)  # the first sample of each problem
    assert len(engine.seeds) == 3 and len(set(engine.seeds)) == 3  # 5 prompts in batches of 2
    assert engine.logprobs_needed == [False] * 3  # evaluation may sample with top-p on any engine


def failing_check(answer: str, gold: str) -> bool:
    raise RuntimeError("parser bug")


def test_checks_that_did_not_finish_are_counted_and_printed():
    """A sample whose answer check timed out, crashed or raised scored 0 without a word."""
    tok = build_tokenizer()
    problems = [Problem([{"role": "user", "content": f"What is {i}+1?"}], str(i + 1), index=i) for i in range(3)]
    prompts = PromptSet(problems, tok, max_prompt_length=64, max_response_length=16, name="scripted")
    engine = ScriptedEngine(tok, prompts, right=[0, 1, 2])  # "\boxed{x}" goes to the failing check
    with RewardPool(num_workers=1, check=failing_check) as pool:
        result = ev.evaluate_set(engine, prompts, ev.EvalSettings(n=2, max_new_tokens=16), pool, [tok.eos_token_id], "s.json")
    assert result.correct == [0, 1, 2] and result.undecided == 3 and result.to_json()["undecided"] == 3
    assert "samples scored 0 because their answer check did not finish (time limit, crash): scripted: 3" in (
        ev.format_tables([result]))


# ---- the eval CLI on the toy model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return build_toy(tmp_path_factory.mktemp("toy"), spec=TINY_TOY)


def test_eval_cli_on_toy_model(toy, tmp_path, capsys):
    name, data = next(iter(toy.validation.items()))
    out = tmp_path / "res" / "results.json"
    rc = ev.main(["--model", str(toy.model), "--data", str(data), "--n", "2", "--max-new-tokens", "6",
                  "--batch-size", "3", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| benchmark | problems | avg@2 | pass@2 |" in printed
    assert f"| {name} | 5 |" in printed
    assert "pass@1 | pass@2 |" in printed
    report = json.loads(out.read_text())
    assert report["settings"]["n"] == 2 and report["settings"]["temperature"] == 0.6
    bench = report["benchmarks"][name]
    assert bench["problems"] == 5 and bench["dropped"] == 0
    assert set(bench["pass_at"]) == {"1", "2"}
    assert bench["pass_at"]["1"] == pytest.approx(bench["avg@2"])
    assert bench["pass_at"]["2"] == bench["pass@2"]
    assert sorted(bench["correct"]) == ["0", "1", "2", "3", "4"]
    assert 0 < bench["response_length"] <= 6 and bench["undecided"] == 0


def _exit_message(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        ev.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_eval_cli_rejects_bad_arguments(tmp_path, capsys):
    data = tmp_path / "set.json"
    data.write_text('[{"problem": "1+1?", "answer": 2}]')
    # a run directory, not one of its checkpoints: refused by name, not by a missing-library error
    assert "has no config.json: not a model directory" in _exit_message(
        capsys, ["--model", str(tmp_path), "--data", str(data), "--n", "2"])
    (tmp_path / "config.json").write_text("{}")
    assert "--model: " + str(tmp_path) + " has no tokenizer_config.json or tokenizer.json" in _exit_message(
        capsys, ["--model", str(tmp_path), "--data", str(data), "--n", "2"])
    (tmp_path / "tokenizer.json").write_text("{}")
    base = ["--model", str(tmp_path), "--data", str(data)]
    assert "--n must be >= 1, got 0" in _exit_message(capsys, base + ["--n", "0"])
    assert "no such file" in _exit_message(capsys, ["--model", str(tmp_path), "--data", str(tmp_path / "nope.json"), "--n", "2"])
    assert "no such directory" in _exit_message(capsys, ["--model", str(tmp_path / "nope"), "--data", str(data), "--n", "2"])
    assert "given twice" in _exit_message(capsys, base + [str(data), "--n", "2"])
    assert "--top-p" in _exit_message(capsys, base + ["--n", "2", "--top-p", "0"])
    assert "--reward-timeout-s must be a finite number > 0, got inf" in _exit_message(
        capsys, base + ["--n", "2", "--reward-timeout-s", "inf"])
    assert "--reward-workers must be >= 1, got 0" in _exit_message(capsys, base + ["--n", "2", "--reward-workers", "0"])
    assert "--n" in _exit_message(capsys, ["--model", str(tmp_path), "--data", str(data)])
    # where the results go is checked before hours of generation, not after
    assert f"--out: {tmp_path} is a directory" in _exit_message(capsys, base + ["--n", "2", "--out", str(tmp_path)])
    assert f"--out: {data} is a file, not a directory" in _exit_message(
        capsys, base + ["--n", "2", "--out", str(data / "sub" / "r.json")])


def test_eval_cli_reports_bad_data_before_loading_the_model(toy, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"problem": "1+1?"}]')
    assert ev.main(["--model", str(toy.model), "--data", str(bad), "--n", "1"]) == 2
    assert "missing key 'answer'" in capsys.readouterr().err


# ---- plot ----------------------------------------------------------------------------------------


def _write_metrics(run: Path) -> None:
    rows = [{"step": 0, "val/toy-add1/avg@4": 0.2, "val/toy-add1/pass@4": 0.5}]
    for s in range(1, 6):
        rows.append({
            "step": s, "rule": "hpt", "reward_mean": 0.1 * s, "sft_fraction": 0.5, "loss": 1.0 / s,
            "rl_loss": 0.5 / s, "sft_loss": 0.5 / s, "grad_norm": 2.0, "response_length": 30 + s,
            "time_rollout": 1.0, "time_reward": 0.1, "time_train": 0.5, "time_weight_update": 0.0,
            "tokens_per_s": 900.0, "entropy_mean": 1.2,
        })
    rows[-1].update({"val/toy-add1/avg@4": 0.4, "val/toy-add1/pass@4": 0.75})
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, lines[3][:20])  # a partial line, as a killed run leaves
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_plot_cli_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    _write_metrics(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "hpt_fast.plot", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 malformed line(s): 4" in proc.stderr
    written = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert written == sorted(f"{n}.png" for n in (
        "reward", "validation", "sft_fraction", "loss", "entropy", "grad_norm", "response_length", "time",
        "tokens_per_s"))  # no clip_fraction: never logged
    assert proc.stdout.split() == [str(tmp_path / "plots" / n) for n in
                                   [f"{p.name}.png" for p in plot.PANELS if f"{p.name}.png" in written]]
    for name in written:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_merges_lines_of_one_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 2, "loss": 1.0, "val/a/avg@1": 0.5}\n')
    assert plot.load_steps(tmp_path) == {1: {"loss": 3.0}, 2: {"loss": 1.0, "val/a/avg@1": 0.5}}


def test_plot_errors(tmp_path, capsys):
    assert plot.main([str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert plot.main([str(tmp_path)]) == 2
    assert "metrics.jsonl: not found" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(plot.PlotError, match="no metrics to plot"):
        plot.load_steps(tmp_path)


def test_plot_without_matplotlib_says_how_to_install(tmp_path, capsys, monkeypatch):
    _write_metrics(tmp_path)
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, name, None)  # as if matplotlib were not installed
    assert plot.main([str(tmp_path)]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
