"""``python -m hpt_fast.eval --model DIR --data FILE [FILE ...] --n K``: avg@k and pass@k per benchmark.

Each validation JSON file (format in ``hpt_fast.data``) is one benchmark. Every problem gets K
samples from the ``NativeEngine`` (prompts rendered as in training: the tokenizer's chat template,
or ``--prompt-template`` / ``--prompt-suffix``), each scored 0/1 by the training reward
(``hpt_fast.reward``). Per benchmark:

- avg@k: the mean reward over all samples (the expected accuracy of one sample);
- pass@j for j = 1 .. k: the unbiased estimator of the chance that at least one of j samples is
  correct, from the c correct of the k drawn per problem (``pass_at_k``), averaged over problems.
  pass@k is the fraction of problems with a correct sample; pass@1 equals avg@k.

The results are printed as markdown tables and, with ``--out``, written as JSON (per-problem
correct counts included).

Defaults follow hpt.md's validation: temperature 0.6, top-p 0.95, prompts up to 1024 tokens,
responses up to 8192.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from hpt_fast.config import local_dir_problem
from hpt_fast.data import DataError, PromptSet, check_set_names, load_prompt_set
from hpt_fast.reward import RewardPool
from hpt_fast.rollout import NativeEngine, RolloutEngine, context_length, end_token_ids


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from ``c`` correct among ``n`` samples: 1 - C(n-c, k) / C(n, k).

    It is the probability that k samples drawn without replacement from the n contain a correct
    one (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

    Raises:
        ValueError: unless 0 <= c <= n and 1 <= k <= n.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    total = math.comb(n, k)
    # the difference in exact integers, then one correctly rounded division: no cancellation
    # when pass@k is tiny, however large n
    return (total - math.comb(n - c, k)) / total


def pass_at_k_curve(correct: Sequence[int], n: int) -> list[float]:
    """Mean pass@j over problems for j = 1 .. n; ``correct[i]`` is problem i's count out of n."""
    counts = Counter(correct)  # problems share few distinct counts: one estimate per count
    return [sum(m * pass_at_k(n, c, j) for c, m in counts.items()) / len(correct) for j in range(1, n + 1)]


@dataclass(frozen=True)
class EvalSettings:
    """How samples are drawn (the CLI's options of the same names)."""

    n: int
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 8192
    max_prompt_length: int = 1024
    batch_size: int = 64
    seed: int = 0
    prompt_template: Optional[str] = None
    prompt_suffix: str = ""
    reward_workers: int = 2
    reward_timeout_s: float = 5.0


@dataclass(frozen=True)
class BenchmarkResult:
    """One benchmark's outcome.

    Attributes:
        name: the benchmark (``hpt_fast.data.validation_name`` of its file); file: its path.
        n: samples per problem.
        correct: [problems] correct samples per evaluated problem, in file order.
        indices: [problems] each evaluated problem's item index in the file.
        dropped: problems left out for prompts over ``max_prompt_length`` or the model's context.
        response_length: mean generated tokens per sample.
        truncated: fraction of samples cut at ``max_new_tokens`` (or the model's context).
        undecided: samples scored 0 because their answer check did not finish (past its time
            limit, a crashed or failing check: ``hpt_fast.reward.UNDECIDED``).
    """

    name: str
    file: str
    n: int
    correct: list[int]
    indices: list[int]
    dropped: int
    response_length: float
    truncated: float
    undecided: int = 0

    @property
    def avg(self) -> float:
        """avg@n: mean accuracy over all samples."""
        return sum(self.correct) / (len(self.correct) * self.n)

    @property
    def pass_curve(self) -> list[float]:
        """pass@1 .. pass@n."""
        return pass_at_k_curve(self.correct, self.n)

    def to_json(self) -> dict:
        curve = self.pass_curve
        return {
            "file": self.file,
            "problems": len(self.correct),
            "dropped": self.dropped,
            "n": self.n,
            f"avg@{self.n}": self.avg,
            f"pass@{self.n}": curve[-1],
            "pass_at": {str(j): p for j, p in enumerate(curve, start=1)},
            "response_length": self.response_length,
            "truncated": self.truncated,
            "undecided": self.undecided,
            "correct": dict(zip(map(str, self.indices), self.correct)),
        }


