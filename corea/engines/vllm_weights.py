"""How a ``VLLMEngine`` changes its weights, only through vLLM 0.29's own interfaces (never tensors in
``collective_rpc`` arguments: vLLM's utility-call encoder turns a tensor into an aux-buffer reference that arrives
as a list).

- The weight-transfer API (GPU engines built with ``weight_transfer_config``): ``init_weight_transfer`` /
  ``start_weight_update`` / ``receive_weights`` / ``finish_weight_update`` wrap ``init_weight_transfer_engine``,
  ``start_weight_update``, ``update_weights`` and ``finish_weight_update`` of ``LLM`` / ``AsyncLLM``, with vLLM's
  request types (``WeightTransferInitRequest``, ``WeightTransferUpdateRequest``: ``AsyncLLM`` reads their
  attributes). The trainer side is vLLM's ``NCCLTrainerWeightTransferEngine`` (``corea.train.weight_sync``).
- ``reload_weights(folder)``: the workers' own ``reload_weights(weights_path=...)`` reads the safetensors of a
  Hugging Face folder, layer by layer (only a path crosses the RPC). vLLM's worker then keeps ``folder`` as its
  model path; ``reload_weights()`` without a folder reloads the engine's last complete folder (the checkpoint it
  started from, or the last folder reloaded), named explicitly each time.
- ``update_weights(state_dict)``: all or some tensors, written as safetensors into a folder the engine owns until
  it shuts down (so the workers' model path never names a deleted folder), then reloaded from there.

The weight version is vLLM's (``get_weight_version``; "default" before the first update, which we read as 0).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any, Mapping

log = logging.getLogger(__name__)


def reload_kwargs(folder: str) -> dict[str, Any]:
    """What ``collective_rpc("reload_weights", kwargs=...)`` carries: a path and a flag, no tensors."""
    return {"weights_path": str(folder), "is_checkpoint_format": True}


class VLLMWeights:
    """The weight methods of ``VLLMEngine`` (needs ``_api``, ``model_path`` and ``weights_path``)."""

    model_path: str
    weights_path: str
    _update_dir: str | None = None
    _expected: dict[str, tuple[int, ...]] | None = None

    def _api(self, method: str, *args: Any, **kwargs: Any) -> Any:  # provided by the engine
        raise NotImplementedError

    def init_weight_transfer(self, init_info: Mapping[str, Any]) -> None:
        """Join the trainer's transfer group (blocks until the trainer opens its endpoint)."""
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        self._api("init_weight_transfer_engine", WeightTransferInitRequest(init_info=dict(init_info)))

    def start_weight_update(self) -> None:
        self._api("start_weight_update")

    def receive_weights(self, update_info: Mapping[str, Any]) -> None:
        """Receive one update round (runs while the trainer broadcasts; vLLM loads layer by layer)."""
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        self._api("update_weights", WeightTransferUpdateRequest(update_info=dict(update_info)))

    def finish_weight_update(self, version: int) -> None:
        """Finalize the received weights, commit ``version`` as vLLM's weight version, drop the prefix cache (it
        holds KV computed with the old weights)."""
        self._api("finish_weight_update", weight_version=str(int(version)))
        self._api("reset_prefix_cache")
        log.info("vLLM weights now at version %s", self.weight_version())

    def reload_weights(self, folder: str | None = None, version: int | None = None) -> None:
        """Load the safetensors of the Hugging Face folder ``folder`` (None: the last complete folder) on every
        worker, then commit ``version`` (None: keep the version). ``folder`` must be readable from the engine's
        node."""
        folder = str(folder or self.weights_path)
        self._api("collective_rpc", "reload_weights", kwargs=reload_kwargs(folder))
        self.weights_path = folder
        if version is not None:
            self._api("update_weight_version", str(int(version)))
        self._api("reset_prefix_cache")
        log.debug("vLLM weights reloaded from %s, version %s", folder, self.weight_version())

    def weight_version(self) -> str:
        return str(self._api("get_weight_version"))

    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter names and shapes of the checkpoint's architecture (built on the meta device)."""
        if self._expected is None:
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.from_pretrained(self.model_path)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
            self._expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        return self._expected

    def update_weights(self, state_dict: Mapping[str, Any]) -> None:
        """Load new parameters (Hugging Face names, all or a subset) through the workers' ``reload_weights``
        from the engine's own update folder. The weight version is left as it was."""
        import torch
        from safetensors.torch import save_file

        tensors = {k: torch.as_tensor(v).detach().cpu().contiguous() for k, v in state_dict.items()}
        expected = self._expected_shapes()
        unknown = sorted(set(tensors) - set(expected))
        if unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise ValueError(f"{len(unknown)} unknown parameter name(s) for {self.model_path}: {shown}")
        for name, tensor in tensors.items():
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {expected[name]}")
        if self._update_dir is None:
            self._update_dir = tempfile.mkdtemp(prefix="corea-vllm-weights-")
        tmp = os.path.join(self._update_dir, ".model.safetensors.tmp")
        save_file(tensors, tmp)
        os.replace(tmp, os.path.join(self._update_dir, "model.safetensors"))
        self._api("collective_rpc", "reload_weights", kwargs=reload_kwargs(self._update_dir))
        self._api("reset_prefix_cache")

    def _drop_update_dir(self) -> None:
        if self._update_dir is not None:
            shutil.rmtree(self._update_dir, ignore_errors=True)
            self._update_dir = None
