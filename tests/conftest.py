import importlib.util

import pytest

LIVE_VLLM_MARKS = ("vllm", "vllm_contract")
HAS_VLLM = importlib.util.find_spec("vllm") is not None
# vLLM's classes are imported at module level there; without vLLM the module is not collected at all
collect_ignore = [] if HAS_VLLM else ["test_vllm_contract.py"]


def pytest_collection_modifyitems(config, items):
    """Without vLLM installed, the tests that need it are deselected (not skipped): they run, and are counted, in
    the vLLM environment that `.ci/vllm-live` builds (README, "The real engine on CPU")."""
    if HAS_VLLM:
        return
    deselected = [item for item in items if any(item.get_closest_marker(m) for m in LIVE_VLLM_MARKS)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item not in deselected]
        config._corea_vllm_deselected = len(deselected)


def pytest_terminal_summary(terminalreporter, config):
    n = getattr(config, "_corea_vllm_deselected", 0)
    if n:
        terminalreporter.write_line(f"{n} tests and tests/test_vllm_contract.py need vLLM: they run in the vLLM "
                                    "environment (.ci/vllm-live)")


@pytest.fixture(scope="module", autouse=True)
def _module_environment():
    """In the vLLM environment each test module starts from the process environment as it was: building a vLLM
    engine in this process sets variables (LD_PRELOAD of torch's libgomp, VLLM_WORKER_MULTIPROC_METHOD,
    LOCAL_WORLD_SIZE, ...) that a Ray cluster started later would hand to every worker it spawns."""
    import os

    if not HAS_VLLM:
        yield
        return
    saved = dict(os.environ)
    yield
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Tiny Qwen2 checkpoint folders made once per session: "slm" and "llm" (seed 0), "slm_b" (seed 1)."""
    from corea.models import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny-checkpoints")
    return {
        "slm": make_tiny_checkpoint(root / "slm", "slm", seed=0),
        "llm": make_tiny_checkpoint(root / "llm", "llm", seed=0),
        "slm_b": make_tiny_checkpoint(root / "slm-b", "slm", seed=1),
    }