def _batch_seed(seed: int, benchmark: int, batch: int) -> int:
    """A distinct sampling seed per (benchmark, batch), so no two batches share random draws."""
    return int(np.random.SeedSequence([seed, benchmark, batch]).generate_state(1)[0])


def evaluate_set(
    engine: RolloutEngine,
    prompts: PromptSet,
    settings: EvalSettings,
    rewards: RewardPool,
    stop_token_ids: Sequence[int],
    file: str,
    benchmark: int = 0,
) -> BenchmarkResult:
    """Sample ``settings.n`` completions per prompt of ``prompts`` in batches and score them.

    ``benchmark`` (its position on the command line) enters the sampling seeds.
    """
    tok = prompts.tokenizer
    correct: list[int] = []
    lengths: list[int] = []
    truncated = undecided = 0
    for b, start in enumerate(range(0, len(prompts), settings.batch_size)):
        batch = prompts.batch(range(start, min(start + settings.batch_size, len(prompts))))
        groups = engine.generate(
            batch.prompt_ids, n=settings.n, max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature, top_p=settings.top_p, stop_token_ids=stop_token_ids,
            seed=_batch_seed(settings.seed, benchmark, b), logprobs_needed=False,
        )
        samples = [s for g in groups for s in g]
        texts = tok.batch_decode([s.token_ids for s in samples], skip_special_tokens=True)
        truths = [gt for gt in batch.ground_truths for _ in range(settings.n)]
        scored = rewards.score(texts, truths)
        undecided += scored.undecided
        correct += [int(c) for c in scored.rewards.reshape(len(groups), settings.n).sum(1)]
        lengths += [len(s.token_ids) for s in samples]
        truncated += sum(s.finish_reason == "length" for s in samples)
    return BenchmarkResult(
        name=prompts.name, file=file, n=settings.n, correct=correct,
        indices=[p.index for p in prompts.problems], dropped=prompts.dropped,
        response_length=sum(lengths) / len(lengths), truncated=truncated / len(lengths), undecided=undecided,
    )


def load_benchmarks(
    files: Sequence[str], tokenizer, settings: EvalSettings, max_context: Optional[int] = None
) -> dict[str, PromptSet]:
    """file -> its prompts, tokenized, those over ``settings.max_prompt_length`` or leaving no room
    in the model's context ``max_context`` left out (counted); DataError for a bad file or two files
    with one benchmark name."""
    check_set_names(files)
    return {
        f: load_prompt_set(f, tokenizer, settings.max_prompt_length, settings.max_new_tokens,
                           settings.prompt_template, settings.prompt_suffix, max_context=max_context)
        for f in files
    }


def evaluate(model, benchmarks: dict[str, PromptSet], settings: EvalSettings) -> list[BenchmarkResult]:
    """Every benchmark of ``load_benchmarks`` with ``model`` (a transformers causal LM, on its device)."""
    tokenizer = next(iter(benchmarks.values())).tokenizer
    stops = end_token_ids(tokenizer, model)
    engine = NativeEngine(model)
    with RewardPool(num_workers=settings.reward_workers, timeout_s=settings.reward_timeout_s) as rewards:
        return [
            evaluate_set(engine, s, settings, rewards, stops, f, benchmark=i)
            for i, (f, s) in enumerate(benchmarks.items())
        ]


def _curve_points(n: int) -> list[int]:
    """The k shown in the printed pass@k table: powers of two up to n, and n (JSON has them all)."""
    return sorted({2**i for i in range(n.bit_length()) if 2**i <= n} | {n})


