"""Regular expressions that read request bodies, headers or model output, checked for catastrophic backtracking
with regexploit: every pattern literal in the modules' source (regexploit's own AST scan, as ``regexploit-py``
runs it) and every compiled pattern the imported modules hold (patterns built with f-strings included)."""

import ast
import importlib
import pkgutil
import re
import warnings
from pathlib import Path

import pytest

regexploit = pytest.importorskip("regexploit")
from regexploit.ast.sre import SreOpParser  # noqa: E402
from regexploit.languages.python_node_visitor import PythonNodeVisitor  # noqa: E402
from regexploit.redos import find  # noqa: E402



def _modules(package: str) -> set[str]:
    module = importlib.import_module(package)
    subs = {f"{package}.{m.name}" for m in pkgutil.iter_modules(getattr(module, "__path__", []))}
    return {package, *subs}


def _scanned() -> list[str]:
    """corea.protocol, the grading modules (``corea.grading*``, ``corea.answer_checks``, or the ``corea.grading``
    package), corea.serve and corea.integrations."""
    names = {"corea.protocol"} | _modules("corea.serve") | _modules("corea.integrations")
    for m in pkgutil.iter_modules(importlib.import_module("corea").__path__):
        if m.name.startswith("grading") or m.name == "answer_checks":
            names |= _modules(f"corea.{m.name}")
    return sorted(names)


MODULES = _scanned()


def _compiled(value, seen: set[int], depth: int = 0):
    """Compiled patterns in a module global: directly, in containers, or as class attributes."""
    if id(value) in seen or depth > 3:
        return
    seen.add(id(value))
    if isinstance(value, re.Pattern):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _compiled(v, seen, depth + 1)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            yield from _compiled(v, seen, depth + 1)
    elif isinstance(value, type):
        for v in vars(value).values():
            yield from _compiled(v, seen, depth + 1)


def patterns(module_name: str) -> list[tuple[str, str, int]]:
    """(where, pattern, flags) for every regular expression of ``module_name``."""
    module = importlib.import_module(module_name)
    if getattr(module, "__file__", None) is None:
        return []
    source = Path(module.__file__)
    visitor = PythonNodeVisitor()
    visitor.visit(ast.parse(source.read_bytes()))
    out = [(f"{source.name}:{r.lineno}", r.pattern, r.flags) for r in visitor.patterns]
    seen: set[int] = set()
    for name, value in vars(module).items():
        if isinstance(value, type) and value.__module__ != module_name:
            continue  # a class imported from elsewhere: checked with its own module
        for compiled in _compiled(value, seen):
            text = compiled.pattern.decode("latin-1") if isinstance(compiled.pattern, bytes) else compiled.pattern
            out.append((f"{module_name}.{name}", text, compiled.flags & ~re.UNICODE))
    return out


def findings(pattern: str, flags: int) -> list[str]:
    try:
        parsed = SreOpParser().parse_sre(pattern, flags)
    except re.error:
        return []  # a string constant that is not a regular expression
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [f"starriness {r.starriness}, e.g. {r.example()}" for r in find(parsed)]


def test_the_checker_finds_known_redos():
    assert findings(r"(\w+\s?)*$", 0) and findings(r"a*a*a*b", 0)
    assert not findings(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # quadratic only by search restarts: not seen


@pytest.mark.parametrize("module_name", MODULES)
def test_no_pattern_backtracks_catastrophically(module_name):
    found = patterns(module_name)
    report = [f"{where}: {pattern!r}: {f}" for where, pattern, flags in found for f in findings(pattern, flags)]
    assert not report, "\n".join(report)


def test_the_modules_named_are_scanned():
    assert {"corea.protocol", "corea.grading", "corea.serve.openai_schema",
            "corea.integrations.group_reward_server"} <= set(MODULES)
    assert any("answer" in m for m in MODULES)  # the answer checks, wherever they live
    assert any("_TOKENS" in where for where, _, _ in patterns("corea.protocol"))  # compiled patterns are read
