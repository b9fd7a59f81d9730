"""The paper configs as one family: evaluation and serving read exactly the folders the training runs write.

Each trained model that ``configs/eval-paper.yaml`` and ``configs/serve-p5en.yaml`` name must be the last
checkpoint of a training config: ``step_dir(output.dir, optim.steps) / "hf"`` (``corea.train.checkpoints``
names it, and the last step is always checkpointed). The walk test does it for real with tiny models: each
training run's final checkpoint is written by the trainer's own ``write_checkpoint`` under a temporary root
standing in for ``/mnt/shared``, and every model path of the evaluation and serving configs, moved under the same
root, loads as a Hugging Face folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from corea.evaluate.config import load_eval_config
from corea.serve.config import load_serve_config
from corea.train.checkpoints import step_dir
from corea.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TRAINING = sorted((ROOT / "configs").glob("paper-*.yaml"))
EVAL = ROOT / "configs" / "eval-paper.yaml"
SERVE = ROOT / "configs" / "serve-p5en.yaml"
SHARED = "/mnt/shared"  # the storage every node mounts (README, "Running on AWS")


def final_checkpoints() -> dict[str, str]:
    """Training run name -> the Hugging Face folder its last step writes."""
    out = {}
    for path in TRAINING:
        cfg = load_config(path)
        out[cfg.name] = str(step_dir(cfg.out_dir, cfg.optim.steps) / "hf")
    return out


def trained_paths() -> dict[str, str]:
    """Every model path of the evaluation and serving configs that lies under a training run's folder."""
    ev, sv = load_eval_config(EVAL), load_serve_config(SERVE)
    paths = {f"eval models.{role}": getattr(ev.models, role).path for role in ("rlvr", "brier", "corea")}
    paths["serve slm.model"] = sv.slm.model
    return paths


def test_eval_and_serve_read_the_last_checkpoint_of_a_training_run():
    finals = final_checkpoints()
    runs = {load_config(p).output.dir: load_config(p).name for p in TRAINING}
    for where, path in trained_paths().items():
        run = next((name for folder, name in runs.items() if path.startswith(folder + "/")), None)
        assert run is not None, f"{where}: {path} is under no training run's output.dir"
        assert path == finals[run], f"{where}: {path}, but the run {run} writes {finals[run]}"
    # the roles are the runs the paper trains
    assert trained_paths()["eval models.corea"] == trained_paths()["serve slm.model"] == finals["qwen2.5-7b-rlcc-l1"]
    assert trained_paths()["eval models.rlvr"] == finals["qwen2.5-7b-rlvr"]
    assert trained_paths()["eval models.brier"] == finals["qwen2.5-7b-brier"]


def test_eval_split_seed_matches_training_seed():
    """DeepMath500 stays disjoint from the training prompts only with the training seed."""
    assert {load_config(p).seed for p in TRAINING} == {load_eval_config(EVAL).split_seed}


def _moved(path: str, root: Path) -> Path:
    assert path.startswith(SHARED + "/"), path
    return root / path[len(SHARED) + 1:]


@pytest.mark.timeout(300)
def test_train_eval_serve_walk_with_tiny_models(tmp_path, tiny_checkpoints):
    """The trainer's checkpoint writer at each run's own path; evaluation and serving load what it wrote."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from corea.models.loading import load_tokenizer
    from corea.train.checkpoints import latest_checkpoint, write_checkpoint

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["slm"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["slm"])

    def write(folder, *_):  # what the trainer's save leaves in the step folder: the Hugging Face weights
        model.save_pretrained(Path(folder) / "hf")
        tokenizer.save_pretrained(Path(folder) / "hf")

    for path in TRAINING:
        cfg = load_config(path)
        out = _moved(str(cfg.out_dir), tmp_path)
        written = write_checkpoint(out, cfg.optim.steps, write, {"seed": cfg.seed}, cfg.output.keep_checkpoints)
        assert Path(written) == latest_checkpoint(out) == step_dir(out, cfg.optim.steps)
    for where, path in trained_paths().items():
        folder = _moved(path, tmp_path)
        assert (folder / "config.json").is_file(), f"{where}: nothing written at {folder}"
        assert AutoConfig.from_pretrained(folder).model_type == "qwen2"
        assert len(load_tokenizer(folder)) > 0


def test_serving_autoscaling_ranges_fit_the_cluster():
    """configs/serve-p5en.yaml's replica ranges against cluster.yaml's p5en node type and max_workers: the
    minimum fits one node, the maximum the whole cluster, and every replica asks for what a p5en node has."""
    import yaml

    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    node = cluster["available_node_types"]["gpu_p5en"]
    nodes, gpus, cpus = node["max_workers"], node["resources"]["GPU"], node["resources"]["CPU"]
    sv = load_serve_config(SERVE)
    tiers = {"slm": sv.slm, "llm": sv.llm}
    for name, tier in tiers.items():
        scaling = tier.autoscaling
        assert 1 <= scaling.min_replicas <= scaling.max_replicas, name
        assert scaling.target_ongoing_requests <= tier.max_ongoing_requests, name
        assert tier.resources.num_gpus == tier.tensor_parallel_size <= gpus, name
        assert f"accelerator_type:{tier.resources.accelerator_type}" in node["resources"], name
    assert sv.ingress.autoscaling.target_ongoing_requests <= sv.ingress.max_ongoing_requests
    least = {k: sum(t.autoscaling.min_replicas * getattr(t.resources, k) for t in tiers.values())
             for k in ("num_gpus", "num_cpus")}
    assert least["num_gpus"] <= gpus and least["num_cpus"] + sv.ingress.autoscaling.min_replicas * \
        sv.ingress.resources.num_cpus <= cpus  # the smallest deployment: one p5en node
    most = sum(t.autoscaling.max_replicas * t.resources.num_gpus for t in tiers.values())
    assert most <= nodes * gpus  # at full scale serving fills at most every GPU the cluster may start
