"""The implementations the benchmarks compare, each as a zero-argument forward+backward step.

Shared by ``bench/fused_op_table.py`` (one markdown table per shape) and
``bench/test_bench_fused_op.py`` (pytest-benchmark). Every step runs on one ``Problem``: hidden
[T, H] and weight [V, H] leaves in the benchmark dtype (the mixed-precision rows: float32 copies,
see ``Impl``), targets [T] int64, and per-token float32 side inputs for a GRPO-like loss. A step leaves its gradients in ``hidden.grad`` / ``weight.grad``;
callers reset them with ``Problem.zero_grads`` outside the timed region, so every step allocates
its gradients the way a training step without gradient accumulation does.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Optional

import torch
from torch import Tensor

from hpt_fast import backends, fused_linear_loss, fused_token_logprobs

Step = Callable[[], None]

# Tokens per sequence when an implementation needs a [B, S] layout (Liger): a typical completion
# length, and Liger's default chunk is one sequence, so this is also its token chunk.
SEQ_LEN = 512
ENTROPY_COEF = 0.001
SOFTCAP = 30.0  # the soft-capped rows' cap: Gemma 2's final_logit_softcapping


@dataclass
class Problem:
    """Inputs of one benchmark case.

    hidden: [T, H] dtype, requires grad. weight: [V, H] dtype, requires grad. targets: [T] int64.
    adv: [T] float32 per-token advantages, constant within each sequence of ``seq_len`` tokens.
    old_logp: [T] float32 (<= 0), the behaviour policy's log-probs. g_logp, g_ent: [T] float32
    upstream gradients for the implementations that return per-token values.
    """

    hidden: Tensor
    weight: Tensor
    targets: Tensor
    adv: Tensor
    old_logp: Tensor
    g_logp: Tensor
    g_ent: Tensor
    seq_len: int

    @property
    def tokens(self) -> int:
        return self.hidden.shape[0]

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def zero_grads(self) -> None:
        """Drop the previous step's gradients so the next step allocates its own (the float32
        leaves' too, once made)."""
        self.hidden.grad = None
        self.weight.grad = None
        if "float32_leaves" in self.__dict__:
            self.float32_leaves.zero_grads()

    def grad_bytes(self) -> int:
        """Bytes of the gradients a step leaves behind (same shapes and dtype as the inputs)."""
        return (self.hidden.numel() + self.weight.numel()) * self.hidden.element_size()

    @cached_property
    def float32_leaves(self) -> "Problem":
        """This problem with hidden and weight as float32 leaves of the same values (exactly:
        bf16 / fp16 values are float32 values), the parameters and activations of torch AMP's
        mixed precision; the rows that use them run their forward under torch.autocast in this
        problem's dtype (see ``Impl.mixed``)."""
        return dataclasses.replace(
            self,
            hidden=self.hidden.detach().float().requires_grad_(True),
            weight=self.weight.detach().float().requires_grad_(True),
        )

    def naive_logits_bytes(self) -> int:
        """The memory unit of the tables: the [T, V] float32 logits the naive version holds."""
        return self.tokens * self.vocab * 4

    def head(self, n: int) -> "Problem":
        """The first ``n`` tokens as a problem of their own, sharing the weight.

        Warm-ups use it: they run the same code at the same H and V without a second [V, H] tensor.
        The per-token tensors are copies, not views: compiled code (CCE) guards on whether an input
        is a view, and the full-size tensors are not.
        """

        def first(t: Tensor) -> Tensor:
            return t.detach()[:n].clone()

        return Problem(
            hidden=first(self.hidden).requires_grad_(True),
            weight=self.weight,
            targets=first(self.targets),
            adv=first(self.adv),
            old_logp=first(self.old_logp),
            g_logp=first(self.g_logp),
            g_ent=first(self.g_ent),
            seq_len=min(self.seq_len, n),
        )

    @cached_property
    def gemm_buffers(self) -> "GemmBuffers":
        """Built on first use only: at large V they take two [T, V] tensors."""
        return GemmBuffers(self)


