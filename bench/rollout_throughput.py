"""Rollout throughput: NativeEngine against transformers ``generate`` on the same tiny model.

Usage (from the repository root):
    python -m bench.rollout_throughput [--prompts 64] [--n 8] [--max-new-tokens 32]
        [--prompt-lengths 16-48] [--repeats 5] [--threads N] [--device cpu|cuda]
        [--dtype float32|bfloat16] [--sliding-window W]

Both sample (temperature 1, no top-k / top-p) n completions for each of the same prompts from the
same random Qwen2 model, in two settings: ``fixed`` (no stop token: every completion has
max_new_tokens tokens) and ``eos`` (token 1 stops a completion, as EOS does in real rollouts; with
this random model about half the completions stop early). Throughput counts generated tokens (up to
and including the stop token). Each is warmed up, then the two run one after the other for
``--repeats`` rounds and the medians are reported. With ``--sliding-window W`` every layer attends
to its W latest positions only (Qwen2's ``use_sliding_window``): ``generate`` runs transformers'
sliding-window cache, the NativeEngine its own. Peak memory is measured once per engine and
setting in a fresh process (VmHWM on CPU, torch.cuda.max_memory_allocated on CUDA), beyond the
model and the prompts. Prints one markdown table and the machine it ran on.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM

from bench.cli import cli_description
from bench.fused_op_table import machine_description, proc_status_bytes, reset_peak_rss
from hpt_fast.rollout import NativeEngine

PAD, EOS = 0, 1
SETTINGS = ("fixed", "eos")
ENGINES = ("transformers generate", "NativeEngine")
MEMORY_CHILD_TIMEOUT_S = 600


@dataclass(frozen=True)
class Problem:
    """The model and the prompts every engine gets."""

    prompts: int
    n: int
    max_new_tokens: int
    min_len: int
    max_len: int
    hidden: int
    layers: int
    vocab: int
    device: str
    dtype: str = "float32"
    sliding_window: Optional[int] = None

    def model(self) -> torch.nn.Module:
        config = Qwen2Config(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=4 * self.hidden,
            num_hidden_layers=self.layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=self.max_len + self.max_new_tokens, tie_word_embeddings=False,
            # max_window_layers 0: every layer slides
            use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window,
            max_window_layers=0,
        )
        torch.manual_seed(0)
        return Qwen2ForCausalLM(config).to(self.device, getattr(torch, self.dtype)).eval()

    def prompt_ids(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(1)
        lengths = torch.randint(self.min_len, self.max_len + 1, (self.prompts,), generator=g)
        return [torch.randint(2, self.vocab, (int(n),), generator=g).tolist() for n in lengths]


def hf_generate(model: torch.nn.Module, problem: Problem, setting: str) -> Callable[[], int]:
    """A call of ``model.generate`` (left-padded batch) returning the number of tokens generated."""
    prompts = problem.prompt_ids()
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(problem.device), mask.to(problem.device)
    eos = EOS if setting == "eos" else None

    def run() -> int:
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                num_return_sequences=problem.n, max_new_tokens=problem.max_new_tokens, pad_token_id=PAD,
                eos_token_id=eos,
            )
        new = out[:, width:]
        if eos is None:
            return new.numel()
        # tokens up to and including the first EOS; rows that never stop count whole
        ended = (new == EOS).int().cumsum(-1) > 0
        first = ended.int().argmax(-1)
        return int(torch.where(ended.any(-1), first + 1, new.shape[1]).sum())

    return run


def native(model: torch.nn.Module, problem: Problem, setting: str) -> Callable[[], int]:
    engine = NativeEngine(model)
    prompts = problem.prompt_ids()
    stops = [EOS] if setting == "eos" else []

    def run() -> int:
        out = engine.generate(prompts, n=problem.n, max_new_tokens=problem.max_new_tokens, temperature=1.0,
                              stop_token_ids=stops, seed=0)
        return sum(len(s.token_ids) for group in out for s in group)

    return run


RUNNERS = {"transformers generate": hf_generate, "NativeEngine": native}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_round_robin(problem: Problem, repeats: int) -> dict[tuple[str, str], tuple[float, int]]:
    """Median seconds and tokens per (engine, setting)."""
    model = problem.model()
    runs = {(e, s): RUNNERS[e](model, problem, s) for s in SETTINGS for e in ENGINES}
    for run in runs.values():
        run()  # warm-up
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    tokens: dict[tuple[str, str], int] = {}
    for _ in range(repeats):
        for key, run in runs.items():
            _sync(problem.device)
            start = time.perf_counter()
            tokens[key] = run()
            _sync(problem.device)
            times[key].append(time.perf_counter() - start)
    return {key: (statistics.median(times[key]), tokens[key]) for key in runs}


def memory_child(problem: Problem, engine: str, setting: str) -> int:
    """In a fresh process: peak bytes of one run beyond the model and the prompts."""
    run = RUNNERS[engine](problem.model(), problem, setting)
    run()
    if problem.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = reset_peak_rss()
    run()
    return proc_status_bytes("VmHWM") - base


def measure_memory(argv: list[str], engine: str, setting: str) -> Optional[int]:
    cmd = [sys.executable, "-m", "bench.rollout_throughput", *argv, "--memory-child", engine, "--setting", setting]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=MEMORY_CHILD_TIMEOUT_S)
    if out.returncode != 0:
        print(f"memory run of {engine} ({setting}) failed: {out.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["bytes"]


def format_table(problem: Problem, timed: dict, memory: dict, threads: int) -> str:
    lines = [
        f"{problem.prompts} prompts x {problem.n} samples, up to {problem.max_new_tokens} new tokens, prompts of "
        f"{problem.min_len}-{problem.max_len} tokens; Qwen2 hidden {problem.hidden}, {problem.layers} layers, "
        f"4 heads / 2 KV heads, vocab {problem.vocab}, "
        f"{'' if problem.sliding_window is None else f'a sliding window of {problem.sliding_window} in every layer, '}"
        f"{problem.dtype}, {problem.device}, {threads} threads; temperature 1, no top-k / top-p",
        "",
        "| setting | engine | tokens | seconds | tokens/s | x generate | peak extra memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting in SETTINGS:
        base_rate = None
        for engine in ENGINES:
            seconds, tokens = timed[(engine, setting)]
            rate = tokens / seconds
            base_rate = base_rate or rate
            mem = memory.get((engine, setting))
            mem_cell = f"{mem / 2**20:.1f} MiB" if mem is not None else "n/a"
            lines.append(f"| {setting} | {engine} | {tokens} | {seconds:.3f} | {rate:,.0f} | {rate / base_rate:.2f}x | "
                         f"{mem_cell} |")
    return "\n".join(lines)


def _length_range(text: str) -> tuple[int, int]:
    """'16-48' -> (16, 48): 1 <= min <= max."""
    parts = text.split("-")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or not 1 <= int(parts[0]) <= int(parts[1]):
        raise argparse.ArgumentTypeError(f"expected MIN-MAX with 1 <= MIN <= MAX, got {text!r}")
    return int(parts[0]), int(parts[1])


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=cli_description(__doc__))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prompt-lengths", default="16-48", type=_length_range, help="min-max prompt length (uniform)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=42)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the model's weights")
    parser.add_argument("--sliding-window", type=_positive, help="every layer's sliding window (default: none)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--memory-child", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    low, high = args.prompt_lengths
    problem = Problem(args.prompts, args.n, args.max_new_tokens, low, high, args.hidden, args.layers, args.vocab,
                      args.device, args.dtype, args.sliding_window)
    if args.memory_child:
        print(json.dumps({"bytes": memory_child(problem, args.memory_child, args.setting)}))
        return
    timed = time_round_robin(problem, args.repeats)
    memory = {} if args.no_memory else {
        (engine, setting): measure_memory(argv, engine, setting) for setting in SETTINGS for engine in ENGINES
    }
    print(format_table(problem, timed, memory, torch.get_num_threads()))
    print()
    print(machine_description(args.device))
    print(f"- transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
