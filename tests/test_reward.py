"""The reward: boxed-answer extraction, normalised matching, math-verify in a time-limited process pool."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from hpt_fast.reward import OUTCOMES, RewardPool, extract_boxed, normalize_answer, quick_check

# a power tower sympy evaluates as an exact integer: verify() never returns, and SIGALRM cannot stop it
PATHOLOGICAL = r"\boxed{9^{9^{9^{9}}}}"


@pytest.fixture(scope="module")
def pool():
    with RewardPool(num_workers=2, timeout_s=5.0) as p:
        yield p


@pytest.mark.parametrize("text, answer", [
    (r"so \boxed{42}", "42"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\sqrt{\frac{a^{2}}{b_{1}}}} done", r"\sqrt{\frac{a^{2}}{b_{1}}}"),
    (r"first \boxed{1} then \boxed{2}", "2"),
    (r"\boxed {3}", "3"),
    (r"\boxed{ 7 }", "7"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces are not delimiters
    (r"\boxed{\{1,2}", r"\{1,2"),
    (r"the answer is $\boxed 5$.", "5"),  # the bare form ends at $ or whitespace
    (r"\boxed{1} and \boxedfoo{2}", "1"),  # \boxedfoo is another macro
])
def test_extract_boxed(text, answer):
    assert extract_boxed(text) == answer


@pytest.mark.parametrize("text", [
    "no box here", "", r"\boxed{}", r"\boxed", r"\boxed{1} then a truncated \boxed{2", r"\boxed{\frac{1}{2}",
    r"\boxed42", r"\boxed(3)",  # no brace and no space: not LaTeX's one-token argument
])
def test_extract_boxed_none(text):
    assert extract_boxed(text) is None


def test_huge_input_is_linear():
    filler = "x = y + 1, " * 500_000  # 5.5 MB
    nested = "{" * 20_000 + "7" + "}" * 20_000
    start = time.perf_counter()
    assert extract_boxed(filler + r"\boxed{12}") == "12"
    assert extract_boxed(r"\boxed{" + nested + "}" + filler) == nested
    assert extract_boxed(filler + r"\boxed{" + filler) is None
    assert time.perf_counter() - start < 5.0


def test_normalize_answer():
    assert normalize_answer(r"$\dfrac{1}{2}$") == normalize_answer(r"\frac{1}{2}") == r"\frac{1}{2}"
    assert normalize_answer(r"90^\circ") == "90"
    assert normalize_answer(r"\text{(B)}") == "(B)"
    assert normalize_answer(r"\left( 1, 2 \right).") == "(1,2)"
    assert normalize_answer("50\\%") == "50"
    assert normalize_answer("X") != normalize_answer("x")
    # sizing macros go as whole names only: arrows keep their meaning
    assert normalize_answer(r"\leftarrow") != normalize_answer("arrow")
    assert normalize_answer(r"A \rightarrow B") == r"A\rightarrowB"
    assert normalize_answer(r"\displaystyle \frac{1}{2}") == r"\frac{1}{2}"
    # units and spacing are found with spaces inside them too
    assert normalize_answer(r"3^{ \circ }") == normalize_answer(r"3 ^ \circ") == "3"
    assert normalize_answer(r"1\, 000") == "1000"


@pytest.mark.parametrize("response, truth, outcome", [
    (r"\boxed{12}", "12", "match"),
    (r"\boxed{\dfrac{1}{2}}", r"$\frac{1}{2}$", "match"),
    (r"\boxed{007}", "7", "integer"),
    (r"\boxed{-0}", "0", "integer"),
    (r"\boxed{8}", "7", "wrong"),
    (r"no answer", "7", "no_answer"),
    (r"\boxed{0.5}", r"\frac{1}{2}", None),  # only math-verify can tell
    (r"\boxed{5}", r"the answer is \boxed{5}", "match"),  # a boxed ground truth is unwrapped
    # math-verify reads 100% as 100 and as 1: a dropped percent sign leaves a mismatch to it
    (r"\boxed{1}", r"100\%", None),
    (r"\boxed{100\%}", "1", None),
    (r"\boxed{100\%}", "100", "match"),
    (r"\boxed{3\%}", "4", None),
    ("\\boxed{90\u00b0}", r"90^\circ", "match"),  # the degree sign, which math-verify does not read, as ^\circ
])
def test_quick_check(response, truth, outcome):
    assert quick_check(response, truth)[0] == outcome


def test_pool_scores_a_batch(pool):
    responses = [r"\boxed{12}", r"\boxed{0.5}", r"\boxed{x^2+2x+1}", r"\boxed{x^2+1}", "none", r"\boxed{8}",
                 r"\boxed{007}"]
    truths = ["12", r"\frac{1}{2}", "(x+1)^2", "(x+1)^2", "3", "7", "7"]
    scores = pool.score(responses, truths)
    assert scores.outcomes == ("match", "verified", "verified", "wrong", "no_answer", "wrong", "integer")
    assert pool.score([r"\boxed{1}", r"\boxed{2}"], [r"100\%", r"100\%"]).outcomes == ("verified", "wrong")
    assert scores.rewards.dtype == np.float32
    # every outcome scores as its name says: the integer shortcut is a correct answer
    np.testing.assert_array_equal(scores.rewards, [1, 1, 1, 0, 0, 0, 1])
    counts = scores.counts()
    assert set(counts) == set(OUTCOMES) and counts["verified"] == 2 and counts["integer"] == 1 and counts["timeout"] == 0


def test_empty_batch(pool):
    scores = pool.score([], [])
    assert scores.rewards.shape == (0,) and scores.outcomes == ()


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_every_start_method_scores(method):
    """Workers started by fork, spawn or a fork server all check answers (a fork server's worker
    is not the trainer's child, which the parent-death check must allow for)."""
    with RewardPool(num_workers=2, start_method=method) as p:
        assert p.score([r"\boxed{\frac{1}{2}}", r"\boxed{0.3}"], ["0.5", r"\frac13"]).outcomes == ("verified", "wrong")


def test_pathological_answer_times_out_and_the_pool_recovers():
    with RewardPool(num_workers=2, timeout_s=1.0) as p:
        start = time.perf_counter()
        scores = p.score([PATHOLOGICAL, r"\boxed{0.25}", PATHOLOGICAL], ["1", r"\frac14", "2"])
        elapsed = time.perf_counter() - start
        assert scores.outcomes == ("timeout", "verified", "timeout")
        assert scores.counts()["timeout"] == 2 and scores.undecided == 2
        assert elapsed < 4.0, f"two timed-out checks of 1 s on two workers took {elapsed:.1f} s"
        # the killed workers were replaced
        assert p.score([r"\boxed{0.5}"], [r"\frac12"]).outcomes == ("verified",)


def crash_check(answer: str, gold: str) -> bool:
    """A check that kills its worker process on "crash" (a segfault in a C extension, say)."""
    if answer == "crash":
        os._exit(3)
    return answer == "ok"


def raising_check(answer: str, gold: str) -> bool:
    raise RuntimeError("parser bug")


def test_crashed_worker_scores_zero_and_is_replaced():
    with RewardPool(num_workers=1, timeout_s=5.0, check=crash_check) as p:
        scores = p.score([r"\boxed{crash}", r"\boxed{ok}", r"\boxed{crash}"], ["b", "fine", "c"])
        assert scores.outcomes == ("crash", "verified", "crash")
        np.testing.assert_array_equal(scores.rewards, [0, 1, 0])


def slow_check(answer: str, gold: str) -> bool:
    if answer == "slow":
        time.sleep(1.0)
    return answer.upper() == gold


def test_an_interrupted_call_leaves_no_answer_for_the_next():
    """Ctrl-C in the middle of a call: the busy worker's late answer (and its deadline) must not
    land in the next call's outcomes, which scored an exact match 0 or raised IndexError."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    with RewardPool(num_workers=1, timeout_s=2.0, check=slow_check) as p:
        previous = signal.signal(signal.SIGALRM, interrupt)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(KeyboardInterrupt):
                p.score([r"\boxed{slow}"], ["x"])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        time.sleep(1.2)  # the interrupted check would have answered by now
        assert p.score([r"\boxed{a}", r"\boxed{b}", r"\boxed{slow}"], ["a", "c", "SLOW"]).outcomes == (
            "match", "wrong", "verified")


def test_exception_in_check_scores_zero():
    with RewardPool(num_workers=1, check=raising_check) as p:
        assert p.score([r"\boxed{a}"], ["b"]).outcomes == ("error",)


_ORPHAN_SCRIPT = """
import os, signal, sys, time
from hpt_fast.reward import RewardPool

def stuck_check(answer, gold):
    if answer == "stuck":
        time.sleep(600)
    return answer == gold

pool = RewardPool(num_workers=2, timeout_s=600, check=stuck_check)
assert pool.score([r"\\boxed{b}", r"\\boxed{d}"], ["c", "e"]).outcomes == ("wrong", "wrong")  # starts 2
pool._assign(0, (0, "stuck", "x"))  # worker 0 starts a check that never ends; no waiting for it
print(" ".join(str(w.proc.pid) for w in pool._workers), flush=True)
time.sleep(0.5)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has exited; a container's PID 1 may never reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_workers_die_with_a_killed_trainer(tmp_path):
    """A trainer killed by SIGKILL takes its reward workers with it, an idle one and one stuck
    in a check, instead of leaving them running (holding its stdout) forever."""
    script, out = tmp_path / "orphan.py", tmp_path / "pids.txt"
    script.write_text(_ORPHAN_SCRIPT)
    with open(out, "w") as f, open(tmp_path / "err.txt", "w") as err:
        # files, not pipes: a surviving worker would hold a pipe open and the run would not end
        code = subprocess.run([sys.executable, str(script)], stdout=f, stderr=err, timeout=120)
    assert code.returncode == -signal.SIGKILL, (tmp_path / "err.txt").read_text()
    pids = [int(p) for p in out.read_text().split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    try:
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), f"workers {pids} outlived their killed parent"
    finally:
        for p in filter(_alive, pids):
            os.kill(p, signal.SIGKILL)


def test_close_is_idempotent_and_the_pool_restarts():
    p = RewardPool(num_workers=1)
    assert p.score([r"\boxed{0.5}"], [r"\frac12"]).outcomes == ("verified",)
    procs = [w.proc for w in p._workers]
    p.close()
    p.close()
    assert all(not proc.is_alive() for proc in procs)
    assert p.score([r"\boxed{0.5}"], [r"\frac12"]).outcomes == ("verified",)
    p.close()


def test_bad_arguments():
    with pytest.raises(ValueError, match="2 responses but 1"):
        RewardPool().score(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="must be str"):
        RewardPool().score([b"bytes"], ["a"])
    with pytest.raises(ValueError, match="num_workers"):
        RewardPool(num_workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        RewardPool(timeout_s=0)
    with pytest.raises(ValueError, match="timeout_s must be a finite number > 0, got inf"):
        RewardPool(timeout_s=float("inf"))