def format_tables(results: Sequence[BenchmarkResult]) -> str:
    """Markdown: one row per benchmark (problems, avg@n, pass@n), then the pass@k curve."""
    n = results[0].n
    lines = [
        f"| benchmark | problems | avg@{n} | pass@{n} | mean length | truncated |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {len(r.correct)} | {r.avg:.4f} | {r.pass_curve[-1]:.4f} | "
            f"{r.response_length:.1f} | {r.truncated:.3f} |"
        )
    points = _curve_points(n)
    lines += ["", "| benchmark | " + " | ".join(f"pass@{k}" for k in points) + " |",
              "|---|" + "---:|" * len(points)]
    for r in results:
        curve = r.pass_curve
        lines.append(f"| {r.name} | " + " | ".join(f"{curve[k - 1]:.4f}" for k in points) + " |")
    dropped = [f"{r.name}: {r.dropped}" for r in results if r.dropped]
    if dropped:
        lines += ["", "prompts over --max-prompt-length or the model's context, left out: " + ", ".join(dropped)]
    undecided = [f"{r.name}: {r.undecided}" for r in results if r.undecided]
    if undecided:
        lines += ["", "samples scored 0 because their answer check did not finish (time limit, crash): "
                  + ", ".join(undecided)]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hpt_fast.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (transformers save_pretrained)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    p.add_argument("--data", required=True, nargs="+", help="validation JSON files, one benchmark each")
    p.add_argument("--n", type=int, required=True, help="samples per problem (k)")
    p.add_argument("--temperature", type=float, default=0.6, help="0: greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=8192)
    p.add_argument("--max-prompt-length", type=int, default=1024, help="longer prompts are left out (counted)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generation call")
    p.add_argument("--reward-workers", type=int, default=2, help="processes running the math-verify checks")
    p.add_argument("--reward-timeout-s", type=float, default=5.0,
                   help="time limit of one answer check; past it the sample scores 0 (counted as undecided)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-template", help="as data.prompt_template, e.g. 'Question:\\n{prompt}\\nAnswer:'")
    p.add_argument("--prompt-suffix", default="", help="as data.prompt_suffix")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="auto: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    p.add_argument("--out", help="write the results as JSON here")
    return p


def _check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """parser.error (exit 2) naming the first bad option."""
    for opt, value in (("--n", a.n), ("--max-new-tokens", a.max_new_tokens),
                       ("--max-prompt-length", a.max_prompt_length), ("--batch-size", a.batch_size),
                       ("--reward-workers", a.reward_workers)):
        if value < 1:
            p.error(f"{opt} must be >= 1, got {value}")
    if not (math.isfinite(a.temperature) and a.temperature >= 0):
        p.error(f"--temperature must be a finite number >= 0, got {a.temperature}")
    if not 0 < a.reward_timeout_s < math.inf:
        p.error(f"--reward-timeout-s must be a finite number > 0, got {a.reward_timeout_s}")
    if not 0 < a.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {a.top_p}")
    if a.seed < 0:
        p.error(f"--seed must be >= 0, got {a.seed}")
    if a.prompt_template is not None and "{prompt}" not in a.prompt_template:
        p.error("--prompt-template must contain {prompt}")
    for opt, path, kind in (("--model", a.model, "model"),
                            ("--tokenizer" if a.tokenizer else "--model", a.tokenizer or a.model, "tokenizer")):
        if path is not None and not Path(path).is_dir():
            p.error(f"{opt}: no such directory: {path}")
        if local_dir_problem(path, kind):
            p.error(f"{opt}: {local_dir_problem(path, kind)}")
    if a.out is not None:  # found now, not after hours of generation
        out = Path(a.out)
        where = next(p for p in out.absolute().parents if p.exists())
        if out.is_dir():
            p.error(f"--out: {out} is a directory; give the path of a JSON file")
        if not where.is_dir():
            p.error(f"--out: {where} is a file, not a directory")
        if not os.access(where, os.W_OK | os.X_OK):
            p.error(f"--out: cannot write in {where}")
    for i, f in enumerate(a.data):
        if not Path(f).is_file():
            p.error(f"--data: no such file: {f}")
        if f in a.data[:i]:
            p.error(f"--data: {f} is given twice")


def main(argv: Optional[list[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    settings = EvalSettings(
        n=args.n, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
        max_prompt_length=args.max_prompt_length, batch_size=args.batch_size, seed=args.seed,
        prompt_template=args.prompt_template, prompt_suffix=args.prompt_suffix,
        reward_workers=args.reward_workers, reward_timeout_s=args.reward_timeout_s,
    )
    trust = args.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model, trust_remote_code=trust)
    context = context_length(AutoConfig.from_pretrained(args.model, trust_remote_code=trust))
    try:  # the data first: a bad file should not wait for a large model to load
        benchmarks = load_benchmarks(args.data, tokenizer, settings, context)
    except DataError as err:
        print(f"data error: {err}", file=sys.stderr)
        return 2
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, trust_remote_code=trust).to(device).eval()
    results = evaluate(model, benchmarks, settings)
    print(format_tables(results))
    if args.out:
        report = {
            "model": args.model,
            "settings": asdict(settings),
            "benchmarks": {r.name: r.to_json() for r in results},
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
