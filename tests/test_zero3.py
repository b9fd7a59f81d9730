"""ZeRO-3 with two real DeepSpeed ranks on the CPU (gloo, DeepSpeed's CPU accelerator), one process per rank.

Every rank takes part in ``named_full_params``, ``state_dict`` and ``export_hf``; the exported Hugging Face
folder loads with ``from_pretrained`` and equals the unsharded weights, before training (the checkpoint itself)
and after one GRPO update (the same update with ZeRO-0 on the same two ranks). A gather entered by rank 0 alone
blocks until rank 1 enters too: a weight sync that gathers on rank 0 only hangs. The same processes check the
ZeRO-3 loader (built partitioned) and bf16 training (fp32 gradient accumulation, bf16 export).
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

SEQUENCES = 4  # one update: one micro-batch of two sequences per rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sequences():
    from corea.train.sequences import RolloutSequence

    rng = random.Random(0)
    out = []
    for i in range(SEQUENCES):
        prompt = [rng.randrange(3, 200) for _ in range(rng.randrange(3, 7))]
        response = [rng.randrange(3, 200) for _ in range(rng.randrange(2, 6))]
        out.append(RolloutSequence(prompt, response, advantage=1.0 if i % 2 else -1.0))
    return out


def _policy(model_path: str, stage: int, rank: int, world: int, port: int, per_update: int, precision="fp32"):
    os.environ["DS_ACCELERATOR"] = "cpu"
    from corea.train.config import OptimConfig
    from corea.train.policy import Policy

    optim = OptimConfig(micro_batch_size=2, lr=1e-2, kl_coef=0.0, entropy_coef=0.0, zero_stage=stage,
                        precision=precision)
    return Policy(model_path, optim, per_update, rank=rank, world_size=world, master_port=port)


def _zero3_rank(rank: int, model_path: str, out: str, port: int) -> None:
    out_dir = Path(out)
    policy = _policy(model_path, 3, rank, 2, port, SEQUENCES // 2)
    assert policy.zero3
    # partitioned: this rank's own parameter storage is a placeholder, not the full weight
    assert all(p.numel() == 0 for p in policy.engine.module.parameters())

    # a gather entered by rank 0 alone waits for rank 1 (rank-0-only sync = hang); both entering completes it
    torch.distributed.barrier()
    if rank == 0:
        result = {}
        worker = threading.Thread(target=lambda: result.update(state=policy.state_dict()), daemon=True)
        worker.start()
        worker.join(timeout=2.0)
        blocked = worker.is_alive()
        worker.join(timeout=60)
        assert not worker.is_alive()
        torch.save({"blocked": blocked, "state": result["state"]}, out_dir / "state_rank0.pt")
    else:
        time.sleep(6.0)
        assert policy.state_dict() is None

    # every rank iterates the full parameters in lockstep; rank 0 keeps copies
    full = {name: t.clone() for name, t in policy.named_full_params()}
    torch.save(full, out_dir / f"full_rank{rank}.pt")
    assert all(p.numel() == 0 for p in policy.engine.module.parameters())  # re-partitioned after each gather

    exported = policy.export_hf(out_dir / "zero3-step0")
    assert (exported is not None) == (rank == 0)

    # one GRPO update, each rank on its half; then the same update with ZeRO-0 on the same two ranks
    share = _sequences()[rank * 2 : rank * 2 + 2]
    stats = policy.train(share, None)
    assert stats["optimizer_steps"] == 1 and stats["entropy"] > 0  # logged although entropy_coef is 0
    policy.export_hf(out_dir / "zero3-step1")
    reference = _policy(model_path, 0, rank, 2, port, SEQUENCES // 2)
    assert not reference.zero3
    reference.train(share, None)
    reference.export_hf(out_dir / "zero0-step1")

    # the loader under a ZeRO-3 config builds the model partitioned (deepspeed.zero.Init), then forgets the config
    from transformers.integrations import is_deepspeed_zero3_enabled

    from corea.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(model_path, "float32", "cpu", deepspeed_config=policy._ds_config())
    assert all(hasattr(p, "ds_id") and p.numel() == 0 and p.ds_numel > 0 for p in model.parameters())
    assert not is_deepspeed_zero3_enabled()

    # bf16: bf16 weights, gradients accumulated in fp32 by the ZeRO-3 optimizer, bf16 export
    bf16 = _policy(model_path, 3, rank, 2, port, SEQUENCES // 2, precision="bf16")
    assert bf16.engine.get_data_types() == (torch.bfloat16, torch.float32)
    assert bf16.engine.optimizer.gradient_accumulation_dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in bf16.engine.module.parameters())
    bf16.train(share, None)
    bf16.export_hf(out_dir / "zero3-bf16-step1")


def _spawn(fn, nprocs: int, *args, timeout: float = 600.0) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` fresh processes; fail (and end them) past ``timeout`` seconds."""
    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{fn.__name__} did not finish within {timeout:.0f} s")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_zero3_two_ranks_full_params_and_export(tiny_checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    model_path = str(tiny_checkpoints["slm"])
    original = _weights(Path(model_path))
    _spawn(_zero3_rank, 2, model_path, str(tmp_path), _free_port())

    saved = torch.load(tmp_path / "state_rank0.pt")
    assert saved["blocked"], "a ZeRO-3 gather entered by one rank alone should wait for the others"
    assert set(saved["state"]) == set(original)
    for name, tensor in original.items():
        assert torch.equal(saved["state"][name], tensor), name

    for rank in (0, 1):  # every rank saw the full tensors, under the Hugging Face names
        full = torch.load(tmp_path / f"full_rank{rank}.pt")
        assert list(full) == [n for n, _ in AutoModelForCausalLM.from_pretrained(model_path).named_parameters()]
        for name, tensor in original.items():
            assert torch.equal(full[name], tensor), (rank, name)

    step0 = tmp_path / "zero3-step0"
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind
    loaded = AutoModelForCausalLM.from_pretrained(step0)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name

    zero3, zero0 = _weights(tmp_path / "zero3-step1"), _weights(tmp_path / "zero0-step1")
    assert set(zero3) == set(zero0) == set(original)
    changed = [n for n in original if not torch.allclose(zero3[n], original[n], atol=1e-6)]
    assert len(changed) > len(original) // 2  # the update moved the weights
    # Adam's first step moves each weight by ~lr * sign(grad), so rounding noise on a gradient that is ~0
    # flips single elements by up to 2 lr: the k-projection bias has an exactly zero gradient (softmax is
    # invariant to a shift shared by all keys) and is left out; elsewhere all but 0.1% agree to 1e-6.
    for name in original:
        if "k_proj.bias" in name:
            continue
        differ = ((zero3[name] - zero0[name]).abs() > 1e-6).float().mean().item()
        assert differ <= 1e-3, f"{name}: {differ:.2%} of the elements differ between ZeRO-3 and ZeRO-0"

    bf16 = _weights(tmp_path / "zero3-bf16-step1")
    assert set(bf16) == set(original) and all(t.dtype == torch.bfloat16 for t in bf16.values())
    moved = [n for n in original if not torch.equal(bf16[n].float(), original[n].to(torch.bfloat16).float())]
    assert len(moved) > len(original) // 2


