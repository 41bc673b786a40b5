"""``python bench/ablations.py``: why HPT is not clearly ahead of LUFFY on the toy task.

Trains HPT variants (and LUFFY, the baseline HPT did not beat in ``bench/reproduce.py``) through
``python -m hpt_fast.train configs/toy*.yaml key=value ...``: every variant is a shipped toy config
plus config overrides, nothing special-cased in the trainer. The variants (``VARIANTS``) probe the
four suspects of issue 6:

- the gate threshold gamma (SFT when at most 0, 1 or 2 of the 8 rollouts are correct);
- the normaliser: how the SFT tokens are weighted against the RL tokens. HPT's RL part is
  ``token-sum-norm`` (each token 1/L, L = 64 here) and its SFT part ``token-mean`` (each token
  1/n_sft_tokens), so the variants weight SFT tokens like RL tokens (``sft_agg=token-sum-norm``)
  or make the RL part a token-mean as well (``loss_agg=token-mean``);
- the entropy bonus (0.001 vs none);
- the task mix: the training file without add2digit (never learned by any method, so under
  gamma = 0 all of its prompts are SFT every step), for HPT and for LUFFY alike.

Each (variant, seed) is trained and evaluated exactly as ``bench/reproduce.py`` does (its
functions: same steps, rollouts, seeds, held-out avg@8 / pass@8 at temperature 0.6). Run
directories go under ``--runs`` (default ``bench/reproduction/runs_ablations``); a run whose final
checkpoint exists is not trained again, nor evaluated again once its ``eval.json`` exists, so an
interrupted sweep picks up where it stopped. Written to ``--out`` (default ``bench/reproduction``):

- ``ablations.md``: the variants, avg@8 and pass@8 per level (mean ± std over seeds), training
  diagnostics, the final policy's NLL and entropy on demonstrations (``demo_fit``) and the overall
  avg@8 difference to LUFFY and to HPT with Welch's t;
- ``ablations.json``: every number, per run included;
- ``ablations.png``: overall and per-level avg@8 per variant, one dot per seed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(REPO))

from bench.reproduce import (  # noqa: E402
    CONFIGS, EVAL_N, OVERALL, _figure, aggregate, final_checkpoint, make_parser, markdown, mean_std, parse_args,
    run_dir, run_one, total_steps, validation_files,
)

# the last LATE_STEPS training steps are averaged for the "late" diagnostics (entropy)
LATE_STEPS = 50
# demonstrations per level for the final checkpoint's teacher-forced NLL and entropy (demo_fit)
FIT_DEMOS = 64


@dataclass(frozen=True)
class Variant:
    """One ablation: a method's shipped toy config plus overrides.

    Attributes:
        name: run-directory and table name.
        method: a key of ``bench.reproduce.CONFIGS`` (its toy config is trained).
        overrides: ``key=value`` config overrides.
        drop_levels: data_source values (``toy-<level>``) left out of the training file; the
            variant then trains on a filtered copy (``task_mix_file``) via ``data.train_files``.
        question: what the variant tests, for the table.
    """

    name: str
    method: str
    overrides: tuple[str, ...] = ()
    drop_levels: tuple[str, ...] = ()
    question: str = ""


VARIANTS: tuple[Variant, ...] = (
    Variant("hpt", "hpt", question="baseline: configs/toy.yaml (gamma 0, RL token-sum-norm, SFT token-mean, entropy 0.001)"),
    Variant("luffy", "luffy", question="baseline: configs/toy-luffy.yaml"),
    Variant("hpt-gamma1of8", "hpt", ("algorithm.gamma=0.125",), question="gate: SFT when at most 1 of 8 rollouts is correct"),
    Variant("hpt-gamma2of8", "hpt", ("algorithm.gamma=0.25",),
            question="gate: SFT when at most 2 of 8 are correct (the LLaMA setting)"),
    Variant("hpt-sft-sumnorm", "hpt", ("algorithm.estimator_hparams.sft_agg=token-sum-norm",),
            question="normaliser: SFT tokens weighted 1/L like RL tokens, not 1/(SFT tokens in the batch)"),
    Variant("hpt-all-tokenmean", "hpt", ("algorithm.estimator_hparams.loss_agg=token-mean",),
            question="normaliser: RL tokens weighted 1/(RL tokens in the batch) like SFT tokens, not 1/L"),
    Variant("hpt-entropy0", "hpt", ("algorithm.entropy_coef=0",), question="entropy bonus off"),
    Variant("hpt-no2digit", "hpt", drop_levels=("toy-add2digit",), question="task mix: train without add2digit"),
    Variant("luffy-no2digit", "luffy", drop_levels=("toy-add2digit",),
            question="task mix: LUFFY on the same training file"),
)
BY_NAME = {v.name: v for v in VARIANTS}


def toy_train_file() -> Path:
    """The embedded toy task's training parquet, as the trainer resolves ``data.train_files: [toy]``."""
    from hpt_fast.config import load_config
    from hpt_fast.toy import use_toy

    files = use_toy(load_config(REPO / CONFIGS["hpt"])).data.train_files
    if len(files) != 1:
        raise ValueError(f"expected the toy config to train on one file, got {files}")
    return Path(files[0])


