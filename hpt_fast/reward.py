"""The verifiable reward: 1.0 when a response's last ``\\boxed{...}`` answer matches the ground truth, else 0.0.

No format reward (hpt.md section 3). Each response goes through these steps, cheapest first:

1. extraction (``extract_boxed``): the answer is the content of the *last* ``\\boxed`` in the
   response. Forms: ``\\boxed{...}`` with nested braces (escaped ``\\{`` / ``\\}`` do not count
   towards nesting) and the bare form ``\\boxed 42`` (the characters after one or more spaces, up to
   the next whitespace or ``$``, as MATH's reference grader reads it). ``\\boxedfoo`` is another
   macro, not a box. A last box whose braces never close (a truncated response) is no answer: an
   earlier box does not count, since the response did not end with it. No answer scores 0.
2. normalised string match (``normalize_answer``) of the answer with the ground truth.
3. integer shortcut: when both normalised strings are integer literals, they are compared as
   integers (leading zeros and sign), and a mismatch is final: math-verify could not say otherwise,
   unless a percent sign was dropped (math-verify reads ``100\\%`` as 100 and as 1 alike), which
   leaves a mismatch to math-verify.
4. math-verify (``math_verify_check``): both sides are parsed as ``\\boxed{...}`` LaTeX by
   ``math_verify.parse`` and compared by ``math_verify.verify`` (numeric, symbolic, sets, intervals,
   relations). This step can take unbounded time (``9^{9^{9^{9}}}`` makes sympy compute a power
   that never ends, inside C code that no signal interrupts), so it runs in a worker process of a
   ``RewardPool`` under a per-check time limit: a check past the limit has its worker killed and
   replaced, and scores 0 as ``"timeout"``; a worker that dies scores 0 as ``"crash"``; an exception
   in the check scores 0 as ``"error"``. Steps 1-3 run in the calling process in time linear in the
   input, so a huge response costs its length and nothing more.

A ground truth that itself contains ``\\boxed`` is reduced to its last box first.
"""
from __future__ import annotations

import ctypes
import logging
import math
import multiprocessing as mp
import os
import re
import signal
import sys
import time
import weakref
from collections import Counter, deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Callable, Optional, Sequence

import numpy as np
# imported here, not in the workers: forked workers then start with sympy already loaded
from math_verify import parse as mv_parse
from math_verify import verify as mv_verify

_BOXED = "\\boxed"
# a backslash escapes the next character, so \{ and \} are literal braces
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.DOTALL)
# wrappers whose braces only format: the content is the answer
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\{([^{}]*)\}")
# sizing macros, matched as whole names: \leftarrow and \rightarrow keep their value
_SIZING = re.compile(r"\\(?:left|right|displaystyle)(?![a-zA-Z])")
# spacing and units that never change an answer's value, dropped once whitespace is gone
_DROPPED = ("\\!", "\\,", "\\;", "\\:", "^{\\circ}", "^\\circ", "\u00b0", "\\%", "%", "$")
_INTEGER = re.compile(r"[+-]?\d+")

# outcomes of a check; the first three score 1
CORRECT = ("match", "integer", "verified")
# the checks that scored 0 without deciding: past the time limit, a dead worker, an exception
UNDECIDED = ("timeout", "crash", "error")
OUTCOMES = CORRECT + ("wrong", "no_answer") + UNDECIDED


def _boxed_start(text: str) -> int:
    """Index just after the last ``\\boxed`` that is not the prefix of a longer macro name, or -1."""
    end = len(text)
    while True:
        i = text.rfind(_BOXED, 0, end)
        if i < 0:
            return -1
        after = i + len(_BOXED)
        if after == len(text) or not text[after].isalpha():
            return after
        end = i + len(_BOXED) - 1