@pytest.mark.slow
def test_sft_under_zero3_writes_real_weights(tiny_checkpoints, tmp_path):
    """Two Ray Train workers, ZeRO-3: the saved checkpoint holds the trained full weights (not the empty
    partitioned placeholders each rank holds) and loads with ``from_pretrained``."""
    import ray
    from transformers import AutoModelForCausalLM

    from corea.train.sft import METRICS_FILE, SFTConfig, sft

    model_path = tiny_checkpoints["slm"]
    original = _weights(Path(model_path))
    examples = [{"prompt": f"What is {i} + {i}?", "response": f"\\boxed{{{2 * i}}} \\confidence{{0.9}}"} for i in range(8)]
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        out = sft(str(model_path), examples, tmp_path / "sft-zero3",
                  SFTConfig(epochs=2, batch_size=2, lr=1e-2, lr_schedule="linear", zero_stage=3, workers=2,
                            cpus_per_worker=1))
    finally:
        ray.shutdown()
    saved = _weights(out)
    assert set(saved) == set(original)
    for name, tensor in original.items():
        assert saved[name].shape == tensor.shape, name
    changed = [n for n in original if not torch.allclose(saved[n], original[n], atol=1e-6)]
    assert len(changed) > len(original) // 2
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".*.tmp"))
    history = json.loads((out / METRICS_FILE).read_text())["history"]  # rank 0's per-epoch losses
    assert [h["epoch"] for h in history] == [1, 2] and [h["steps"] for h in history] == [2, 2]
    assert all(h["loss"] > 0 for h in history)
    assert [h["lr"] for h in history] == pytest.approx([5e-3, 0.0])  # linear decay over 2 x 2 steps, stepped by DeepSpeed


def test_lr_factor():
    from corea.train.sft import lr_factor

    assert [lr_factor("constant", 4)(s) for s in range(5)] == [1.0] * 5
    assert [lr_factor("linear", 4)(s) for s in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