def task_mix_file(source: Path, drop: Sequence[str], dest_dir: Path) -> Path:
    """Write ``source``'s problems without those whose data_source is in ``drop`` to ``dest_dir``.

    The name is fixed by ``drop``, so a resumed sweep passes the trainer the same path.

    Raises:
        ValueError: a name in ``drop`` is no data_source of ``source`` (a typo would otherwise
            silently train on the full mix).
    """
    from hpt_fast.data import read_train_parquet, write_train_parquet

    problems = read_train_parquet(source)
    sources = {p.data_source for p in problems}
    unknown = sorted(set(drop) - sources)
    if unknown:
        raise ValueError(f"no problems with data_source {unknown} in {source}; it has {sorted(sources)}")
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / f"train-without-{'-'.join(sorted(drop))}.parquet"
    write_train_parquet(path, [p for p in problems if p.data_source not in drop])
    return path


def variant_overrides(variant: Variant, data_dir: Path, source: Optional[Path] = None) -> list[str]:
    """The overrides a variant's runs get: its own, plus ``data.train_files`` for a task-mix variant
    (``source``: the full training file, default the toy's)."""
    out = list(variant.overrides)
    if variant.drop_levels:
        mix = task_mix_file(source or toy_train_file(), variant.drop_levels, data_dir)
        out.append(f"data.train_files=[{mix}]")
    return out


def diagnostics(run: Path) -> dict[str, Optional[float]]:
    """Training-side numbers of one run from ``RUN/metrics.jsonl``: mean grad norm (before
    clipping) over all steps, and the mean policy entropy and rollout reward over the last
    ``LATE_STEPS``. (The SFT loss is left out: its scale depends on the variant's normaliser.)"""
    from hpt_fast.plot import load_steps

    trained = [m for _, m in sorted(load_steps(run).items()) if "reward_mean" in m]
    late = trained[-LATE_STEPS:]

    def avg(rows: list[dict], key: str) -> Optional[float]:
        # None where the trainer did not log it (no entropy without an entropy bonus)
        vals = [m[key] for m in rows if key in m]
        return float(np.mean(vals)) if vals else None

    return {"grad_norm": avg(trained, "grad_norm"), "entropy_late": avg(late, "entropy_mean"),
            "reward_late": avg(late, "reward_mean")}


def demo_fit(ckpt: Path, train_file: Path, per_level: int = FIT_DEMOS) -> dict[str, dict[str, float]]:
    """How a checkpoint sees the first ``per_level`` demonstrations of each level of ``train_file``,
    teacher-forced: level -> {"entropy": mean next-token entropy, "nll": mean negative
    log-likelihood of the demonstration token}, in nats per demonstration token.

    The trainer logs the rollouts' entropy only when the bonus is on, so this compares every
    variant, the one without the bonus included, on the same tokens; the NLL says how far the
    demonstrations have been learned (entropy alone cannot tell confident-right from confident-wrong).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpt_fast.config import load_config
    from hpt_fast.data import PromptSet, read_train_parquet
    from hpt_fast.toy import _sft_tensors

    data = load_config(REPO / CONFIGS["hpt"]).data
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    problems = read_train_parquet(train_file)
    out = {}
    for level in dict.fromkeys(p.data_source for p in problems):
        chosen = [p for p in problems if p.data_source == level][:per_level]
        # the trainer's tokenization and truncation of prompts and demonstrations
        ids, attention, labels = _sft_tensors(PromptSet(chosen, tokenizer, data.max_prompt_length,
                                                        data.max_response_length, name=level), tokenizer.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1)
        entropy = -(logp.exp() * logp).sum(-1)
        # position t predicts token t + 1: score the positions whose next token is a demonstration token
        targets = labels[:, 1:]
        mask = targets != -100
        nll = -logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
        out[level] = {"entropy": float(entropy[mask].mean()), "nll": float(nll[mask].mean())}
    return out


def welch_t(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    """Welch's t of mean(a) - mean(b) (None when both spreads are 0 or a side has one value)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        return None
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    return float((a.mean() - b.mean()) / se) if se > 0 else None


