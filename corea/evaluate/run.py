"""The evaluation pipeline: baselines, generation for every model and dataset, records, report.

Order: (1) if the Probe or the Router is configured, the RLVR-SLM samples ``train_questions.samples`` answers
per training question; the Router (SFT of the base model on P(correct) targets) and the Probe (MLP on hidden
states) are trained on them; (2) every configured model (and the Router) answers every evaluation question
k times; (3) the Probe scores the RLVR-SLM's records; (4) ``records.parquet`` and the report are written.
A generation pass whose inputs are unchanged is read back from ``output_dir/generations`` instead of redone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from corea.data import Record, load_dataset
from corea.evaluate.config import EvalConfig, ModelSpec
from corea.evaluate.generate import GenerationJob, generate
from corea.evaluate.records import load_records, save_records, split_key

log = logging.getLogger(__name__)
RECORDS_FILE = "records.parquet"
REPORT_DIR = "report"


def eval_questions(cfg: EvalConfig) -> list[Record]:
    """The evaluation questions of every configured dataset (DeepMath split with ``cfg.split_seed``), each
    record's ``dataset`` set to the registered name it was loaded under (e.g. ``deepmath500``)."""
    out = []
    for item in cfg.datasets:
        records = load_dataset(item.name, path=item.path, limit=item.limit, split=item.split, seed=cfg.split_seed)
        out += [dataclasses.replace(r, dataset=item.name) for r in records]
    return out


def train_questions(cfg: EvalConfig) -> list[Record]:
    t = cfg.baselines.train_questions
    return load_dataset(t.dataset, path=t.path, limit=t.limit, split=t.split, seed=cfg.split_seed)


def make_job(cfg: EvalConfig, role: str, path: str, spec: ModelSpec | None, **overrides) -> GenerationJob:
    """A generation job from the config's generation and engine sections and the model's own settings."""
    engine, gen = cfg.engine, cfg.generation
    backend = (spec.backend if spec else None) or engine.backend
    fields = dict(
        role=role, model_path=path, runs=gen.runs, temperature=gen.temperature, top_p=gen.top_p,
        max_tokens=gen.max_tokens, seed=cfg.seed, backend=backend,
        options={**engine.options, **(spec.options if spec else {})}, concurrency=engine.concurrency,
        batch_size=engine.batch_size, num_cpus=engine.num_cpus,
        num_gpus=spec.num_gpus if spec and spec.num_gpus is not None else engine.num_gpus,
        grade_concurrency=engine.grade_concurrency, grade_cpus=engine.grade_cpus,
    )
    fields.update(overrides)
    return GenerationJob(**fields)


def _question_digest(records: list[Record]) -> str:
    text = "\n".join(sorted(f"{r.dataset}\0{r.id}\0{r.gold}" for r in records))
    return hashlib.sha256(text.encode()).hexdigest()


def cached_generate(job: GenerationJob, records: list[Record], folder: Path, name: str, progress: bool) -> pd.DataFrame:
    """``generate`` unless ``folder/name.parquet`` was made by the same job on the same questions."""
    data, meta = folder / f"{name}.parquet", folder / f"{name}.json"
    fingerprint = json.loads(json.dumps({**job.fingerprint(), "questions": _question_digest(records)}))
    if data.exists() and meta.exists() and json.loads(meta.read_text()) == fingerprint:
        log.info("reusing %s", data)
        return load_records(data)
    frame = generate(job, records, progress=progress)
    save_records(frame, data)
    meta.write_text(json.dumps(fingerprint, indent=1))
    return load_records(data)


def _messages(frame: pd.DataFrame, questions: dict[tuple[str, str], Record]) -> pd.Series:
    return pd.Series([json.dumps(questions[(d, q)].messages(), ensure_ascii=False)
                      for d, q in zip(frame["dataset"], frame["id"])], index=frame.index)