def make_problem(tokens: int, hidden_size: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0) -> Problem:
    """Random inputs whose logits have unit scale, so softmax is neither flat nor one-hot."""
    gen = torch.Generator().manual_seed(seed)
    seq_len = min(SEQ_LEN, tokens)
    if tokens % seq_len:
        raise ValueError(f"tokens ({tokens}) must be a multiple of the sequence length {seq_len}")

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    adv_per_seq = randn(tokens // seq_len)
    return Problem(
        hidden=randn(tokens, hidden_size).to(dtype).requires_grad_(True),
        weight=randn(vocab, hidden_size, scale=hidden_size**-0.5).to(dtype).requires_grad_(True),
        targets=torch.randint(0, vocab, (tokens,), generator=gen).to(device),
        adv=adv_per_seq.repeat_interleave(seq_len),
        # near the policy's own log-probs of random targets, so exp(logp - old) stays near 1
        old_logp=randn(tokens, scale=0.1) - math.log(vocab) - 0.5,
        g_logp=randn(tokens, scale=1.0 / tokens),
        g_ent=randn(tokens, scale=1.0 / tokens),
        seq_len=seq_len,
    )


def grpo_token_loss(p: Problem) -> Callable[[Tensor, Optional[Tensor], Tensor], Tensor]:
    """Per-token loss -adv * exp(logp - old) - c * entropy, for ``fused_linear_loss`` and naive.

    (logp [C] float32, entropy [C] float32, rows [C] int64) -> losses [C] float32.
    """

    def loss(logp: Tensor, entropy: Optional[Tensor], rows: Tensor) -> Tensor:
        return -p.adv[rows] * torch.exp(logp - p.old_logp[rows]) - ENTROPY_COEF * entropy

    return loss


@dataclass(frozen=True)
class Impl:
    """One benchmarked implementation.

    name: short id (command line, pytest ids). label: the table's row text. floor: how many
    [T x H x V] GEMMs form its floor (None for the bare GEMM rows themselves). build: Problem ->
    Step. missing: device type -> why it cannot run there, or None when it can. mixed: torch
    AMP's mixed precision, the step's forward on the problem's float32 leaves under autocast in
    its (low-precision) dtype, its backward outside (``Problem.float32_leaves``). by_name: left out
    of the default selection, run only when named (the other libraries' soft-capped rows).
    """

    name: str
    label: str
    floor: Optional[int]
    build: Callable[[Problem], Step]
    missing: Callable[[str], Optional[str]] = lambda device: None
    mixed: bool = False
    by_name: bool = False

    def grad_bytes(self, p: Problem) -> int:
        """Bytes of the gradients its step leaves behind on ``p``'s leaves."""
        return (p.float32_leaves if self.mixed else p).grad_bytes()


def forward_inputs(p: Problem, mixed: bool) -> tuple[Problem, Callable[[], contextlib.AbstractContextManager]]:
    """(the problem a step's forward takes, the context it runs in): ``p`` and no context, or
    with ``mixed`` p's float32 leaves under torch.autocast in p's dtype, as torch AMP runs a
    forward (the backward runs outside it)."""
    if not mixed:
        return p, contextlib.nullcontext
    if p.hidden.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"mixed precision needs a bfloat16 or float16 problem, got {p.hidden.dtype}")
    return p.float32_leaves, lambda: torch.autocast(p.device.type, dtype=p.hidden.dtype)


