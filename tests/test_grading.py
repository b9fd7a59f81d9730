"""Tests of answer grading: public equivalence cases, choices, pathological answers, threads, deadlines."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from corea import grading
from corea.grading import Grader, grade, grade_answer, grade_groups, prescreen

# (gold, answer, expected): a few restated public pairs for the batch and thread tests; the public suite with
# its sources is tests/test_grading_equivalence.py.
EQUIVALENCE_CASES = [
    ("-5", "-5", True), ("7425000", "7,425,000", True), ("1000", "1000.0", True), ("0.4", ".4", True),
    ("10/9", r"\frac{10}{9}", True), ("[0,9)", "[0,1)", False), ("1/3", r"\frac13", True),
    (r"\sqrt{3}", r"\sqrt3", True), ("1/3", r"k = \frac{1}{3}", True), (r"28\%", "28", True), ("0.28", "28", False),
    (r"(3, \frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)", True), ("x > 5", "x < 5", False),
    (r"x \leq 5", r"5 \geq x", True), ("11", "x=11", True), (r"\frac{1}{12}", "0.0833333333333333", True),
    (r"\frac{x+2}{7}", r"\frac{x}{7}+\frac{2}{7}", True), (r"\tan^2(y)+1", r"\sec^2(y)", True),
    ("10", r"\$10", True), (r"\left(x-2\right)\left(x+2\right)", "(x-2)(x+2)", True), ("5", "5.001", False),
    ("x^2+2x+1", "x^3+2x+1", False), ("(r+5)(r+5)", "(r+5)^2", True), (r"\dfrac{1}{e}", r"e^{-1}", True),
    ("18", r"18\text{ dollars}", True), ("18", "19", False), ("Yes", r"\text{Yes}", True), ("2.5", r"\frac{5}{2}", True),
]


def _mv_boxed(gold: str, answer: str) -> bool:
    """Plain math-verify on the two bare strings, each read as corea reads a gold."""
    import math_verify

    from corea.grading.answers import math_gold_text

    return bool(math_verify.verify(*(math_verify.parse(math_gold_text(t)) for t in (gold, answer))))


def test_grade_answer_is_math_verify_on_boxed_strings():
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    ours = [grade_answer(answer, gold) for gold, answer, _ in EQUIVALENCE_CASES]
    assert ours == [_mv_boxed(gold, answer) for gold, answer, _ in EQUIVALENCE_CASES]
    assert sum(o == e for o, (_, _, e) in zip(ours, EQUIVALENCE_CASES)) >= len(EQUIVALENCE_CASES) - 1


def _groups(size: int, n: int) -> list:
    """Groups of ``size`` boxed answers from the cases, each graded against the gold of its first case."""
    cases = EQUIVALENCE_CASES
    return [([f"so \\boxed{{{a}}}" for _, a, _ in cases[i : i + size]], cases[i][0], "math") for i in range(0, n, size)]


def test_grade_groups_matches_single_grading():
    groups = _groups(4, 28)
    batch = grade_groups(groups)
    assert batch == [[grade(r, gold) for r in responses] for responses, gold, _ in groups]


def test_large_batches_are_screened_in_chunks_with_the_same_verdicts(monkeypatch):
    """A batch over ``_STREAM_GROUPS`` groups is screened chunk by chunk while the pool works on earlier chunks:
    same verdicts in the same order, choice groups and invalid kinds included."""
    from corea import grading

    groups = _groups(3, 28)
    groups.insert(4, (["The answer is (B).", "A"], "(B) Bob", "choice"))
    expected = [[grade(r, gold, kind) for r in responses] for responses, gold, kind in groups]
    monkeypatch.setattr(grading, "_STREAM_GROUPS", 2)
    with Grader(processes=2) as grader:
        assert grader.grade_groups(groups) == expected
        with pytest.raises(ValueError, match="unknown answer kind"):
            grader.grade_groups(groups + [(["1"], "1", "unknown")])


def test_whole_responses():
    response = r"Thus the point is $\boxed{\left( 3, \frac{\pi}{2} \right)}$. \confidence{0.9}"
    assert grade(response, r"(3, \frac{\pi}{2})")
    assert grade(r"first \boxed{2}. Checking that again, it fails the second condition, so the value is "
                 r"\boxed{\frac{1}{2}} \confidence{0.4}", "0.5")
    assert not grade(r"first \boxed{2}, no wait: \boxed{\frac{1}{2}}", "0.5")  # close boxes: read as one set
    assert not grade(r"I am not sure. \confidence{0.1}", "18")  # nothing to read
    assert not grade(r"\boxed{}", "18")
    assert not grade_answer(None, "18") and not grade_answer("", "18") and not grade_answer("  ", "18")
    # no box: math-verify's LaTeX and number fallbacks read the answer; several boxes are one set
    assert grade(r"Therefore $x \geq 5$ is the solution.", r"x \geq 5") and grade(r"Answer \( 9 \)", "9")
    assert grade(r"<think>3 or 4?</think> The final answer is 4", "4") and grade("28 percent", r"28\%")
    assert grade(r"\boxed{1},\boxed{2},\boxed{3}", r"\{1,2,3\}") and not grade(r"\boxed{1},\boxed{2}", r"\{1,2,3\}")
    assert grade(r"$$\boxed{k = 45} \quad \text{and} \quad \boxed{n = 2}$$", "k = 45, n = 2")


# --------------------------------------------------------------------------------------- fast path
@pytest.mark.parametrize(
    "gold, answer, expected",
    [
        ("18", "18", True), ("18", r"\$18", True), ("1000", "1,000", True), ("1000", "1{,}000", True),
        ("0.5", r"\frac{1}{2}", True), ("3/4", "0.75", True), (r"-\frac{3}{4}", r"\frac{-3}{4}", True),
        ("10", r"10\%", True), ("0.1", r"10\%", True), ("75", "0.75", False), ("2", "2.000001", False),
        (r"\frac{1}{3}", "0.333333", True), (r"\frac{1}{3}", "0.33", False), ("30", r"30^\circ", True),
        ("5", r"5\,\text{cm}", True), ("7", "07", True), ("No", r"\textbf{No}", True),
        (r"\text{(C)}", "C", True), (r"\text{(C)}", "(D)", False), ("18", "18.", True), ("-7", "-7.0", True),
    ],
)
def test_fast_path_follows_math_verify(gold, answer, expected):
    assert grade_answer(answer, gold) is expected is _mv_boxed(gold, answer)


def test_fast_path_needs_no_worker():
    with Grader(processes=1) as grader:
        responses = [r"so \boxed{18}", "It is 19.", "It costs $18.", r"\boxed{18.0} \confidence{1}", "no number"]
        assert grader.grade_groups([(responses, "18", "math")]) == [[True, False, True, True, False]]
        assert grader.stats["fast"] == 5
        assert grader.grade_answer("B", "B", "choice")
        assert grader.worker_pids() == []  # nothing was started


# ------------------------------------------------------------------------------------------- choice
@pytest.mark.parametrize(
    "answer, expected",
    [
        ("B", True), (r"\boxed{B}", True), ("(B)", True), ("B.", True), (r"\text{B}", True), ("B) text", True),
        ("(B) forty", True), ("B: forty", True), (r"\textbf{(B)}", True), ("$B$", True), ("The answer is B", True),
        ("A", False), ("(C)", False), ("Because", False), ("Bob", False), ("BC", False), ("", False), (None, False),
    ],
)
def test_choice(answer, expected):
    assert grade_answer(answer, "B", "choice") is expected


def test_choice_full_response_and_letters_up_to_j():
    assert grade(r"The best option is \boxed{E} \confidence{0.7}", "E", "choice")
    assert grade_answer("(J)", "J", "choice") and not grade_answer("K", "J", "choice")
    assert grade_answer("C", "(C)", "choice")


def test_bad_kind_and_free_text_choice_golds():
    with pytest.raises(ValueError):
        grade_answer("1", "1", "essay")
    with pytest.raises(ValueError):
        grade_groups([(["1"], "1", "unknown")])
    # a free-text gold is a verdict, never an exception: its letter as a response's is read, or none at all
    assert not grade_answer("A", "bank", "choice") and not grade_answer("B", "bank", "choice")
    assert grade("C", "Alina and the answer is\n(C) Cecile", "choice")
    assert not grade("A", "Alina and the answer is\n(C) Cecile", "choice")


# ------------------------------------------------------------------------------------- pathological
PATHOLOGICAL = [
    "9^{9^{9^{9}}}",
    "(x+1)^{100000}",
    "{" * 10_000 + "1" + "}" * 10_000,
    "7" * 1_000_000,
    b"\xff\xfe\xfd 9^{9^{9^{9}}}",
    "\ud800\udfff 2^{2^{2^{2^{2^{2}}}}}",
    "100000000!",
    "10^{10^{10}}",
    "(a+b+c+d)^{50}",
    "x" * 100_000,
    "(" * 5_000 + ")" * 5_000,
    "2**2**2**2**2**2",
    r"\int_0^{\infty} e^{-x^{1000}} dx",
    r"\sum_{n=1}^{100000} \frac{1}{n^{3}}",
    r"\prod_{k=1}^{5000} \left(1 + \frac{1}{k^2}\right)",
    r"\lim_{n \to \infty} \left(1 + \frac{1}{n}\right)^{n^{500}}",
    r"\int_0^1 \int_0^1 \int_0^1 \int_0^1 x y z w \, dx\, dy\, dz\, dw",
    r"\frac{d^{200}}{dx^{200}} \sin(x^{300})",
]


@pytest.mark.parametrize("answer", PATHOLOGICAL, ids=range(len(PATHOLOGICAL)))
def test_prescreen_rejects_pathological(answer):
    assert prescreen(grading._clean(answer), "x^2 + 1") is not None


def test_prescreen_allows_what_the_gold_itself_needs():
    assert prescreen("2^{100000}", "1") is None  # 1e5 is the limit
    assert prescreen("2^{200000}", "1") is not None
    assert prescreen("2^{200000}", "2^{200000}") is None  # the gold is that large itself
    assert prescreen("(x+1)^{2}", "x^2+2x+1") is None and prescreen("2023!", "2023!") is None
    assert prescreen(r"\sum_{k=1}^{100} k", "5050") is None and prescreen(r"\int_0^1 x^2 dx", "1/3") is None
    assert prescreen(r"\sum_{k=1}^{1000} k", "5050") is not None
    assert prescreen(r"\sum_{k=1}^{1000} k", r"\sum_{k=1}^{1000} k") is None


def _pathological_response(i: int):
    answer = PATHOLOGICAL[i % len(PATHOLOGICAL)]
    if i % 3 == 0:
        return answer  # bare text
    if isinstance(answer, bytes):
        return b"so \\boxed{" + answer + b"} \\confidence{0.9}"
    return ("so \\boxed{" + answer + "} \\confidence{0.9}") if i % 3 == 1 else f"The final answer is ${answer}$."


def test_pathological_answers_from_eight_threads_are_false_and_never_parsed():
    golds = ["2", "x^2 + 1", r"\frac{1}{2}", r"\left( 3, \frac{\pi}{2} \right)"]
    jobs = [(_pathological_response(i), golds[i % len(golds)]) for i in range(200)]
    with Grader(processes=2) as grader, ThreadPoolExecutor(8) as pool:
        verdicts = list(pool.map(lambda job: grader.grade(*job), jobs))
        assert grader.worker_pids() == []  # nothing reached math-verify: rejected in this process
        assert grader.stats["screened"] + grader.stats["fast"] == len(jobs)  # screened, or nothing to read
    assert verdicts == [False] * len(jobs)


def test_a_pathological_expression_later_in_the_text_is_rejected_in_the_worker():
    response = "We find $" + PATHOLOGICAL[0] + r"$ and $\boxed{x^{2} +}$"  # the box does not parse, the tower would
    with Grader(processes=1) as grader:
        assert grader.grade(response, "2") is False
        assert grader.stats["rejected"] == 1 and grader.stats["killed"] == 0


# ---------------------------------------------------------------------------- threads, asyncio, pool
def test_grading_off_the_main_thread():
    out = {}
    thread = threading.Thread(target=lambda: out.update(v=grade_answer("(x+1)^2", "x^2+2x+1")))
    thread.start()
    thread.join(60)
    assert out == {"v": True}


def test_grading_inside_an_asyncio_loop():
    async def main():
        direct = grade_answer(r"\sin^2 x + \cos^2 x", "1")
        calls = [asyncio.to_thread(grade_answer, r"2\sqrt{2}", r"\sqrt{8}") for _ in range(4)]
        threaded = await asyncio.gather(*calls)
        return direct, threaded

    direct, threaded = asyncio.run(main())
    assert direct and threaded == [True] * 4


def test_concurrent_batches_from_threads_agree():
    groups = _groups(5, 25)
    expected = grade_groups(groups)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(grade_groups, [groups] * 4))
    assert results == [expected] * 4


SLOW = r"\int_0^1 \sin(x^{7}) e^{x^{3}} dx"  # passes the pre-screen; sympy tries to integrate it for minutes


@pytest.mark.slow
def test_response_missing_its_deadline_is_false_and_the_worker_goes_on():
    with Grader(processes=1, timeout_s=1.0) as grader:
        grader.warmup()
        before = grader.worker_pids()
        responses = [f"\\boxed{{{a}}}" for a in (SLOW, "2(x+1)", "2x", "x+1+x+1")]
        assert grader.grade_groups([(responses, "2x+2", "math")]) == [[False, True, False, True]]
        assert grader.stats["deadline"] == 1 and grader.worker_pids() == before  # interrupted, not killed


def test_silent_worker_is_killed_and_replaced():
    with Grader(processes=1, timeout_s=0.5) as grader:
        grader.warmup()
        (pid,) = grader.worker_pids()
        os.kill(pid, signal.SIGSTOP)  # stuck: no deadline inside can fire
        responses = [r"\boxed{(x+1)^2}", r"\boxed{x^2+2x+1}"]
        # silent before parsing the gold: the gold is blamed, its responses are False in this call
        assert grader.grade_groups([(responses, "x^2+2x+1", "math")]) == [[False, False]]
        assert grader.stats["killed"] == 1 and grader.worker_pids() != [pid]
        assert grader.grade_groups([(responses, "x^2+2x+1", "math")]) == [[True, True]]  # the replacement works


def test_worker_killed_from_outside_is_replaced():
    with Grader(processes=1) as grader:
        grader.warmup()
        (pid,) = grader.worker_pids()
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        assert grader.grade_answer("(x+1)^2", "x^2+2x+1")
        assert grader.worker_pids() != [pid]


def test_closed_grader_refuses_work_and_default_is_recreated():
    grader = Grader(processes=1)
    grader.close()
    grader.close()
    with pytest.raises(RuntimeError):
        grader.grade_answer("(x+1)^2", "x^2+2x+1")
    assert grader.grade_answer("18", "18")  # the fast path needs no pool
    default = grading.get_grader()
    assert default is grading.get_grader() and not default.closed


def test_choice_golds_are_normalized_at_load_time(tmp_path):
    import json

    from corea.data.loaders import load_qa

    rows = [{"id": "a", "question": "Who?", "choices": ["Peter", "Cecile", "Alina"], "answer": "(C) Alina"},
            {"id": "b", "question": "Who?", "choices": ["Peter", "Cecile", "Alina"], "answer": "B Cecile"},
            {"id": "c", "question": "Who?", "choices": ["Peter", "Cecile", "Alina"], "answer": "a"}]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r.gold for r in load_qa(path)] == ["C", "B", "A"]
    for bad in ("Alina and the answer is\n(C) Alina", "(B) Alina", "D"):
        path.write_text(json.dumps({**rows[0], "answer": bad}) + "\n")
        with pytest.raises(ValueError, match="answer"):
            load_qa(path)


def test_training_rewards_use_the_configured_deadline():
    from corea.train.actors import RewardActor
    from corea.train.config import RewardConfig

    assert RewardConfig().grading_timeout_s == 1.0 < grading.TIMEOUT_S
    with pytest.raises(ValueError):
        RewardConfig(grading_timeout_s=0)
    try:
        actor = RewardActor("l1", None, RewardConfig(grading_timeout_s=0.5).grading_timeout_s, grading_processes=1)
        assert grading.get_grader().timeout_s == 0.5 and grading.get_grader().processes == 1
        deadline = time.monotonic() + 60
        while not grading.get_grader().worker_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(grading.get_grader().worker_pids()) == 1  # started with the actor, before any response
        (rewards,) = actor.score([([r"\boxed{18} \confidence{1}", "19"], "18", "math", None)])
        assert [r["correctness"] for r in rewards] == [1.0, 0.0]
    finally:
        grading.configure()
