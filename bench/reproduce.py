"""``python bench/reproduce.py``: HPT against SFT, GRPO, SFT-then-GRPO, LUFFY and SRFT on the toy task.

Each method is trained through ``python -m hpt_fast.train configs/<its toy config>`` (one subprocess
at a time, every method with the same extra overrides: the seed, the output directory and, with
``--steps``, ``train.total_steps``), once per seed. Each final checkpoint is then evaluated on every
level's held-out file with ``hpt_fast.eval`` (avg@8 and pass@1..8 at temperature 0.6). Written to
``--out`` (default ``bench/reproduction``):

- ``results.md``: mean ± std over seeds of avg@8 and pass@8 per level and overall;
- ``results.json``: every number, per run included;
- ``accuracy_vs_step.png``: held-out accuracy (the trainer's validation, avg@4) against the step,
  mean over seeds, one line per method;
- ``pass_at_k.png``: pass@k for k = 1..8 per method, mean over seeds.

A run whose final checkpoint already exists under ``OUT/runs`` is not trained again, nor evaluated
again once its ``eval.json`` is written, so an interrupted reproduction picks up where it stopped.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parent.parent
# method -> its shipped toy config; HPT is the embedded default
CONFIGS: dict[str, str] = {
    "hpt": "configs/toy.yaml",
    "sft": "configs/toy-sft.yaml",
    "grpo": "configs/toy-grpo.yaml",
    "sft_then_grpo": "configs/toy-sft_then_grpo.yaml",
    "luffy": "configs/toy-luffy.yaml",
    "srft": "configs/toy-srft.yaml",
}
SEEDS = (0, 1, 2)
EVAL_N = 8
EVAL_TEMPERATURE = 0.6
OVERALL = "overall"


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / "runs" / method / f"seed{seed}"


def final_checkpoint(run: Path, steps: int) -> Path:
    return run / "checkpoints" / f"step_{steps:08d}"


def total_steps(config: str, steps: Optional[int]) -> int:
    """The step count a run of ``config`` ends at: ``--steps`` if given, else the config's own."""
    if steps is not None:
        return steps
    from hpt_fast.config import load_config

    return load_config(REPO / config).train.total_steps