def extract_boxed(text: str) -> Optional[str]:
    """The content of the last ``\\boxed`` of ``text`` (forms in the module docstring), stripped.

    Returns None when there is no box, when the last box's braces never close, or when it is empty.
    """
    start = _boxed_start(text)
    if start < 0:
        return None
    rest = text[start:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        open_at = start + len(rest) - len(stripped)
        depth = 0
        for m in _BRACE_OR_ESCAPE.finditer(text, open_at):
            ch = m.group()
            if len(ch) == 2:
                continue  # an escape such as \{ or \}: never a delimiter
            depth += 1 if ch == "{" else -1
            if depth == 0:
                return text[open_at + 1 : m.start()].strip() or None
        return None
    if rest[:1].isspace() and stripped:
        return re.match(r"[^\s$]*", stripped).group() or None
    return None


def normalize_answer(answer: str) -> str:
    """The answer without what never changes its value: ``$``, whitespace, ``\\left`` / ``\\right``,
    LaTeX spacing (``\\!``, ``\\,``, ``\\;``, ``\\:``), ``\\displaystyle``, degree marks (``^\\circ``, ``°``), percent
    signs, formatting wrappers (``\\text{}``, ``\\mathrm{}``, ...) and a trailing period, with
    ``\\dfrac`` / ``\\tfrac`` written as ``\\frac``. Case is kept (variables are case-sensitive).
    """
    s = _TEXT_WRAP.sub(r"\1", answer)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = "".join(_SIZING.sub("", s).split())
    for token in _DROPPED:
        s = s.replace(token, "")
    return s.rstrip(".")


def _canonical_integer(s: str) -> Optional[str]:
    """``s`` as a canonical integer string (no "+", no leading zeros, no "-0"), or None if not one."""
    if not _INTEGER.fullmatch(s):
        return None
    sign = "-" if s[0] == "-" else ""
    digits = s.lstrip("+-").lstrip("0") or "0"
    return digits if digits == "0" else sign + digits


def _ground_truth_answer(ground_truth: str) -> str:
    if _BOXED in ground_truth:
        boxed = extract_boxed(ground_truth)
        if boxed is not None:
            return boxed
    return ground_truth.strip()


def quick_check(response: str, ground_truth: str) -> tuple[Optional[str], str, str]:
    """Steps 1-3 of the module docstring, in the calling process.

    Returns:
        (outcome, answer, gold): the outcome when these steps decide it, else None (math-verify
        must decide); the extracted answer and the ground truth's answer ("" when no answer).
    """
    answer = extract_boxed(response)
    if answer is None:
        return "no_answer", "", ""
    gold = _ground_truth_answer(ground_truth)
    a, g = normalize_answer(answer), normalize_answer(gold)
    if a == g and a:
        return "match", answer, gold
    ia, ig = _canonical_integer(a), _canonical_integer(g)
    if ia is not None and ig is not None and (ia == ig or "%" not in answer + gold):
        return ("integer" if ia == ig else "wrong"), answer, gold
    return None, answer, gold


def math_verify_check(answer: str, gold: str) -> bool:
    """Whether ``answer`` equals ``gold`` by math-verify, both read as ``\\boxed{...}`` LaTeX.

    Runs without math-verify's own time limits (they use SIGALRM, which cannot stop a computation
    inside C code): call it through ``RewardPool``, whose limit kills the process.
    """

    def read(s: str):
        return mv_parse("\\boxed{" + s.strip().strip("$") + "}", parsing_timeout=None)

    return bool(mv_verify(read(gold), read(answer), timeout_seconds=None))


# prctl option of <linux/prctl.h>: the signal a process gets when its parent dies. prctl is looked
# up here, in the trainer: a forked child must not enter the dynamic loader, whose lock another
# trainer thread may have held at the fork.
_PR_SET_PDEATHSIG = 1
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


@dataclass(frozen=True)
class Scores:
    """The rewards of a batch of responses.

    Attributes:
        rewards: float32 [N], 1.0 for a correct answer, else 0.0.
        outcomes: [N], each one of ``OUTCOMES``: how the reward was decided.
    """

    rewards: np.ndarray
    outcomes: tuple[str, ...]

    def counts(self) -> dict[str, int]:
        """Number of responses per outcome (every outcome of ``OUTCOMES``, zeros included)."""
        c = Counter(self.outcomes)
        return {k: c.get(k, 0) for k in OUTCOMES}

    @property
    def undecided(self) -> int:
        """How many responses scored 0 because their check did not finish (``UNDECIDED``)."""
        return sum(o in UNDECIDED for o in self.outcomes)


def _die_with(parent_pid: Optional[int]) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux).

    A worker otherwise outlives a trainer killed by SIGKILL, the OOM killer or a crash: forked
    workers inherit the pipe ends that would give them EOF, and one mid-check may hold the GIL in
    a single huge integer power, where no watcher thread could run. The kernel's signal comes
    when the thread that started the worker ends; if that is not the trainer's main thread, a
    killed idle worker is replaced at the next check like any dead one. Under "forkserver" the
    parent is the fork server, which exits with the trainer (``parent_pid`` None: not checked).
    Elsewhere the workers stop when the pool is closed, as before.
    """
    if _PRCTL is None or _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if parent_pid is not None and os.getppid() != parent_pid:  # it died before the prctl
        os._exit(1)


def _worker_main(conn: Connection, check: Callable[[str, str], bool], parent_pid: Optional[int]) -> None:
    """A worker's loop: receive (index, answer, gold), send back (index, outcome); None stops it."""
    _die_with(parent_pid)
    # Ctrl-C belongs to the trainer, which closes the pool; a worker must not die half-way first
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # math-verify warns once per process that its own time limits are off; ours replace them
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        index, answer, gold = task
        try:
            outcome = "verified" if check(answer, gold) else "wrong"
        except Exception:
            outcome = "error"
        conn.send((index, outcome))