def _hpt_mode_a(
    backend: str, grad_order: str = "auto", mixed: bool = False, softcap: Optional[float] = None,
    fields: bool = False,
) -> Callable[[Problem], Step]:
    """Mode A's step, logp and entropy with a backward through both; ``fields``: also the top-1
    flags, the logit mean and log sum p^2 (what TRL's DPO trainer with WPO weighting asks for)."""
    extras = dict(return_top1=True, return_logit_mean=True, return_log_sum_sq_probs=True) if fields else {}

    def build(p: Problem) -> Step:
        q, forward = forward_inputs(p, mixed)

        def step() -> None:
            with forward():
                logp, ent, *_ = fused_token_logprobs(q.hidden, q.weight, q.targets, return_entropy=True,
                                                     backend=backend, grad_order=grad_order, softcap=softcap,
                                                     **extras)
            torch.autograd.backward((logp, ent), (q.g_logp, q.g_ent))

        return step

    return build


def _hpt_mode_b(
    backend: str, grad_order: str = "auto", one_chunk: bool = False, accum_dtype: Optional[torch.dtype] = torch.float32,
    mixed: bool = False, cast_first: bool = False, softcap: Optional[float] = None,
) -> Callable[[Problem], Step]:
    """Mode B's step; ``one_chunk``: all tokens in one logits block [T, V] instead of the memory
    budget's chunks (the memory cut-cross-entropy's portable path takes, see ``implementations``);
    ``accum_dtype``: the op's argument (None: a low-precision grad_weight summed over the token
    chunks in its own dtype); ``mixed``: see ``Impl``; ``cast_first``: the float32 leaves cast
    to the problem's dtype before the op, so it sees low-precision inputs and autograd casts their
    gradients back (how the op ran under autocast before it took float32 inputs itself);
    ``softcap``: the op's logit soft cap."""

    def build(p: Problem) -> Step:
        q, forward = forward_inputs(p, mixed)
        token_loss = grpo_token_loss(q)
        chunk_size = q.tokens if one_chunk else None

        def cast(t: Tensor) -> Tensor:
            return t.to(p.hidden.dtype) if cast_first else t

        def step() -> None:
            with forward():
                # the casts are temporaries: freed when the op returns, as its own were
                loss, _, _ = fused_linear_loss(cast(q.hidden), cast(q.weight), q.targets, token_loss,
                                               with_entropy=True, backend=backend, grad_order=grad_order,
                                               chunk_size=chunk_size, accum_dtype=accum_dtype, softcap=softcap)
            loss.backward()

        return step

    return build


def _naive(mixed: bool = False, softcap: Optional[float] = None) -> Callable[[Problem], Step]:
    """Materialised logits, float32 log_softmax, gather, entropy; ``mixed``: see ``Impl``;
    ``softcap``: the logits capped at c * tanh(logits / c) first (in float32), as Gemma 2 does."""

    def build(p: Problem) -> Step:
        q, forward = forward_inputs(p, mixed)
        token_loss = grpo_token_loss(q)
        rows = torch.arange(q.tokens, device=q.device)

        def step() -> None:
            with forward():
                logits = (q.hidden @ q.weight.t()).float()
                if softcap is not None:
                    logits = softcap * torch.tanh(logits / softcap)
                logp_all = torch.log_softmax(logits, dim=-1)
                logp = logp_all.gather(1, q.targets[:, None]).squeeze(1)
                entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
                loss = token_loss(logp, entropy, rows).sum()
            loss.backward()

        return step

    return build


def _liger_grpo(p: Problem) -> Step:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    # beta=0 and no reference model match our loss; compiled=False because the part Liger compiles
    # is only the O(tokens) loss math, and compiling it costs warm-up time and inductor memory.
    loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, compiled=False)
    batch = p.tokens // p.seq_len
    targets = p.targets.view(batch, p.seq_len)
    mask = torch.ones(batch, p.seq_len, dtype=torch.long, device=p.device)
    adv = p.adv.view(batch, p.seq_len)[:, 0].contiguous()
    old = p.old_logp.view(batch, p.seq_len)

    def step() -> None:
        hidden = p.hidden.view(batch, p.seq_len, -1)
        loss, _ = loss_fn(hidden, p.weight, targets, mask, adv, old_per_token_logps=old)
        loss.backward()

    return step


