"""The JSON depth scan the ingress runs on every untrusted body before parsing it: property tests against
``json.loads`` and a byte-at-a-time reference of its state machine, and linear time up to the 1 MiB body limit
(adversarial and random bodies), the unterminated escaped-quote body that a regex string skip took seconds on."""

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corea.serve.openai_schema import ApiError, json_depth, parse_chat_request


def parsed_depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(parsed_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(parsed_depth, value), default=0)
    return 0


def reference_depth(raw: bytes) -> int:
    """The specification, one byte at a time: outside a string, in a string, after a backslash in a string."""
    depth = deepest = 0
    state = "out"
    for c in raw:
        if state == "escape":
            state = "string"
        elif state == "string":
            state = "escape" if c == 0x5C else "out" if c == 0x22 else "string"
        elif c == 0x22:
            state = "string"
        elif c in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in b"]}":
            depth -= 1
    return deepest


texts = st.text(alphabet=st.sampled_from('ab"\\[]{}\n é\u2028\U0001f600'), max_size=12)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
                           max_leaves=40)


@settings(max_examples=300, deadline=None)
@given(json_values, st.booleans(), st.sampled_from([None, 0, 2]))
def test_depth_scan_agrees_with_json_loads_on_valid_json(value, ascii_only, indent):
    raw = json.dumps(value, ensure_ascii=ascii_only, indent=indent).encode()
    assert json_depth(raw) == parsed_depth(json.loads(raw)) == reference_depth(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.lists(st.sampled_from([b'"', b"\\", b"[", b"]", b"{", b"}", b"a", b"\\\""]),
                                          max_size=80).map(b"".join))
def test_depth_scan_follows_the_state_machine_on_any_bytes(raw):
    assert json_depth(raw) == reference_depth(raw)
    limit = reference_depth(raw) // 2
    assert json_depth(raw, limit) == (reference_depth(raw) if reference_depth(raw) <= limit else limit + 1)


def best_of(fn, repeats=3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


ADVERSARIAL = [b'\\"', b'"', b"\\", b"[", b"[]", b'"",', b'{"a":', b'"\\\\', b"\\u00", b'["\\', b" "]


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(ADVERSARIAL) | st.binary(min_size=1, max_size=8), st.sampled_from([b"", b'{"x":["', b'"']))
def test_depth_scan_is_linear_up_to_the_body_limit(unit, prefix):
    def body(size: int) -> bytes:
        return prefix + unit * ((size - len(prefix)) // len(unit))

    small, large = body(64 << 10), body(512 << 10)
    t_small, t_large = best_of(lambda: json_depth(small)), best_of(lambda: json_depth(large))
    assert t_large < 0.05 + 24 * t_small, (unit, prefix, t_small, t_large)  # linear: 8x; quadratic: 64x
    assert best_of(lambda: json_depth(body(1 << 20)), 1) < 5.0


def test_unterminated_escaped_quotes_are_refused_fast():
    """The body that took 3.6 s (32 KB) and 17.4 s (64 KB) in the ingress event loop with a regex string skip."""
    for pairs in (32000, 64000, 512000):
        raw = b'{"model":"corea-cascade","messages":[],"x":["' + b'\\"' * pairs
        start = time.perf_counter()
        with pytest.raises(ApiError, match="not valid JSON"):
            parse_chat_request(raw, max_messages=8)
        assert time.perf_counter() - start < (0.5 if pairs <= 64000 else 3.0)


def test_depth_limit_stops_the_scan_early():
    raw = b"[" * (1 << 20)
    assert best_of(lambda: json_depth(raw, 32), 1) < 0.01 and json_depth(raw, 32) == 33
    with pytest.raises(ApiError, match="deeper than 32"):
        parse_chat_request(raw, max_messages=8)
