"""Answer grading: is a response correct against the gold answer?

Kinds: ``"math"`` and ``"choice"``.

Math: the verdict is math-verify's on the WHOLE response, ``verify(parse(gold_text), parse(response))`` with
its default extraction (boxed answers first, then "final answer"/"answer:" anchors, then any LaTeX environment
and any plain number; several boxes close together are read as one set) and ``gold_text =
math_gold_text(gold)``: the gold as written, as plain math-verify reads it, unless math-verify would find
nothing in it or only a fragment of a bare expression (``3\\sqrt{2}`` as 3), then ``\\boxed{gold}``. The
last-box answer of ``corea.protocol.parse_response`` is what the cascade shows and what the format reward
checks; correctness does not need a box. Accelerations, none of
which changes math-verify's verdict:

1. Fast path, in-process (``corea.grading.fast``): math-verify's own regexes find the match it would try
   first; when that match and the gold are plain numbers, their parse is built without the LaTeX parser and
   math-verify's ``verify`` runs on them in-process. No match at all is False, as in math-verify.
2. Pre-screen (``corea.grading.answers.prescreen``): an expression math-verify would parse that could make
   sympy hang (huge exponents, factorials or expansions, deep nesting, integrals, sums, products or limits
   with large parameters, very long text) rejects the response (False) without being parsed; so does a
   response over ``MAX_RESPONSE_CHARS``. In the pool the same screen guards every expression math-verify
   parses, so a pathological one later in the text is rejected too. This is the only departure from plain
   math-verify: it would hang, or time out and return False.
3. Worker pool: math-verify itself in ``Grader.processes`` worker processes, each gold parsed once per
   worker. Each response has a deadline of ``timeout_s`` seconds (an interval timer inside the worker; a miss
   is False, as math-verify's own timeout would give); a worker that does not answer within ``timeout_s +
   KILL_GRACE_S`` (stuck in C code) is killed and replaced (``corea.grading.pool``). Evaluation uses
   ``TIMEOUT_S`` (5 s, math-verify's default); training rewards use ``reward.grading_timeout_s`` (1 s).
   Workers parse LaTeX with ANTLR's two-stage strategy (SLL, then LL on an error: the same trees), and a large
   batch's screening overlaps the pool's work on its earlier chunks. Grading works from any thread, asyncio
   loop, Ray actor or Serve replica. Model output is only read by math-verify's parser, never run as code.

Choice: the letter of ``corea.grading.answers.extract_choice`` (boxed letter, "answer is X" in the languages of
lighteval's literals, "answer: X", a leading "X.", the last standalone letter) against the gold's letter
(``choice_gold_letter``: ``X``, ``(X) text``, or the letter a free-text gold states; none: every response False).
"""

from __future__ import annotations

import atexit
import math
import os
import threading
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from corea.grading import fast
from corea.grading.answers import (  # noqa: F401 (the limits and checks are part of this module's API)
    KINDS,
    MAX_CALCULUS_LOG10,
    MAX_EXPONENT_LOG10,
    MAX_FACTORIAL_LOG10,
    MAX_MONOMIALS_LOG10,
    MAX_NESTING,
    MAX_RESPONSE_CHARS,
    _clean,
    _limits,
    choice_gold_letter,
    extract_choice,
    math_gold_text,
    normalize_choice_gold,
    prescreen,
)
from corea.grading.pool import Job, WorkerPool
from corea.grading.worker import MEMORY_LIMIT_MB
from corea.protocol import parse_response  # noqa: F401 (re-exported for callers that show the last box)

TIMEOUT_S = 5.0  #: default per-response deadline in a worker, seconds (math-verify's own default timeout)
_CHUNK_MAX = 64  # responses sent to a worker at once (verdicts still come back one by one)
_STREAM_GROUPS = 32  # groups screened in-process before their pool work starts (see grade_groups)
_GOLD_CACHE = 4096  # prepared golds kept in-process
_DECIDED_CACHE = 65536  # verdicts of (gold, first match) pairs kept in-process


class _Gold:
    """A math gold prepared once: the text math-verify parses, its fast-path parse (None: pool), its limits."""

    __slots__ = ("gold", "text", "parsed", "limits")

    def __init__(self, gold: str):
        self.gold, self.text = gold, math_gold_text(gold)
        self.limits = _limits(gold)
        try:
            self.parsed = fast.fast_parse(self.text)
        except Exception:
            self.parsed = None