def _liger_flce(softcap: Optional[float] = None) -> Callable[[Problem], Step]:
    """Liger's fused linear cross-entropy, with its own logit soft cap where given."""

    def build(p: Problem) -> Step:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        # its defaults: mean cross-entropy, grad_weight summed over the token chunks in its own dtype
        loss_fn = LigerFusedLinearCrossEntropyLoss(softcap=softcap)

        def step() -> None:
            loss_fn(p.weight, p.hidden, p.targets).backward()

        return step

    return build


def _cce(softcap: Optional[float] = None) -> Callable[[Problem], Step]:
    """cut-cross-entropy's ``linear_cross_entropy`` (mean cross-entropy), with its own soft cap
    where given."""

    def build(p: Problem) -> Step:
        from cut_cross_entropy import linear_cross_entropy

        # the Triton "cce" kernel needs CUDA and refuses float32 in its backward; "torch_compile" is
        # its portable path
        impl = "cce" if p.device.type == "cuda" and p.hidden.dtype != torch.float32 else "torch_compile"

        def step() -> None:
            linear_cross_entropy(p.hidden, p.weight, p.targets, impl=impl, softcap=softcap).backward()

        return step

    return build


# the fields TRL's DPO trainer with WPO weighting asks its head for
TRL_ALL_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _trl_chunked(outputs: tuple[str, ...] = ("log_probs", "entropy"),
                 softcap: Optional[float] = None) -> Callable[[Problem], Step]:
    """TRL's own fused LM head, what its trainers run since TRL 1.16 (``add_fused_lm_head``; GRPO
    asks for log_probs and entropy): per-token logp and entropy with autograd, like mode A,
    backward through both; 32768 vocabulary columns per tile, as the trainer passes; ``softcap``:
    its ``final_logit_softcapping``."""

    def build(p: Problem) -> Step:
        from trl.kernels import ChunkedLogProbFunction

        def step() -> None:
            logp, ent, *_ = ChunkedLogProbFunction.apply(
                p.hidden, p.weight, None, p.targets, 1.0, 32768, softcap, 1.0, outputs
            )
            torch.autograd.backward((logp, ent), (p.g_logp, p.g_ent))

        return step

    return build


class GemmBuffers:
    """Preallocated operands and outputs, so the bare GEMM rows time the GEMM and nothing else.

    h: [T, H], w: [V, H] (the problem's inputs, detached); logits, dlogits: [T, V]; dh: [T, H];
    dw: [V, H]; all in the problem's dtype.
    """

    def __init__(self, p: Problem) -> None:
        self.h, self.w = p.hidden.detach(), p.weight.detach()
        self.logits = torch.empty(p.tokens, p.vocab, dtype=self.h.dtype, device=p.device)
        self.dlogits = torch.randn(p.tokens, p.vocab, dtype=self.h.dtype, device=p.device)
        self.dh = torch.empty_like(self.h)
        self.dw = torch.empty_like(self.w)


def torch_mm(a: Tensor, b: Tensor, out: Tensor, add: bool = False) -> None:
    """out = a @ b (out += a @ b with ``add``) by torch's own GEMM (MKL's in float32 on CPU)."""
    if add:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


def bare_mm(a: Tensor, b: Tensor, out: Tensor, add: bool = False) -> None:
    """out = a @ b (out += a @ b with ``add``) by the GEMM the op's default backend runs on these
    tensors: on CPU in float32 the cpu backend's oneDNN one where it works here
    (``cpu_backend.gemm_into``), else torch's. The floor is the same GEMMs as the op's, so x floor
    measures the op, not the GEMM library."""
    if not (a.device.type == "cpu" and "cpu" in backends.available() and backends.load("cpu").gemm_into(out, a, b, add)):
        torch_mm(a, b, out, add)


def _gemm_logits(p: Problem) -> Step:
    b = p.gemm_buffers
    return lambda: bare_mm(b.h, b.w.t(), b.logits)