def luffy_reference(variant: Variant, variants: Sequence[Variant]) -> Optional[str]:
    """The plain LUFFY variant (no overrides) that trains on the same task mix as ``variant``: the
    baseline an HPT variant has to beat; None if the sweep has none (or ``variant`` is it)."""
    for v in variants:
        if v.method == "luffy" and not v.overrides and v.drop_levels == variant.drop_levels and v != variant:
            return v.name
    return None


def comparisons(runs: dict[str, list[dict]], variants: Sequence[Variant]) -> dict[str, dict[str, Optional[dict]]]:
    """variant -> {"hpt": ..., "luffy_same_mix": ...}, each {"reference", "diff": mean overall avg@8
    difference, "t": Welch's t} or None where the sweep has no such reference."""
    overall = {v: [r["eval"][OVERALL]["avg"] for r in rs] for v, rs in runs.items()}

    def compare(name: str, ref: Optional[str]) -> Optional[dict]:
        if ref is None or ref == name or ref not in overall:
            return None
        return {"reference": ref, "diff": float(np.mean(overall[name]) - np.mean(overall[ref])),
                "t": welch_t(overall[name], overall[ref])}

    return {v.name: {"hpt": compare(v.name, "hpt"), "luffy_same_mix": compare(v.name, luffy_reference(v, variants))}
            for v in variants if v.name in runs}


def sweep(variants: Sequence[Variant], seeds: Sequence[int], runs_root: Path, steps: Optional[int],
          extra: Sequence[str]) -> dict[str, list[dict]]:
    """Train and evaluate every (variant, seed), seed by seed (a sweep cut short still compares
    every variant), through ``bench.reproduce.run_one``; each result gains its diagnostics."""
    files, train_file = validation_files(), toy_train_file()
    overrides = {v.name: variant_overrides(v, runs_root / "data", train_file) for v in variants}
    runs: dict[str, list[dict]] = {v.name: [] for v in variants}
    for seed in seeds:
        for v in variants:
            result = run_one(v.name, seed, runs_root, steps, [*overrides[v.name], *extra], files, CONFIGS[v.method])
            run = run_dir(runs_root, v.name, seed)
            cached = run / "demo_fit.json"
            if not cached.is_file() or cached.stat().st_mtime < (run / "eval.json").stat().st_mtime:
                # every variant on the full task's demonstrations, the task-mix ones included
                ckpt = final_checkpoint(run, total_steps(CONFIGS[v.method], steps))
                cached.write_text(json.dumps(demo_fit(ckpt, train_file)))
            result["diagnostics"] = diagnostics(run)
            result["demo_fit"] = json.loads(cached.read_text())
            runs[v.name].append(result)
    return runs