class _Worker:
    """One worker process, its end of the pipe and the task it runs (index and deadline)."""

    def __init__(self, ctx, check: Callable[[str, str], bool]) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        parent = None if ctx.get_start_method() == "forkserver" else os.getpid()
        self.proc = ctx.Process(target=_worker_main, args=(child, check, parent), daemon=True)
        self.proc.start()
        child.close()
        self.task: Optional[int] = None
        self.deadline = 0.0

    def stop(self, kill: bool) -> None:
        if not kill:
            try:
                self.conn.send(None)
            except (OSError, ValueError):
                kill = True
        if not kill:
            self.proc.join(timeout=1.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def _stop_all(workers: list[_Worker]) -> None:
    for w in workers:
        w.stop(kill=w.task is not None)
    workers.clear()


class RewardPool:
    """Scores responses against ground truths; math-verify checks run in worker processes, each
    under a time limit (see the module docstring). The workers start on first use, are reused across
    calls, and stop on ``close()`` (also at exit, or as a context manager).

    Args:
        num_workers: worker processes (checks run in parallel across them).
        timeout_s: the time limit of one check, in seconds.
        check: ``check(answer, gold) -> bool``, run in the workers; a module-level function, so
            that any start method can hand it to them. Default ``math_verify_check``.
        start_method: multiprocessing start method. "fork" (default) starts a worker in
            milliseconds with this module already imported, so a worker killed at its time limit
            is replaced at once; the workers only run pure-Python checks and pipe I/O, never the
            trainer's threads, OpenMP or CUDA, which is what makes forking a threaded trainer safe
            here (as for PyTorch's DataLoader workers). "forkserver" and "spawn" also work, but
            start each worker by re-importing the main module (seconds for a trainer).
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        check: Callable[[str, str], bool] = math_verify_check,
        start_method: str = "fork",
    ) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
        if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not 0 < timeout_s < math.inf:
            raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s!r}")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.check = check
        self._ctx = mp.get_context(start_method)
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (idempotent); a later ``score`` starts new ones."""
        _stop_all(self._workers)

    def score(self, responses: Sequence[str], ground_truths: Sequence[str]) -> Scores:
        """Rewards of ``responses[i]`` against ``ground_truths[i]``.

        Args:
            responses: N decoded responses; ground_truths: N answer strings.
        Returns:
            Scores with rewards float32 [N] and one outcome per response.
        """
        if len(responses) != len(ground_truths):
            raise ValueError(f"got {len(responses)} responses but {len(ground_truths)} ground truths")
        outcomes: list[Optional[str]] = []
        pending: deque[tuple[int, str, str]] = deque()
        for i, (response, truth) in enumerate(zip(responses, ground_truths)):
            if not isinstance(response, str) or not isinstance(truth, str):
                raise TypeError(
                    f"response and ground truth {i} must be str, got {type(response).__name__} and "
                    f"{type(truth).__name__}"
                )
            outcome, answer, gold = quick_check(response, truth)
            outcomes.append(outcome)
            if outcome is None:
                pending.append((i, answer, gold))
        if pending:
            try:
                self._run(pending, outcomes)
            except BaseException:
                # interrupted (Ctrl-C, say): a busy worker's late answer must not land in the next
                # call's outcomes, so every worker goes; the next call starts new ones
                self.close()
                raise
        rewards = np.array([o in CORRECT for o in outcomes], dtype=np.float32)
        return Scores(rewards=rewards, outcomes=tuple(outcomes))

    def _run(self, pending: deque, outcomes: list) -> None:
        """Run the pending checks on the workers until each has an outcome."""
        while len(self._workers) < min(self.num_workers, len(pending)):
            self._workers.append(_Worker(self._ctx, self.check))
        while True:
            for k, w in enumerate(self._workers):
                if w.task is None and pending:
                    self._assign(k, pending.popleft())
            busy = [w for w in self._workers if w.task is not None]
            if not busy:
                return
            ready = wait([w.conn for w in busy], max(0.0, min(w.deadline for w in busy) - time.monotonic()))
            for k, w in enumerate(self._workers):
                if w.task is None:
                    continue
                if w.conn in ready:
                    try:
                        index, outcome = w.conn.recv()
                        w.task = None
                    except (EOFError, OSError):
                        index, outcome = w.task, "crash"
                        self._replace(k)
                    outcomes[index] = outcome
                elif time.monotonic() >= w.deadline:
                    outcomes[w.task] = "timeout"
                    self._replace(k)

    def _assign(self, k: int, task: tuple[int, str, str]) -> None:
        """Give ``task`` to worker ``k``, replacing it first if it died while idle."""
        for _ in range(2):
            w = self._workers[k]
            try:
                w.conn.send(task)
            except (OSError, ValueError):
                self._replace(k)
                continue
            w.task, w.deadline = task[0], time.monotonic() + self.timeout_s
            return
        raise RuntimeError("reward worker processes die as they start; see their stderr")

    def _replace(self, k: int) -> None:
        """Kill worker ``k`` and start a fresh one in its place."""
        self._workers[k].stop(kill=True)
        self._workers[k] = _Worker(self._ctx, self.check)
