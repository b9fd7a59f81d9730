"""Which reward requests form a group: pure bookkeeping for the group-holding reward server (no I/O, no clock).

Rules (``now`` is passed in, in seconds):

- A request is keyed by (prompt, label). The first request of a key opens a group; the next ones join it in
  arrival order until it holds ``n`` members, then it closes (complete) and the key's next request opens a new
  group. A prompt appearing twice in a batch (2n requests) therefore makes two groups of n, in arrival order.
- A group still open ``wait_s`` after its first member arrived closes with what it holds (timed out). Its
  missing slots stay open to stragglers for another ``wait_s``: a straggler is scored with that group (its p
  counts the members already scored and itself), instead of opening a group of its own.
- A request whose (prompt, label, query) matches a member of a closed group is a retry: it gets that member's
  answer (or waits for it while the group is being graded) and joins nothing. Identical texts arriving while
  their group is open are distinct samples and join it. The answers are kept ``cache_ttl_s`` seconds, at most
  ``cache_size`` of them (least recently stored evicted first); keys are SHA-256 digests, not the texts.
- At most ``max_open_groups`` groups are open at once; one more raises ``BookFull`` (the server answers 503,
  which OpenRLHF's client retries).
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

CHAT_TAIL_CHARS = (64, 32)  #: lengths of the prompt's end tried to locate the response in a query not starting with it


class BookFull(RuntimeError):
    """Too many open groups: the request is refused, nothing is lost (the client retries)."""


def split_response(query: str, prompt: str) -> str:
    """The response inside OpenRLHF's query (``decode(prompt tokens + response tokens)``).

    The query normally starts with the prompt; if decoding changed the prompt (or OpenRLHF cut its start to fit
    ``max_len``), the response starts after the first occurrence of the prompt's last 64 (or else 32)
    characters (the end of a chat template); failing that the whole query is the response.
    """
    if query.startswith(prompt):
        return query[len(prompt):]
    for size in CHAT_TAIL_CHARS:
        tail = prompt[-size:]
        if len(tail) == size and (at := query.find(tail)) >= 0:
            return query[at + size:]
    return query


def request_digest(prompt: str, label: str, query: str) -> bytes:
    h = hashlib.sha256()
    for part in (prompt, label, query):
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.digest()


@dataclass
class Group:
    """The requests of one group: the same prompt and label, ``queries`` in arrival order."""

    id: int
    prompt: str
    label: str
    opened_at: float
    queries: list[str] = field(default_factory=list)
    timed_out: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.prompt, self.label)


@dataclass
class Straggler:
    """A late member of a timed-out group: scored together with ``group.queries`` (then appended to them)."""

    group: Group
    query: str


@dataclass(frozen=True)
class Admission:
    """What to do with one request.

    ``kind``: ``"member"`` (slot ``slot`` of ``group``; ``closed`` when it filled the group: grade it now),
    ``"straggler"`` (grade ``straggler``), ``"answered"`` (a retry: ``answer`` is ready),
    ``"grading"`` (a retry of a member whose group is being graded: wait for ``group.id``/``slot``).
    """

    kind: str
    group: Group | None = None
    slot: int = -1
    closed: bool = False
    straggler: Straggler | None = None
    answer: Any = None


@dataclass
class _Partial:
    group: Group
    missing: int
    until: float


class GroupBook:
    """Open groups, timed-out groups still accepting stragglers, and the answers of closed groups."""

    def __init__(self, n: int, wait_s: float, max_open_groups: int = 4096, cache_size: int = 32768,
                 cache_ttl_s: float = 600.0):
        if n < 1 or wait_s <= 0 or max_open_groups < 1 or cache_size < 0 or cache_ttl_s < 0:
            raise ValueError("need n >= 1, wait_s > 0, max_open_groups >= 1, cache_size >= 0, cache_ttl_s >= 0")
        self.n, self.wait_s, self.max_open_groups = n, wait_s, max_open_groups
        self.cache_size, self.cache_ttl_s = cache_size, cache_ttl_s
        self._open: OrderedDict[tuple[str, str], Group] = OrderedDict()  # in opening order
        self._partial: OrderedDict[tuple[str, str], _Partial] = OrderedDict()
        # digest -> (stored_at, ("answer", value) | ("grading", group id, slot))
        self._cache: OrderedDict[bytes, tuple[float, tuple]] = OrderedDict()
        self._ids = itertools.count()

    # ------------------------------------------------------------------------------------------ admission
    def admit(self, prompt: str, label: str, query: str, now: float) -> Admission:
        self._expire(now)
        hit = self._cache.get(request_digest(prompt, label, query))
        if hit is not None:
            entry = hit[1]
            if entry[0] == "answer":
                return Admission("answered", answer=entry[1])
            return Admission("grading", group=self._grading_stub(entry[1]), slot=entry[2])
        key = (prompt, label)
        group = self._open.get(key)
        if group is None:
            partial = self._partial.get(key)
            if partial is not None:
                partial.missing -= 1
                if partial.missing == 0:
                    del self._partial[key]
                return Admission("straggler", straggler=Straggler(partial.group, query))
            if len(self._open) >= self.max_open_groups:
                raise BookFull(f"{len(self._open)} groups are open (max_open_groups); retry later")
            group = self._open[key] = Group(next(self._ids), prompt, label, now)
        group.queries.append(query)
        slot = len(group.queries) - 1
        closed = len(group.queries) == self.n
        if closed:
            del self._open[key]
            self._mark_grading(group)
        return Admission("member", group=group, slot=slot, closed=closed)

    def due(self, now: float) -> list[Group]:
        """Close and return the groups open for ``wait_s`` or longer (timed out, fewer than n members)."""
        out = []
        while self._open:
            key, group = next(iter(self._open.items()))
            if group.opened_at + self.wait_s > now:
                break
            del self._open[key]
            group.timed_out = True
            self._mark_grading(group)
            self._partial[key] = _Partial(group, self.n - len(group.queries), now + self.wait_s)
            while len(self._partial) > self.max_open_groups:
                self._partial.popitem(last=False)
            out.append(group)
        return out

    def next_deadline(self) -> float | None:
        """When the oldest open group times out (None when none is open)."""
        return next(iter(self._open.values())).opened_at + self.wait_s if self._open else None

    # ------------------------------------------------------------------------------------------ answers
    def remember(self, group: Group, queries: list[str], answers: list[Any], now: float) -> None:
        """Store the answers of ``queries`` (members of ``group``) for retries."""
        for query, answer in zip(queries, answers):
            self._store(request_digest(group.prompt, group.label, query), ("answer", answer), now)

    def forget(self, group: Group, queries: list[str]) -> None:
        """Drop the entries of ``queries`` (their grading failed: a retry is graded afresh)."""
        for query in queries:
            self._cache.pop(request_digest(group.prompt, group.label, query), None)

    @property
    def open_groups(self) -> int:
        return len(self._open)

    @property
    def cached(self) -> int:
        return len(self._cache)

    # ------------------------------------------------------------------------------------------ internals
    def _mark_grading(self, group: Group) -> None:
        for slot, query in enumerate(group.queries):
            digest = request_digest(group.prompt, group.label, query)
            if digest not in self._cache:  # identical texts in one group: the first one answers retries
                self._store(digest, ("grading", group.id, slot), group.opened_at)

    @staticmethod
    def _grading_stub(group_id: int) -> Group:
        return Group(group_id, "", "", 0.0)

    def _store(self, digest: bytes, entry: tuple, now: float) -> None:
        if self.cache_size == 0:
            return
        self._cache[digest] = (now, entry)
        self._cache.move_to_end(digest)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _expire(self, now: float) -> None:
        while self._cache:
            stored_at, entry = next(iter(self._cache.values()))
            if stored_at + self.cache_ttl_s > now or entry[0] == "grading":
                break
            self._cache.popitem(last=False)
        while self._partial and next(iter(self._partial.values())).until <= now:
            self._partial.popitem(last=False)