def _fmt(x: Optional[float], spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def report(runs: dict[str, list[dict]], variants: Sequence[Variant], seeds: Sequence[int], steps: dict[str, int],
           command: str, wall: float, load: tuple[float, float]) -> tuple[str, dict]:
    """ablations.md's text and ablations.json's content."""
    summary = aggregate(runs)
    comp = comparisons(runs, variants)

    def seed_mean(values: list[Optional[float]]) -> Optional[float]:
        return None if None in values else mean_std(values)[0]

    diag = {name: {k: seed_mean([r["diagnostics"][k] for r in rs]) for k in rs[0]["diagnostics"]}
            for name, rs in runs.items()}
    levels = list(next(iter(runs.values()))[0]["demo_fit"])
    fit = {name: {key: {lv: mean_std([r["demo_fit"][lv][key] for r in rs]) for lv in levels} for key in ("nll", "entropy")}
           for name, rs in runs.items()}
    # each run's training time is kept in its run directory: the total survives a resumed sweep
    trained = sum(r["train_seconds"] for rs in runs.values() for r in rs)
    lines = [f"`{command}`: {wall / 60:.1f} min wall time for this invocation (runs found finished are not "
             f"redone); training time of all {sum(map(len, runs.values()))} runs summed: {trained / 60:.1f} min "
             f"(1-min load average {load[0]:.2f} at the start, {load[1]:.2f} at the end; the machine is shared).", "",
             "| variant | config | overrides | what it tests |", "|---|---|---|---|"]
    for v in variants:
        ov = [*v.overrides, *([f"data.train_files=[training file without {', '.join(v.drop_levels)}]"] if v.drop_levels else [])]
        lines.append(f"| {v.name} | {CONFIGS[v.method]} | {'<br>'.join(f'`{o}`' for o in ov) or '-'} | {v.question} |")
    lines += ["", markdown(summary, seeds, steps, label="variant")]
    lines += [f"**diagnostics and overall avg@{EVAL_N} against the baselines** (mean over seeds; grad norm before "
              f"clipping to 1.0, mean over all steps; rollout entropy (logged only with the bonus on) and rollout "
              f"reward: mean over the last {LATE_STEPS} steps; Δ: difference of the mean overall avg@{EVAL_N}, t: Welch's t "
              "over the seeds; at 3 + 3 seeds |t| > 2.78 is p < 0.05 (two-sided) when the spreads are equal, and "
              "the bar is higher when they differ)", "",
              "| variant | grad norm | rollout entropy | rollout reward | Δ vs hpt (t) | Δ vs LUFFY, same task mix (t) |",
              "|---|---:|---:|---:|---:|---:|"]
    for name in runs:
        d = diag[name]
        cells = ["-" if c is None else f"{c['diff']:+.3f} ({_fmt(c['t'], '+.1f')})"
                 + ("" if c["reference"] in ("hpt", "luffy") else f" vs {c['reference']}") for c in comp[name].values()]
        lines.append(f"| {name} | {_fmt(d['grad_norm'], '.1f')} | {_fmt(d['entropy_late'], '.3f')} | "
                     f"{_fmt(d['reward_late'], '.3f')} | " + " | ".join(cells) + " |")
    for key, title in (("nll", "negative log-likelihood"), ("entropy", "next-token entropy")):
        lines += ["", f"**final policy on demonstrations: {title}** (nats per demonstration token, teacher-forced "
                  f"on the first {FIT_DEMOS} training demonstrations of each level, mean ± std over seeds)", "",
                  "| variant | " + " | ".join(levels) + " |", "|---|" + "---:|" * len(levels)]
        for name in runs:
            lines.append(f"| {name} | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in fit[name][key].values()) + " |")
    data = {"command": command, "wall_seconds": wall, "train_seconds_total": trained,
            "load_average_start_end": list(load), "seeds": list(seeds), "steps": steps,
            "variants": [dataclasses.asdict(v) | {"config": CONFIGS[v.method]} for v in variants],
            "summary": summary, "diagnostics": diag, "demo_fit": fit, "comparisons": comp, "runs": runs}
    return "\n".join(lines) + "\n", data


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    """avg@8 per variant, one panel per level and overall: a bar for the mean, a dot per seed."""
    levels = list(next(iter(runs.values()))[0]["eval"])
    fig, axes = _figure(len(levels))
    names = list(runs)
    x = np.arange(len(names))
    for ax, level in zip(axes, levels):
        vals = [[r["eval"][level]["avg"] for r in runs[n]] for n in names]
        ax.bar(x, [np.mean(v) for v in vals], color=[f"C{i % 10}" for i in range(len(names))], alpha=0.5)
        for i, v in enumerate(vals):
            ax.plot([i] * len(v), v, "k.", ms=4)
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
        ax.set_title(level)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel(f"held-out avg@{EVAL_N} (bar: mean, dots: seeds)")
    fig.savefig(path, dpi=110)


def _parser() -> argparse.ArgumentParser:
    p = make_parser("python bench/ablations.py", __doc__, "variant")
    p.add_argument("--variants", nargs="+", choices=list(BY_NAME), default=list(BY_NAME))
    p.add_argument("--runs", type=Path, help="run directories (default OUT/runs_ablations)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(_parser(), argv)
    out = args.out.resolve()
    runs_root = (args.runs or out / "runs_ablations").resolve()
    variants = [BY_NAME[n] for n in args.variants]
    load_start, start = os.getloadavg()[0], time.perf_counter()
    try:
        runs = sweep(variants, args.seeds, runs_root, args.steps, args.set)
    except (RuntimeError, ValueError) as err:
        print(err, file=sys.stderr)
        return 1
    wall = time.perf_counter() - start
    steps = {v.name: total_steps(CONFIGS[v.method], args.steps) for v in variants}
    # the thread count is part of how the sweep ran: on a busy 2-core machine one thread per
    # process is several times faster than two (OpenMP spin-waiting; see hpt_fast.toy._one_thread)
    threads = os.environ.get("OMP_NUM_THREADS")
    command = " ".join([*([f"OMP_NUM_THREADS={threads}"] if threads else []), "python bench/ablations.py", *argv])
    md, data = report(runs, variants, args.seeds, steps, command, wall, (load_start, os.getloadavg()[0]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablations.md").write_text(md)
    # strict JSON: a missing number is null, never NaN
    (out / "ablations.json").write_text(json.dumps(data, indent=1, allow_nan=False))
    plot(runs, out / "ablations.png")
    print(md)
    print(f"total wall time: {wall:.0f} s ({wall / 60:.1f} min); outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
