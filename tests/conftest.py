import pytest


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