class Grader:
    """A pool of ``processes`` math-verify workers, started on first need; every method is thread-safe.

    ``stats`` counts responses by path: ``fast`` (in-process), ``screened`` (rejected by the pre-screen in
    this process), ``cached`` (the verdict of an earlier response with the same first match, once a worker
    found that match decides), ``pool`` (sent to a worker), ``rejected``/``deadline`` (in a worker), ``killed``
    workers."""

    def __init__(self, processes: int | None = None, timeout_s: float = TIMEOUT_S,
                 memory_limit_mb: int | None = MEMORY_LIMIT_MB):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.processes = max(1, int(processes or os.cpu_count() or 1))
        self.timeout_s, self.memory_limit_mb, self.pid = float(timeout_s), memory_limit_mb, os.getpid()
        self._lock = threading.Lock()
        self._workers = WorkerPool(self.processes, self.timeout_s, memory_limit_mb, self._count)
        self._golds: OrderedDict[str, _Gold] = OrderedDict()
        self._decided: OrderedDict[tuple, bool] = OrderedDict()  # (gold, first match) -> verdict
        self.stats = dict.fromkeys(("fast", "screened", "cached", "pool", "rejected", "deadline", "killed"), 0)

    def grade(self, response: str | bytes | None, gold: str, kind: str = "math") -> bool:
        """Grade a whole response against ``gold``."""
        return self.grade_groups([([response], gold, kind)])[0][0]

    def grade_answer(self, answer: str | bytes | None, gold: str, kind: str = "math") -> bool:
        """Grade a bare answer: a math answer is read like a gold (``math_gold_text``)."""
        answer = _clean(answer)
        if kind == "math" and answer:
            answer = math_gold_text(answer)
        return self.grade(answer, gold, kind)

    def grade_groups(self, groups: Sequence[tuple[Sequence[str | bytes | None], str, str]]) -> list[list[bool]]:
        """Verdicts for groups of (responses, gold, kind): fast path, pre-screen, then the pool for the rest.

        A large batch is screened in chunks of ``_STREAM_GROUPS`` groups, and a chunk's pool work starts while
        the next chunk is screened, so this process's screening and the workers overlap."""
        groups = list(groups)
        if len(groups) <= _STREAM_GROUPS:
            return self._resolve(*self._screen(groups))
        verdicts: list[list[bool]] = []
        with ThreadPoolExecutor(2, thread_name_prefix="corea-grading") as chunks:
            futures = [chunks.submit(self._resolve, *self._screen(groups[i : i + _STREAM_GROUPS]))
                       for i in range(0, len(groups), _STREAM_GROUPS)]
            for future in futures:
                verdicts += future.result()
        return verdicts

    def _screen(self, groups) -> tuple[list[list[bool]], dict, dict]:
        """In-process verdicts (False where the pool decides), the pool's responses by (gold, response) with
        their positions, and those responses by (gold, first match)."""
        verdicts: list[list[bool]] = []
        pending: dict[tuple[str, str], list[tuple[int, int]]] = {}  # distinct (gold, response) -> positions
        by_key: dict[tuple, list[str]] = {}  # (gold, first match) -> its responses
        for gi, (responses, gold, kind) in enumerate(groups):
            if kind not in KINDS:
                raise ValueError(f"unknown answer kind {kind!r}; choose from {KINDS}")
            if kind == "choice":
                letter = choice_gold_letter(gold)
                verdicts.append([letter is not None and extract_choice(r) == letter for r in responses])
                continue
            prepared, row = self._gold(_clean(gold) or ""), []
            for ri, response in enumerate(map(_clean, responses)):
                verdict, key = self._in_process(response, prepared) if response else (False, None)
                if verdict is None:
                    if (response_key := (prepared.gold, response)) not in pending:
                        group_key = ("match", prepared.gold, key) if key else ("response",) + response_key
                        by_key.setdefault(group_key, []).append(response)
                    pending.setdefault(response_key, []).append((gi, ri))
                row.append(bool(verdict))
            verdicts.append(row)
        return verdicts, pending, by_key

    def _resolve(self, verdicts: list[list[bool]], pending: dict, by_key: dict) -> list[list[bool]]:
        """``verdicts`` with the pool's verdicts filled in: first one response per first match; when that match
        decided, the rest of its responses take its verdict, otherwise they go to the pool too."""
        if pending:
            results = self._pool({k: rs[:1] for k, rs in by_key.items()})  # one response per first match
            rest = {}
            for key, responses in by_key.items():
                verdict, decided = results[(key[1], responses[0])]
                if decided and key[0] == "match" and not any(pct for _, pct in key[2][1]):  # decided by the
                    # first match (no percentage, whose conversion could still fail): the same for all of them
                    results.update(((key[1], r), (verdict, True)) for r in responses[1:])
                    self._remember(key[1:], verdict)
                    self._count("cached", len(responses) - 1)
                elif len(responses) > 1:
                    rest[key] = responses[1:]
            results.update(self._pool(rest))
            for key, (verdict, _) in results.items():
                for gi, ri in pending[key]:
                    verdicts[gi][ri] = verdict
        return verdicts

    def _pool(self, by_key: dict[tuple, list[str]]) -> dict[tuple[str, str], tuple[bool, bool]]:
        """(verdict, decided by the first match) of every response in ``by_key``'s values, graded by the workers."""
        by_gold: dict[str, list[str]] = {}
        for key, responses in by_key.items():
            by_gold.setdefault(key[1], []).extend(responses)
        n = sum(len(a) for a in by_gold.values())
        if not n:
            return {}
        self._count("pool", n)
        size = max(1, min(_CHUNK_MAX, math.ceil(n / (2 * self.processes))))
        return self._workers.run(deque(Job(g, a[i : i + size]) for g, a in by_gold.items()
                                       for i in range(0, len(a), size)))

    def _remember(self, key: tuple, verdict: bool) -> None:
        with self._lock:
            self._decided[key] = verdict
            while len(self._decided) > _DECIDED_CACHE:
                self._decided.popitem(last=False)

    def _gold(self, gold: str) -> _Gold:
        with self._lock:
            if (prepared := self._golds.pop(gold, None)) is not None:
                self._golds[gold] = prepared
                return prepared
        prepared = _Gold(gold)
        with self._lock:
            self._golds[gold] = prepared
            while len(self._golds) > _GOLD_CACHE:
                self._golds.popitem(last=False)
        return prepared

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def _in_process(self, response: str, gold: _Gold) -> tuple[bool | None, tuple | None]:
        """(verdict, None) when no worker is needed (fast path, no match, pre-screen, a first match decided
        before); else (None, the first match's key: its kind and the strings math-verify will parse)."""
        if len(response) > MAX_RESPONSE_CHARS:
            self._count("screened")
            return False, None
        try:
            found = fast.first_candidate(response)
            if found is None or gold.parsed == []:  # nothing to compare: math-verify says False
                self._count("fast")
                return False, None
            strings = fast.candidate_strings(*found)
            for text, _ in strings:
                if prescreen(text, gold.gold, gold.limits) is not None:
                    self._count("screened")
                    return False, None
            if gold.parsed is not None and (parsed := fast.fast_parse(response, found, strings)) is not None:
                verdict = fast.verify(gold.parsed, parsed)
                self._count("fast")
                return verdict, None
            key = (type(found[1]).__name__, tuple(strings))
            with self._lock:
                verdict = self._decided.get((gold.gold, key))
            if verdict is not None:
                self._count("cached")
                return verdict, None
            return None, key
        except Exception:  # anything unexpected: math-verify in a worker decides
            return None, None

    def warmup(self) -> None:
        """Start every worker and wait until each has imported and warmed up math-verify."""
        self._workers.warmup()

    def worker_pids(self) -> list[int]:
        return self._workers.pids()

    @property
    def closed(self) -> bool:
        return self._workers.closed

    def close(self) -> None:
        """Stop the workers; a second call does nothing."""
        self._workers.close()

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------- module defaults
_default: Grader | None = None
_default_lock = threading.Lock()