def _gemm_dh(p: Problem) -> Step:
    b = p.gemm_buffers
    return lambda: bare_mm(b.dlogits, b.w, b.dh)


def _gemm_dw(p: Problem) -> Step:
    b = p.gemm_buffers
    return lambda: bare_mm(b.dlogits.t(), b.h, b.dw)


def _needs_module(module: str, cuda_only: bool = False, also: tuple[str, ...] = ()) -> Callable[[str], Optional[str]]:
    """``Impl.missing`` for an implementation from ``module``; ``cuda_only``: its kernels are
    Triton kernels with no CPU path; ``also``: modules it imports only when it runs."""

    def missing(device: str) -> Optional[str]:
        if cuda_only and device != "cuda":
            return f"{module}'s Triton kernels need CUDA"
        absent = [name for name in (module, *also) if importlib.util.find_spec(name) is None]
        return f"{', '.join(absent)} {'is' if len(absent) == 1 else 'are'} not installed" if absent else None

    return missing


GEMM_NAMES = ("gemm_logits", "gemm_dh", "gemm_dw")


def _hpt_backends(device: str) -> list[str]:
    """The hpt_fast backends that run on ``device`` at a speed worth timing.

    triton runs on CPU only through its interpreter, far too slow to time; the C++ "cpu" backend
    takes CPU tensors only.
    """
    excluded = "cpu" if device == "cuda" else "triton"
    return [name for name in backends.available() if name != excluded]