def train(method: str, seed: int, out: Path, steps: Optional[int], extra: Sequence[str],
          config: Optional[str] = None) -> float:
    """Train one (method, seed) through the CLI; its log goes to ``RUN/train.log``. Returns seconds.

    ``config`` (default ``CONFIGS[method]``) lets a caller train a config under another run name
    (bench/ablations.py: several variants of one method).

    Raises:
        RuntimeError: the trainer exited non-zero (the message names the log).
    """
    run = run_dir(out, method, seed)
    run.mkdir(parents=True, exist_ok=True)
    overrides = [f"train.seed={seed}", f"train.output_dir={run}", *extra]
    if steps is not None:
        overrides.append(f"train.total_steps={steps}")
    cmd = [sys.executable, "-m", "hpt_fast.train", config or CONFIGS[method], *overrides]
    start = time.perf_counter()
    with open(run / "train.log", "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"{method} seed {seed}: trainer exited {rc}; see {run / 'train.log'}")
    return time.perf_counter() - start


def validation_files() -> list[str]:
    """The held-out files (one per level) the toy configs validate on, as the trainer resolves them."""
    from hpt_fast.config import load_config
    from hpt_fast.toy import use_toy

    return use_toy(load_config(REPO / CONFIGS["hpt"])).validation.files


def evaluate_checkpoint(ckpt: Path, files: Sequence[str]) -> dict[str, dict]:
    """level -> {"avg": avg@8, "pass": [pass@1..8], "correct": per-problem counts}, plus "overall"
    pooled over all levels' problems."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpt_fast.config import load_config
    from hpt_fast.eval import EvalSettings, evaluate, load_benchmarks, pass_at_k_curve

    data = load_config(REPO / CONFIGS["hpt"]).data
    # the training limits: the toy model never saw longer responses
    settings = EvalSettings(n=EVAL_N, temperature=EVAL_TEMPERATURE, max_new_tokens=data.max_response_length,
                            max_prompt_length=data.max_prompt_length)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    benchmarks = load_benchmarks(files, tokenizer, settings)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    results = {r.name: {"avg": r.avg, "pass": r.pass_curve, "correct": r.correct}
               for r in evaluate(model, benchmarks, settings)}
    pooled = [c for r in results.values() for c in r["correct"]]
    results[OVERALL] = {"avg": sum(pooled) / (len(pooled) * EVAL_N), "pass": pass_at_k_curve(pooled, EVAL_N)}
    return results


def training_summary(run: Path) -> dict:
    """From ``RUN/metrics.jsonl``: the validation curve (step -> level -> avg@4, plus overall) and the
    mean demonstration row fraction (``batch_sft_fraction``: the share of the trained rows that are
    demonstrations) over the training steps, and the rollout reward over those that had rollouts
    (None without any)."""
    from hpt_fast.plot import load_steps

    steps = load_steps(run)
    curve: dict[int, dict[str, float]] = {}
    for step, metrics in sorted(steps.items()):
        levels = {k.split("/")[1]: v for k, v in metrics.items() if k.startswith("val/") and "/avg@" in k}
        if levels:
            # every level holds the same number of problems: the level mean is the pooled accuracy
            curve[step] = {**levels, OVERALL: float(np.mean(list(levels.values())))}
    trained = [m for m in steps.values() if "train_tokens" in m or "reward_mean" in m]
    # steps without rollouts log no reward; older logs wrote 0 there, with a response length of 0
    rewards = [m["reward_mean"] for m in trained if "reward_mean" in m and m.get("response_length", 1.0) > 0]
    return {
        "curve": curve,
        "demo_row_fraction": _mean_row_fraction(trained),
        "reward_mean": float(np.mean(rewards)) if rewards else None,
    }


def _mean_row_fraction(trained: list[dict]) -> float:
    """Mean over the steps that logged it of the trained rows' demonstration share: the estimator's
    ``batch_sft_fraction``, or, in logs from before it had that name, its ``sft_fraction``."""
    key = "batch_sft_fraction" if any("batch_sft_fraction" in m for m in trained) else "sft_fraction"
    values = [m[key] for m in trained if key in m]
    return float(np.mean(values)) if values else 0.0


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def aggregate(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """method -> level -> mean/std over seeds of avg@8, pass@8 and the pass@k curve; also the
    mean validation curve, demonstration row fraction, rollout reward and training time."""
    out = {}
    for method, seeds in runs.items():
        levels = list(seeds[0]["eval"])
        summary: dict = {"levels": {}}
        for level in levels:
            avgs = [s["eval"][level]["avg"] for s in seeds]
            passes = np.array([s["eval"][level]["pass"] for s in seeds])
            summary["levels"][level] = {
                "avg": mean_std(avgs), "pass": mean_std(passes[:, -1]),
                "pass_curve": passes.mean(0).tolist(),
            }
        common = sorted(set.intersection(*(set(s["train"]["curve"]) for s in seeds)))
        summary["curve"] = {
            step: {lv: float(np.mean([s["train"]["curve"][step][lv] for s in seeds]))
                   for lv in seeds[0]["train"]["curve"][step]}
            for step in common
        }
        for key in ("demo_row_fraction", "reward_mean"):
            values = [s["train"][key] for s in seeds if s["train"][key] is not None]
            summary[key] = mean_std(values) if values else None
        summary["train_seconds"] = mean_std([s["train_seconds"] for s in seeds])
        out[method] = summary
    return out


def markdown(summary: dict[str, dict], seeds: Sequence[int], steps: dict[str, int], label: str = "method") -> str:
    """The results table (avg@8 then pass@8 per level, mean ± std over seeds) and the training table;
    ``label`` heads the first column (the keys of ``summary``)."""
    levels = list(next(iter(summary.values()))["levels"])
    head = f"| {label} | " + " | ".join(levels) + " |"
    rule = "|---|" + "---:|" * len(levels)
    lines = [f"Held-out accuracy of the final checkpoint, mean ± std over seeds {', '.join(map(str, seeds))} "
             f"(64 problems per level, {EVAL_N} samples each at temperature {EVAL_TEMPERATURE}).", ""]
    for metric, title in (("avg", f"avg@{EVAL_N}"), ("pass", f"pass@{EVAL_N}")):
        lines += [f"**{title}**", "", head, rule]
        for method, s in summary.items():
            best = {lv: max(summary[m]["levels"][lv][metric][0] for m in summary) for lv in levels}
            cells = []
            for lv in levels:
                mean, std = s["levels"][lv][metric]
                cell = f"{mean:.3f} ± {std:.3f}"
                cells.append(f"**{cell}**" if mean == best[lv] else cell)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["**training** (mean over seeds)", "",
              f"| {label} | steps | mean demonstration row fraction | mean rollout reward | seconds per run |",
              "|---|---:|---:|---:|---:|"]
    for method, s in summary.items():
        reward = "—" if s["reward_mean"] is None else f"{s['reward_mean'][0]:.3f}"  # no rollouts: SFT
        lines.append(f"| {method} | {steps[method]} | {s['demo_row_fraction'][0]:.3f} | {reward} | "
                     f"{s['train_seconds'][0]:.0f} |")
    return "\n".join(lines) + "\n"


def _figure(panels: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # built on the Agg canvas directly: no pyplot state, no display needed
    fig = Figure(figsize=(4 * panels, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, panels, sharey=True)


def plot_curves(summary: dict[str, dict], path: Path) -> None:
    """Held-out avg@4 against the step, one panel per level and overall, one line per method."""
    levels = list(next(iter(summary.values()))["levels"])
    fig, axes = _figure(len(levels))
    for ax, level in zip(axes, levels):
        for i, (method, s) in enumerate(summary.items()):
            steps = list(s["curve"])
            ax.plot(steps, [s["curve"][st][level] for st in steps], marker="o", ms=3, color=f"C{i}", label=method)
        ax.set_title(level)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy (avg@4, mean over seeds)")
    axes[-1].legend(fontsize=8)
    fig.savefig(path, dpi=110)


def plot_pass_at_k(summary: dict[str, dict], path: Path) -> None:
    """pass@k for k = 1..8 of the final checkpoints, one panel per level and overall."""
    levels = list(next(iter(summary.values()))["levels"])
    fig, axes = _figure(len(levels))
    ks = range(1, EVAL_N + 1)
    for ax, level in zip(axes, levels):
        for i, (method, s) in enumerate(summary.items()):
            ax.plot(ks, s["levels"][level]["pass_curve"], marker="o", ms=3, color=f"C{i}", label=method)
        ax.set_title(level)
        ax.set_xlabel("k")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("pass@k (mean over seeds)")
    axes[-1].legend(fontsize=8)
    fig.savefig(path, dpi=110)


def run_one(method: str, seed: int, out: Path, steps: Optional[int], extra: Sequence[str],
            files: Sequence[str], config: Optional[str] = None) -> dict:
    """Train (unless the final checkpoint exists) and evaluate (unless ``RUN/eval.json`` exists) one
    run; ``config`` as in ``train``."""
    run = run_dir(out, method, seed)
    ckpt = final_checkpoint(run, total_steps(config or CONFIGS[method], steps))
    timing, cached = run / "train_seconds.txt", run / "eval.json"
    if not ckpt.is_dir():
        seconds = train(method, seed, out, steps, extra, config)
        if not ckpt.is_dir():  # the trainer resumed a run already past that step
            raise SystemExit(f"{run}: no checkpoint {ckpt.name} after training: the directory holds a longer run; "
                             "give another --out")
        timing.write_text(f"{seconds:.1f}\n")
        cached.unlink(missing_ok=True)  # a stale evaluation of an earlier checkpoint
    if not cached.is_file():
        cached.write_text(json.dumps(evaluate_checkpoint(ckpt, files)))
    result = {"seed": seed, "train_seconds": float(timing.read_text()),
              "eval": json.loads(cached.read_text()), "train": training_summary(run)}
    ov = result["eval"][OVERALL]
    print(f"{method} seed {seed}: {result['train_seconds']:.0f} s training, overall avg@{EVAL_N} {ov['avg']:.3f}, "
          f"pass@{EVAL_N} {ov['pass'][-1]:.3f}", flush=True)
    return result


def run_all(methods: Sequence[str], seeds: Sequence[int], out: Path, steps: Optional[int],
            extra: Sequence[str]) -> dict[str, list[dict]]:
    """Every (method, seed), seed by seed: a reproduction cut short still has every method compared."""
    files = validation_files()
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in seeds:
        for method in methods:
            runs[method].append(run_one(method, seed, out, steps, extra, files))
    return runs


def write_outputs(runs: dict[str, list[dict]], out: Path, seeds: Sequence[int], steps: Optional[int],
                  argv: Sequence[str], wall: float) -> None:
    """results.md, results.json and the two PNGs under ``out``."""
    summary = aggregate(runs)
    end = {m: total_steps(CONFIGS[m], steps) for m in runs}
    command = "python bench/reproduce.py " + " ".join(argv)
    md = markdown(summary, seeds, end)
    (out / "results.md").write_text(f"`{command.strip()}`: {wall / 60:.1f} min wall time.\n\n{md}")
    # per-problem counts stay in the JSON: pass@k can be recomputed from them
    report = {"command": command.strip(), "wall_seconds": wall, "seeds": list(seeds), "steps": end,
              "configs": {m: CONFIGS[m] for m in runs}, "summary": summary, "runs": runs}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    plot_curves(summary, out / "accuracy_vs_step.png")
    plot_pass_at_k(summary, out / "pass_at_k.png")
    print(md)


def make_parser(prog: str, doc: Optional[str], unit: str) -> argparse.ArgumentParser:
    """A parser with the options this script shares with bench/ablations.py (--seeds, --out,
    --steps, --set); ``unit`` names what is trained ("method", "variant") in the help."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--out", type=Path, default=REPO / "bench" / "reproduction")
    p.add_argument("--steps", type=int, help=f"train.total_steps for every {unit} (default: each config's)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help=f"extra overrides passed to every {unit} alike, e.g. validation.every=25")
    return p


def parse_args(p: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``p.parse_args(argv)``, exiting with a usage error on --steps < 1."""
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    return args


def _parser() -> argparse.ArgumentParser:
    p = make_parser("python bench/reproduce.py", __doc__, "method")
    p.add_argument("--methods", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(_parser(), argv)
    start = time.perf_counter()
    out = args.out.resolve()
    try:
        runs = run_all(args.methods, args.seeds, out, args.steps, args.set)
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    wall = time.perf_counter() - start
    write_outputs(runs, out, args.seeds, args.steps, argv, wall)
    print(f"total wall time: {wall:.0f} s ({wall / 60:.1f} min); outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
