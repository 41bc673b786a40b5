"""How exact the op is in float32, against float64 and beside naive PyTorch in float32.

Three tables, each measured against a float64 computation on the same float32 values:
- the logits of one float32 GEMM as MKL computes it (torch.mm) and as oneDNN does (the cpu
  backend's float32 products, ``cpu_backend.gemm_into``);
- mode A's logp and entropy and the gradients of a loss of both (random weights per token),
  naive (materialised logits, log_softmax, autograd) and through the op's torch and cpu
  backends, with logits scaled up to |z| of about 190 and half the targets their row's largest
  logit (confident tokens);
- near-deterministic rows: one at V 2 (scaled logits near 100, 1 - p of its target near 1e-5),
  and rows at the table's V whose target leads until 1 - p is 1e-3, 1e-5 or 1e-7, where logp,
  the entropy and the gradient are of the order of 1 - p: naive and the op's backends.

    python -m bench.float32_precision
"""
from __future__ import annotations

import argparse

import torch
from torch import Tensor

from bench.cli import cli_description
from bench.fused_op_table import machine_description
from hpt_fast import backends, fused_token_logprobs
from hpt_fast.backends import cpu_backend

# (scale of the logits, temperature)
CASES = [(3.0, 1.0), (10.0, 1.0), (30.0, 1.0), (10.0, 0.3)]


def err(got: Tensor, want: Tensor) -> float:
    """max |got - want| / max |want|."""
    return float((got.double() - want).abs().max() / want.abs().max())


def gemm_table(tokens: int, hidden: int, vocab: int) -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * 10 / hidden**0.5
    want = h.float().double() @ w.float().double().t()
    print(f"\n### One float32 GEMM, logits {tokens} x {hidden} x {vocab}: max error / max |logit|\n")
    print("| GEMM | error |")
    print("| --- | --- |")
    print(f"| torch.mm (MKL) | {err(h.float() @ w.float().t(), want):.2e} |")
    out = torch.empty(tokens, vocab)
    if cpu_backend.gemm_into(out, h.float(), w.float().t(), False):
        print(f"| oneDNN (the cpu backend's float32 products) | {err(out, want):.2e} |")


def _objective(logp: Tensor, entropy: Tensor, g_logp: Tensor, g_ent: Tensor) -> Tensor:
    return (logp * g_logp.to(logp.dtype)).sum() + (entropy * g_ent.to(entropy.dtype)).sum()


def errors(h64: Tensor, w64: Tensor, targets: Tensor, temperature: float, softcap: float | None,
           g_logp: Tensor, g_ent: Tensor) -> dict[str, list[float]]:
    """{way: [logp, entropy, grad_hidden, grad_weight errors]} against float64 on the float32 values."""
    out = {}
    ways = ["float64", "naive float32"] + [b for b in ("torch", "cpu") if b in backends.available()]
    for way in ways:
        dtype = torch.float64 if way == "float64" else torch.float32
        h = h64.float().to(dtype).requires_grad_()
        w = w64.float().to(dtype).requires_grad_()
        if way in ("float64", "naive float32"):
            logits = h @ w.t()
            if softcap is not None:
                logits = softcap * torch.tanh(logits / softcap)
            logprobs = torch.log_softmax(logits / temperature, dim=-1)
            logp = logprobs.gather(1, targets[:, None]).squeeze(1)
            entropy = -(logprobs.exp() * logprobs).sum(-1)
        else:
            logp, entropy = fused_token_logprobs(h, w, targets, temperature=temperature, softcap=softcap,
                                                 return_entropy=True, backend=way)
        grads = torch.autograd.grad(_objective(logp, entropy, g_logp, g_ent), [h, w])
        out[way] = [x.detach().double() for x in (logp, entropy, *grads)]
    want = out.pop("float64")
    return {way: [err(a, b) for a, b in zip(got, want)] for way, got in out.items()}


def print_rows(label: str, rows: dict[str, list[float]]) -> None:
    for way, e in rows.items():
        print(f"| {label} | {way} | " + " | ".join(f"{x:.1e}" for x in e) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=cli_description(__doc__))
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8192)
    args = parser.parse_args()
    print("## Float32 precision against float64")
    print(machine_description("cpu"))
    gemm_table(args.tokens, args.hidden, args.vocab)

    print(f"\n### Mode A, tokens {args.tokens}, H {args.hidden}, V {args.vocab}: max error / max |float64|\n")
    print("| logits scale, temperature: max abs z | way | logp | entropy | grad_hidden | grad_weight |")
    print("| --- | --- | --- | --- | --- | --- |")
    for scale, temperature in CASES:
        g = torch.Generator().manual_seed(1)
        h = torch.randn(args.tokens, args.hidden, generator=g, dtype=torch.float64)
        w = torch.randn(args.vocab, args.hidden, generator=g, dtype=torch.float64) * scale / args.hidden**0.5
        targets = torch.randint(0, args.vocab, (args.tokens,), generator=g)
        confident = args.tokens // 2
        targets[:confident] = (h[:confident].float() @ w.float().t()).argmax(-1)
        g_logp, g_ent = torch.randn(args.tokens, generator=g), torch.randn(args.tokens, generator=g)
        z_max = float((h.float() @ w.float().t()).abs().max()) / temperature
        print_rows(f"{scale:g}, {temperature:g}: {z_max:.0f}",
                   errors(h, w, targets, temperature, None, g_logp, g_ent))

    print("\n### Near-deterministic rows\n")
    print("V 2: logits 30 and 26.5, temperature 0.3 (z 100 and 88.3); the others at temperature 1.\n")
    g = torch.Generator().manual_seed(2)
    h = torch.randn(1, 64, generator=g, dtype=torch.float64)
    w = torch.randn(2, 64, generator=g, dtype=torch.float64) / 8
    for row, logit in enumerate((30.0, 26.5)):  # moved along h to these logits
        w[row] += h[0] * (logit - float(h[0] @ w[row])) / float(h[0] @ h[0])
    targets = torch.tensor([0])
    ones = torch.ones(1, dtype=torch.float64)
    p_other = torch.softmax(h.float().double() @ w.float().double().t() / 0.3, -1)[0, 1]
    print(f"At V 2, 1 - p(target) = {float(p_other):.2e}.\n")
    print("| row | way | logp | entropy | grad_hidden | grad_weight |")
    print("| --- | --- | --- | --- | --- | --- |")
    print_rows("V 2", errors(h, w, targets, 0.3, None, ones, ones))
    for tail in (1e-3, 1e-5, 1e-7):
        h, w, targets = peaked_row(args.vocab, tail)
        print_rows(f"V {args.vocab}, 1 - p {tail:.0e}", errors(h, w, targets, 1.0, None, ones, ones))


def peaked_row(vocab: int, tail: float) -> tuple[Tensor, Tensor, Tensor]:
    """hidden [1, 64] and weight [vocab, 64] float64 and targets [1]: random, the target's weight
    row then moved along the hidden vector until 1 - p of the target is ``tail``."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(1, 64, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, 64, generator=g, dtype=torch.float64) / 8
    target = vocab // 3
    logits = (h @ w.t())[0]
    others = torch.logsumexp(torch.cat([logits[:target], logits[target + 1:]]), 0)
    wanted = float(others) - float(torch.tensor(tail, dtype=torch.float64).log())
    w[target] += h[0] * (wanted - float(h[0] @ w[target])) / float(h[0] @ h[0])
    return h, w, torch.tensor([target])


if __name__ == "__main__":
    main()