def train_baselines(cfg: EvalConfig, paths: dict[str, str]) -> tuple[str | None, str | None, dict]:
    """(router checkpoint, probe file, info) trained on the RLVR-SLM's samples of the training questions.

    Reused from ``output_dir/baselines`` when trained there before from the same samples and settings."""
    from corea.evaluate import baselines, probe

    b, out = cfg.baselines, cfg.out_dir / "baselines"
    router_path = b.router.path if b.router else None
    probe_path = b.probe.path if b.probe else None
    need_router = b.router is not None and router_path is None
    need_probe = b.probe is not None and probe_path is None
    if not (need_router or need_probe):
        return router_path, probe_path, {}
    questions = train_questions(cfg)
    job = make_job(cfg, "rlvr", paths["rlvr"], cfg.models.rlvr, runs=b.train_questions.samples,
                   temperature=b.train_questions.temperature)
    base = (b.router.base_model or paths.get("slm_verb")) if need_router else None
    fingerprint = {**job.fingerprint(), "questions": _question_digest(questions), "router_base": base,
                   "router": b.router.model_dump() if need_router else None,
                   "probe": b.probe.model_dump() if need_probe else None}
    fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back from disk (tuples become lists)
    saved = out / "baselines.json"
    if saved.exists() and (info := json.loads(saved.read_text())).get("fingerprint") == fingerprint:
        log.info("reusing the baselines in %s", out)
        return info.get("router", {}).get("path", router_path), info.get("probe", {}).get("path", probe_path), info
    samples = cached_generate(job, questions, out, "train_rlvr", cfg.progress)
    info = {"fingerprint": fingerprint, "train_questions": len(questions),
            "train_pass_at_1": float(samples["correct"].mean())}
    if need_router:
        targets = baselines.router_targets(samples)
        examples = baselines.router_examples({(r.dataset, r.id): r for r in questions}, targets)
        router_path = str(baselines.train_router(base, examples, out / "router", b.router.sft))
        info["router"] = {"path": router_path, **baselines.router_summary(targets)}
    if need_probe:
        lookup = {(r.dataset, r.id): r for r in questions}
        val = [split_key(cfg.seed, d, q) < b.probe.val_fraction for d, q in zip(samples["dataset"], samples["id"])]
        feats = probe.feature_dataset(samples, _messages(samples, lookup), paths["rlvr"], b.probe, np.array(val))
        probe_path = str(probe.train_probe(feats, b.probe, out / "probe.pt", seed=cfg.seed))
        info["probe"] = {"path": probe_path, **probe.load_probe(probe_path)[1]}
        log.info("probe trained: best epoch %s of %d, validation loss %.4f, AUROC %s", info["probe"]["epoch"],
                 b.probe.epochs, info["probe"]["val_loss"], info["probe"].get("val_auroc"))
    saved.write_text(json.dumps(info, indent=2, default=str))
    return router_path, probe_path, info


def resolve_paths(cfg: EvalConfig) -> dict[str, str]:
    """Checkpoint folder of every configured role (``tiny:*`` built under output_dir/models)."""
    from corea.train.loop import resolve_model

    return {role: resolve_model(spec.path, cfg.out_dir, spec.seed) for role, spec in cfg.models.configured().items()}


def generate_records(cfg: EvalConfig, only: Sequence[str] | None = None) -> pd.DataFrame | None:
    """Baselines, then every model on every evaluation question; returns (and saves) the records.

    ``only``: the baselines and just these roles, into the caches that a later full call reuses (e.g. while another
    model is still training); nothing is saved, and None is returned."""
    import ray

    if not ray.is_initialized():
        ray.init()
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    if only is None:
        (cfg.out_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    paths = resolve_paths(cfg)
    router_path, probe_path, _ = train_baselines(cfg, paths)
    questions = eval_questions(cfg)
    folder = cfg.out_dir / "generations"
    frames = {}
    for role, spec in cfg.models.configured().items():
        if only is None or role in only:
            frames[role] = cached_generate(make_job(cfg, role, paths[role], spec), questions, folder, role, cfg.progress)
    if router_path is not None:
        job = make_job(cfg, "router", router_path, cfg.models.slm_verb, style="router",
                       max_tokens=cfg.baselines.router.max_tokens)
        frames["router"] = cached_generate(job, questions, folder, "router", cfg.progress)
    if only is not None:
        return None
    if probe_path is not None:
        from corea.evaluate.probe import score_records

        rlvr = frames["rlvr"]
        lookup = {(r.dataset, r.id): r for r in questions}
        rlvr["probe_confidence"] = score_records(rlvr, _messages(rlvr, lookup), paths["rlvr"], probe_path,
                                                 cfg.baselines.probe)
    records = pd.concat(frames.values(), ignore_index=True)
    save_records(records, cfg.out_dir / RECORDS_FILE)
    if cfg.strategies is not None:  # online strategies: per-question rows with per-call tiers, beside the records
        from corea.evaluate.online import STRATEGY_RECORDS_FILE, evaluate_strategies

        evaluate_strategies(cfg, paths, questions).to_parquet(cfg.out_dir / STRATEGY_RECORDS_FILE, index=False)
    return load_records(cfg.out_dir / RECORDS_FILE)


def report_from_config(records, cfg: EvalConfig, out_dir: str | Path | None = None) -> Path:
    """``build_report`` with the config's cascade, selection and metrics settings."""
    from corea.evaluate.online import STRATEGY_RECORDS_FILE
    from corea.evaluate.report import build_report

    strategies = cfg.out_dir / STRATEGY_RECORDS_FILE
    return build_report(records, out_dir or cfg.out_dir / REPORT_DIR, size_ratio=cfg.cascade.size_ratio,
                        threshold=cfg.cascade.threshold, sweep_step=cfg.cascade.sweep_step,
                        selection=cfg.selection, metrics=cfg.metrics, seed=cfg.seed,
                        strategies=pd.read_parquet(strategies) if cfg.strategies and strategies.exists() else None)


def evaluate(cfg: EvalConfig) -> Path:
    """Generation + metrics + cascade + report; returns the report folder (``output_dir/report``)."""
    records = generate_records(cfg)
    report = report_from_config(records, cfg)
    log.info("report written to %s", report)
    return report


run_eval = evaluate
