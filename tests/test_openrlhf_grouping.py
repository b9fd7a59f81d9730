"""Pure grouping rules of the OpenRLHF reward server: arrival order, timeouts, stragglers, retries, bounds."""

import pytest

from corea.integrations.grouping import BookFull, GroupBook, split_response


def _fill(book, prompt, label, queries, now=0.0):
    return [book.admit(prompt, label, q, now) for q in queries]


def test_groups_of_n_in_arrival_order_and_duplicates_split():
    book = GroupBook(n=3, wait_s=10)
    adm = _fill(book, "P", "1", ["a", "b", "c", "d", "e", "f"])
    assert [a.kind for a in adm] == ["member"] * 6
    assert [a.slot for a in adm] == [0, 1, 2, 0, 1, 2]
    assert [a.closed for a in adm] == [False, False, True, False, False, True]
    first, second = adm[2].group, adm[5].group
    assert first.id != second.id and first.queries == ["a", "b", "c"] and second.queries == ["d", "e", "f"]
    # the label is part of the key: the same prompt with another gold is another group
    other = book.admit("P", "2", "a", 0.0)
    assert other.kind == "member" and other.slot == 0 and book.open_groups == 1


def test_identical_texts_in_an_open_group_are_distinct_samples():
    book = GroupBook(n=3, wait_s=10)
    adm = _fill(book, "P", "1", ["same", "same", "same"])
    assert [a.slot for a in adm] == [0, 1, 2] and adm[2].closed


def test_retry_while_grading_then_answered_then_expired():
    book = GroupBook(n=2, wait_s=10, cache_ttl_s=100)
    a, b = _fill(book, "P", "1", ["x", "y"])
    retry = book.admit("P", "1", "y", 1.0)
    assert retry.kind == "grading" and retry.group.id == b.group.id and retry.slot == 1
    book.remember(b.group, ["x", "y"], ["ax", "ay"], now=2.0)
    retry = book.admit("P", "1", "x", 3.0)
    assert retry.kind == "answered" and retry.answer == "ax" and book.open_groups == 0
    late = book.admit("P", "1", "x", 200.0)  # past the TTL: a new sample
    assert late.kind == "member" and late.slot == 0


def test_failed_grading_is_forgotten():
    book = GroupBook(n=1, wait_s=10)
    (a,) = _fill(book, "P", "1", ["x"])
    book.forget(a.group, ["x"])
    assert book.admit("P", "1", "x", 0.0).kind == "member"


def test_timeout_closes_short_groups_and_takes_stragglers():
    book = GroupBook(n=4, wait_s=5)
    _fill(book, "P", "1", ["a", "b"], now=0.0)
    _fill(book, "Q", "1", ["a"], now=3.0)
    assert book.next_deadline() == 5.0
    assert book.due(4.9) == []
    (group,) = book.due(5.0)
    assert group.timed_out and group.queries == ["a", "b"] and book.next_deadline() == 8.0
    s1 = book.admit("P", "1", "c", 6.0)
    s2 = book.admit("P", "1", "d", 6.5)
    assert s1.kind == s2.kind == "straggler" and s1.straggler.group is group
    # two slots were missing: the next request for P opens a new group
    assert book.admit("P", "1", "e", 7.0).kind == "member"
    # stragglers are taken for wait_s after the timeout only
    (q_group,) = book.due(8.0)
    assert book.admit("Q", "1", "z", 13.1).kind == "member"


def test_bounded_open_groups_and_cache():
    book = GroupBook(n=2, wait_s=5, max_open_groups=2, cache_size=3)
    book.admit("P1", "1", "a", 0.0)
    book.admit("P2", "1", "a", 0.0)
    with pytest.raises(BookFull):
        book.admit("P3", "1", "a", 0.0)
    done = book.admit("P1", "1", "b", 0.0)  # completes P1: room for P3 again
    book.remember(done.group, ["a", "b"], [1, 2], 0.0)
    book.admit("P3", "1", "a", 0.0)
    book.admit("P2", "1", "b", 0.0)
    for i in range(5):
        book.admit(f"R{i}", "1", "a", 0.0)
        done = book.admit(f"R{i}", "1", "b", 0.0)
        book.remember(done.group, ["a", "b"], [1, 2], 0.0)
    assert book.cached == 3 and book.open_groups == 1


@pytest.mark.parametrize(
    "query, prompt, response",
    [
        ("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA \\boxed{1}<|im_end|>",
         "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n", "A \\boxed{1}<|im_end|>"),
        # OpenRLHF cut the prompt's start to fit max_len: found by the prompt's tail
        ("of 7 and 5?<|im_end|>\n<|im_start|>assistant\nA",
         "<|im_start|>user\nWhat is the sum of 7 and 5?<|im_end|>\n<|im_start|>assistant\n", "A"),
        ("no prompt here", "something else entirely", "no prompt here"),
    ],
)
def test_split_response(query, prompt, response):
    assert split_response(query, prompt) == response