def get_grader() -> Grader:
    """The process-wide grader, created on first use (a forked child gets its own)."""
    global _default
    with _default_lock:
        if _default is None or _default.closed or _default.pid != os.getpid():
            _default = Grader()
        return _default


def configure(**grader_kwargs) -> Grader:
    """Replace the process-wide grader by ``Grader(**grader_kwargs)``, closing the old one; return it."""
    global _default
    with _default_lock:
        old, _default = _default, Grader(**grader_kwargs)
    if old is not None and old.pid == os.getpid():
        old.close()
    return _default


@atexit.register
def _close_default() -> None:
    if _default is not None and _default.pid == os.getpid():
        _default.close()


def grade(response: str | bytes | None, gold: str, kind: str = "math") -> bool:
    """Grade a whole response against ``gold`` (math-verify's verdict; see the module docstring)."""
    return get_grader().grade(response, gold, kind)


def grade_answer(answer: str | bytes | None, gold: str, kind: str = "math") -> bool:
    """Grade a bare answer (read like a gold, ``math_gold_text``) against ``gold``."""
    return get_grader().grade_answer(answer, gold, kind)


def grade_groups(groups: Sequence[tuple[Sequence[str | bytes | None], str, str]]) -> list[list[bool]]:
    """Verdicts for (responses, gold, kind) groups; each gold is prepared once, slow ones run in parallel."""
    return get_grader().grade_groups(groups)