def implementations(device: str) -> list[Impl]:
    """Every implementation to compare on ``device`` ("cpu" or "cuda"), bare GEMMs first."""
    impls = [
        Impl("gemm_logits", "GEMM logits = h @ W.T", None, _gemm_logits),
        Impl("gemm_dh", "GEMM dh = dlogits @ W", None, _gemm_dh),
        Impl("gemm_dw", "GEMM dW = dlogits.T @ h", None, _gemm_dw),
    ]
    for backend in _hpt_backends(device):
        impls.append(Impl(f"hpt_a_{backend}", f"hpt_fast mode A, backend {backend}", 4, _hpt_mode_a(backend)))
        impls.append(Impl(f"hpt_b_{backend}", f"hpt_fast mode B, backend {backend}", 3, _hpt_mode_b(backend)))
    # the default backend again with its loop order forced, beside the plan's own choice
    # (vocabulary order for mode A at N < V, and for mode B where token order's float32 [V, H]
    # buffer would be too large)
    default = "triton" if device == "cuda" else "cpu"
    if default in _hpt_backends(device):
        impls.append(Impl(f"hpt_a_{default}_tokens", f"hpt_fast mode A, backend {default}, token order", 4,
                          _hpt_mode_a(default, "tokens")))
        impls.append(Impl(f"hpt_b_{default}_tokens", f"hpt_fast mode B, backend {default}, token order", 3,
                          _hpt_mode_b(default, "tokens")))
        impls.append(Impl(f"hpt_b_{default}_vocab", f"hpt_fast mode B, backend {default}, vocabulary order", 3,
                          _hpt_mode_b(default, "vocab")))
        # mode B given about the memory cut-cross-entropy's portable path uses (a [T, V] block):
        # time at equal memory, beside the default's time at its memory budget
        impls.append(Impl(f"hpt_b_{default}_one_chunk", f"hpt_fast mode B, backend {default}, one token chunk", 3,
                          _hpt_mode_b(default, "tokens", one_chunk=True)))
        # grad_weight summed over the token chunks in the inputs' dtype, as Liger's and CCE's
        # defaults do: token order at the block budget's memory (float32 inputs: the default)
        impls.append(Impl(f"hpt_b_{default}_lowp_sum", f"hpt_fast mode B, backend {default}, accum_dtype=None", 3,
                          _hpt_mode_b(default, accum_dtype=None)))
        # Gemma 2's logit soft cap (30): a tanh and its derivative per logit in the row kernels
        impls.append(Impl(f"hpt_a_{default}_softcap", f"hpt_fast mode A, backend {default}, softcap 30", 4,
                          _hpt_mode_a(default, softcap=SOFTCAP)))
        impls.append(Impl(f"hpt_b_{default}_softcap", f"hpt_fast mode B, backend {default}, softcap 30", 3,
                          _hpt_mode_b(default, softcap=SOFTCAP)))
        # TRL's DPO / WPO fields: top-1 flags, the logit mean and log sum p^2 beside logp and entropy
        impls.append(Impl(f"hpt_a_{default}_fields", f"hpt_fast mode A, backend {default}, + top-1, logit mean, "
                          "log sum p^2", 4, _hpt_mode_a(default, fields=True)))
        # torch AMP (low-precision tables only; by name, not in the default selection): the op
        # given the float32 leaves, and given casts of them as before it took float32 inputs
        impls.append(Impl(f"hpt_a_{default}_autocast", f"hpt_fast mode A, backend {default}, float32 leaves, autocast",
                          4, _hpt_mode_a(default, mixed=True), mixed=True))
        impls.append(Impl(f"hpt_b_{default}_autocast", f"hpt_fast mode B, backend {default}, float32 leaves, autocast",
                          3, _hpt_mode_b(default, mixed=True), mixed=True))
        impls.append(Impl(f"hpt_b_{default}_autocast_cast",
                          f"hpt_fast mode B, backend {default}, float32 leaves cast to the dtype first, autocast", 3,
                          _hpt_mode_b(default, mixed=True, cast_first=True), mixed=True))
    cce_impl = "cce, torch_compile in fp32" if device == "cuda" else "torch_compile"
    impls += [
        Impl("naive", "naive PyTorch (materialised logits)", 3, _naive()),
        Impl("naive_autocast", "naive PyTorch, float32 leaves, autocast", 3, _naive(mixed=True), mixed=True),
        Impl("liger_grpo", "Liger LigerFusedLinearGRPOLoss (no entropy)", 3, _liger_grpo, _needs_module("liger_kernel")),
        Impl("liger_flce", "Liger LigerFusedLinearCrossEntropyLoss (CE only)", 3, _liger_flce(),
             _needs_module("liger_kernel", cuda_only=True)),
        Impl("trl_chunked", "TRL ChunkedLogProbFunction (its GRPO head: logp + entropy)", 4, _trl_chunked(),
             # its backward imports trl.trainer.utils, which needs accelerate and datasets
             _needs_module("trl", also=("accelerate", "datasets"))),
        Impl("trl_chunked_fields", "TRL ChunkedLogProbFunction, + top-1, logit mean, log sum p^2 (DPO with WPO)", 4,
             _trl_chunked(TRL_ALL_FIELDS), _needs_module("trl", also=("accelerate", "datasets"))),
        Impl("cce", f"cut-cross-entropy {cce_impl} (CE only)", 3, _cce(), _needs_module("cut_cross_entropy")),
        # the others' own soft caps (Gemma 2's 30), beside hpt_*_softcap; by name only
        Impl("naive_softcap", "naive PyTorch, softcap 30", 3, _naive(softcap=SOFTCAP), by_name=True),
        Impl("liger_flce_softcap", "Liger LigerFusedLinearCrossEntropyLoss (CE only), softcap 30", 3,
             _liger_flce(SOFTCAP), _needs_module("liger_kernel", cuda_only=True), by_name=True),
        Impl("trl_chunked_softcap", "TRL ChunkedLogProbFunction (logp + entropy), softcap 30", 4,
             _trl_chunked(softcap=SOFTCAP), _needs_module("trl", also=("accelerate", "datasets")), by_name=True),
        Impl("cce_softcap", f"cut-cross-entropy {cce_impl} (CE only), softcap 30", 3, _cce(SOFTCAP),
             _needs_module("cut_cross_entropy"), by_name=True),
    ]
    return impls


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a wall-clock interval covers the work it launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

