"""A whole model's training step with ``patch_causal_lm_loss``, against its own transformers loss.

Usage (from the repository root):
    python -m bench.causal_lm_loss [--tokens 2048] [--seq 512] [--hidden 1024] [--layers 2]
        [--vocab 151936] [--dtypes float32,bfloat16] [--repeats 3] [--device cpu|cuda]

A Qwen2 of the given sizes (tied embeddings, as the small Qwen2.5 models; random weights) takes
``model(input_ids, labels=labels).loss.backward()`` on ``--tokens`` tokens in rows of ``--seq``:
as transformers computes it (the ``[tokens x vocab]`` logits, upcast to float32 for the loss),
and through ``patch_causal_lm_loss`` in mode B and mode A. Each is warmed up once, then timed round-robin (the order
rotating each round), median reported; every row's loss is checked against transformers' own
before the timings. Peak memory: the high-water mark of one step beyond the model, its gradients
and the batch (on CPU in a fresh process per row, as in ``bench.fused_op_table``; on CUDA the
caching allocator's peak), also as a fraction of the float32 logits (tokens x vocab x 4 bytes).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

import torch

from bench.cli import check_device, cli_description
from bench.fused_op_table import (
    DTYPES, REPO_ROOT, load_average, machine_description, proc_status_bytes, reset_peak_rss,
)
from bench.implementations import synchronize
from hpt_fast.causal_lm_loss import patch_causal_lm_loss

ROWS = {
    "transformers": "transformers' own loss (materialised logits)",
    "hpt_b": "hpt_fast patch_causal_lm_loss, mode B",
    "hpt_a": "hpt_fast patch_causal_lm_loss, mode A",
}


def build(name: str, args: argparse.Namespace, dtype: torch.dtype) -> tuple[torch.nn.Module, dict]:
    """The model as row ``name`` runs it, and a batch (input_ids, labels; the first quarter of each
    row's labels ignored, as a prompt)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
        num_key_value_heads=2 if args.hidden >= 128 else 1,
        head_dim=64, tie_word_embeddings=True, max_position_embeddings=max(args.seq, 32))
    model = transformers.Qwen2ForCausalLM(config).to(device=args.device, dtype=dtype).train()
    if name != "transformers":
        patch_causal_lm_loss(model, mode=name[-1].upper())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.tokens // args.seq, args.seq), generator=g).to(args.device)
    labels = ids.clone()
    labels[:, : args.seq // 4] = -100
    return model, {"input_ids": ids, "labels": labels}


def step_of(model: torch.nn.Module, batch: dict) -> Callable[[], float]:
    """One training step (gradients accumulate into allocated buffers); returns the loss."""
    def step() -> float:
        loss = model(**batch).loss
        loss.backward()
        return float(loss.detach())

    return step


def peak_extra_bytes(name: str, args: argparse.Namespace, dtype: torch.dtype) -> int:
    """Peak bytes of one step beyond the model, its gradients and the batch (after a warm step)."""
    model, batch = build(name, args, dtype)
    step = step_of(model, batch)
    step()  # gradients allocated, libraries initialised
    device = torch.device(args.device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    base = reset_peak_rss()
    step()
    return proc_status_bytes("VmHWM") - base


def memory(name: str, args: argparse.Namespace, dtype: str) -> Optional[int]:
    """``peak_extra_bytes`` in a fresh process on CPU, in this one on CUDA; None if it failed."""
    if args.device == "cuda":
        torch.cuda.empty_cache()
        return peak_extra_bytes(name, args, DTYPES[dtype])
    cmd = [sys.executable, "-m", "bench.causal_lm_loss", "--memory-child", name, "--dtypes", dtype,
           *(f"--{k}={getattr(args, k)}" for k in ("tokens", "seq", "hidden", "layers", "vocab", "device"))]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        print(f"memory run of {name} failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace, dtype: str) -> str:
    """The markdown table of one dtype."""
    names = list(ROWS)
    steps, losses = {}, {}
    for name in names:
        model, batch = build(name, args, DTYPES[dtype])
        steps[name] = step_of(model, batch)
        losses[name] = steps[name]()  # warm-up, and the loss each row computes
    del model, batch  # the steps hold them, until the timings are done
    reference = losses["transformers"]
    for name, loss in losses.items():
        # bf16: transformers' loss comes from bf16-rounded logits, the op's from float32 sums
        tolerance = 1e-4 if dtype == "float32" else 2e-2
        if abs(loss - reference) > tolerance * abs(reference):
            raise AssertionError(f"{name}'s loss {loss} is not transformers' {reference}")
    times = {name: [] for name in names}
    device = torch.device(args.device)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            synchronize(device)
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    del steps
    logits_bytes = args.tokens * args.vocab * 4
    base = statistics.median(times["transformers"])
    lines = [f"### {dtype}, {args.tokens} tokens (rows of {args.seq}), H {args.hidden}, {args.layers} layers, "
             f"V {args.vocab}", "",
             "| row | ms (spread) | x transformers | peak extra MiB | x float32 logits | loss |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name in names:
        ms = statistics.median(times[name]) * 1e3
        spread = (max(times[name]) - min(times[name])) / statistics.median(times[name])
        extra = memory(name, args, dtype)
        mem = ("failed", "—") if extra is None else (f"{extra / 2**20:.0f}", f"{extra / logits_bytes:.2f}x")
        lines.append(f"| {ROWS[name]} | {ms:.1f} ({spread:.0%}) | {ms / 1e3 / base:.2f}x | {mem[0]} | {mem[1]} "
                     f"| {losses[name]:.5f} |")
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=cli_description(__doc__))
    for name, default in (("tokens", 2048), ("seq", 512), ("hidden", 1024), ("layers", 2), ("vocab", 151936),
                          ("repeats", 3)):
        parser.add_argument(f"--{name}", type=int, default=default, help=f"default {default}")
    parser.add_argument("--dtypes", default="float32,bfloat16", type=lambda s: s.split(","))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--memory-child", metavar="ROW", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    bad = [d for d in args.dtypes if d not in ("float32", "bfloat16")]
    if bad:
        parser.error(f"unknown dtype(s) {bad}; choose from float32, bfloat16")
    if min(args.tokens, args.seq, args.hidden, args.layers, args.vocab, args.repeats) < 1:
        parser.error("--tokens, --seq, --hidden, --layers, --vocab and --repeats must be >= 1")
    if args.tokens % args.seq or args.hidden % 64:
        parser.error(f"--tokens must be a multiple of --seq and --hidden of 64, got {args.tokens}, {args.seq}, "
                     f"{args.hidden}")
    check_device(parser, args.device)
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.memory_child:
        print(json.dumps(peak_extra_bytes(args.memory_child, args, DTYPES[args.dtypes[0]])))
        return
    print("## A training step's loss: patch_causal_lm_loss against transformers' own\n")
    print(machine_description(args.device) + "\n")
    started, load_before = time.perf_counter(), load_average()
    for dtype in args.dtypes:
        print(run(args, dtype) + "\n", flush=True)
    print(f"{args.repeats} timed rounds per row after one warm-up step. Load average (1, 5, 15 min) before: "
          f"{load_before}; after: {load_average()}. Whole run: {(time.perf_counter() - started) / 60:.1f} min.")


if __name__ == "__main__":
    main()
