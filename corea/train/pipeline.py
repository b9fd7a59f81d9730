"""Rollout batches for the driver: generation and grading, pipelined ahead of training by up to
``rollout.max_staleness`` steps, and the zero-variance group filter (with refill).

Versions and staleness. The weights a step trains start from version ``step - 1`` (the update of the previous
step, synced to the rollout workers as version ``step - 1``). A batch sampled with version v and trained at
``step`` has staleness ``step - 1 - v``.

- ``max_staleness: 0``: the batch of a step is generated when the step asks for it, with the current weights:
  the synchronous loop (generate, grade, reference, train, sync), exactly.
- ``max_staleness: k >= 1``: when step j's batch is taken, the generations of steps j+1 .. j+k are submitted
  (with version j-1) before step j trains; the rollout worker runs them while the trainer trains, and the weight
  update of step j reaches the worker after them (a Ray actor runs the calls of one caller in order). Batch j+k
  is thus trained at staleness <= k. A batch that comes back older than that (a restarted rollout worker starts
  from its initial checkpoint) is regenerated with the current weights: no batch older than ``max_staleness``
  is ever trained on.

Resume. The batches in flight when a checkpoint is written are collected and saved in it
(``inflight_rollouts.json``: rollouts with their weight versions); a resumed run grades and trains exactly
those, so with seeded sampling a resumed run equals the uninterrupted one for any ``max_staleness``.

Filtering. With ``advantage.filter_groups: zero_std`` a group whose total rewards are all equal carries no
policy gradient and is dropped; with ``refill`` further prompts (a seeded draw per step and round, so resume
keeps them) are rolled out until the batch is full, at most ``max_refill_rounds`` rounds, after which dropped
groups fill the rest (their advantage is 0). Without refill the kept groups are cut to whole optimizer updates.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from corea.data import Record
from corea.engines import SamplingParams
from corea.train.checkpoints import prompt_indices, select
from corea.train.config import TrainConfig
from corea.train.grpo import group_advantages, zero_std_groups
from corea.train.sequences import RolloutSequence

log = logging.getLogger(__name__)
INFLIGHT_FILE = "inflight_rollouts.json"


@dataclass
class Batch:
    """What one step trains on, and what it logs."""

    step: int
    rollouts: list[dict]  # every group rolled out for the step (kept or not), in order
    rewards: list[list[dict]]
    sequences: list[RolloutSequence]  # the kept groups' responses, with advantages
    weights_version: int  # the oldest weights any kept group was sampled with
    stats: dict[str, float] = field(default_factory=dict)


def to_sequences(rollouts: list[dict], rewards: list[list[dict]], n: int, std_normalize: bool = True) -> list[RolloutSequence]:
    """One sequence per response, with its GRPO group advantage."""
    if not rollouts:
        return []
    totals = torch.tensor([r["total"] for group in rewards for r in group], dtype=torch.float32)
    advantages = group_advantages(totals, n, std_normalize=std_normalize).tolist()
    seqs = [RolloutSequence(g["prompt_ids"], s["token_ids"], rollout_logprobs=s["logprobs"])
            for g in rollouts for s in g["samples"]]
    for seq, adv in zip(seqs, advantages):
        seq.advantage = adv
    return seqs


def refill_indices(n_records: int, step: int, round_: int, count: int, seed: int) -> list[int]:
    """Prompts of refill round ``round_`` (1-based) of ``step``: a seeded draw without replacement."""
    rng = np.random.default_rng([seed, step, round_, 17])
    return [int(i) for i in rng.choice(n_records, size=min(count, n_records), replace=False)]


class RolloutPipeline:
    """Hands the driver one graded batch per step, generating up to ``max_staleness`` steps ahead."""

    def __init__(self, cfg: TrainConfig, actors, records: list[Record], inflight: dict[int, list[dict]] | None = None):
        self.cfg, self.actors, self.records = cfg, actors, records
        self.max_staleness = cfg.rollout.max_staleness
        self.pending: dict[int, object] = {}  # step -> submitted generation (actors.submit handle)
        self.ready: dict[int, list[dict]] = dict(inflight or {})  # step -> rollouts already collected

    # --- what each step samples ------------------------------------------------------------------------------
    def params(self, step: int, round_: int = 0) -> SamplingParams:
        r = self.cfg.rollout
        seed = self.cfg.seed * 1_000_003 + step + (round_ << 40)
        return SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens, seed=seed)

    def prompts(self, step: int) -> list[Record]:
        return select(self.records, prompt_indices(len(self.records), step, self.cfg.rollout.prompts_per_step, self.cfg.seed))

    def _submit(self, step: int) -> None:
        if step not in self.pending and step not in self.ready and step <= self.cfg.optim.steps:
            self.pending[step] = self.actors.submit([r.messages() for r in self.prompts(step)], self.params(step))

    def _collect(self, step: int, min_version: int) -> list[dict]:
        if step in self.ready:
            rollouts = self.ready.pop(step)
            if all(g["weights_version"] >= min_version for g in rollouts):
                return rollouts
            log.warning("saved batch of step %d is older than max_staleness allows; regenerating", step)
        handle = self.pending.pop(step, None)
        if handle is None:
            handle = self.actors.submit([r.messages() for r in self.prompts(step)], self.params(step))
        return self.actors.collect(handle, min_version)

    # --- the driver's calls -----------------------------------------------------------------------------------
    def next(self, step: int) -> Batch:
        """The graded batch of ``step`` (trained from weights version ``step - 1``); before returning, the
        generations of the next ``max_staleness`` steps are submitted so that they run while this one trains."""
        min_version = step - 1 - self.max_staleness
        t0 = time.perf_counter()
        rollouts = self._collect(step, min_version)
        rollout_s = time.perf_counter() - t0
        for ahead in range(step + 1, step + 1 + self.max_staleness):
            self._submit(ahead)
        t1 = time.perf_counter()
        records = self.prompts(step)
        rewards = self._score(rollouts, records)
        reward_s = time.perf_counter() - t1
        all_rollouts, all_rewards = list(rollouts), list(rewards)
        a, n = self.cfg.advantage, self.cfg.rollout.n
        flat = [r["total"] for g in rewards for r in g]
        degenerate = zero_std_groups(flat, n)
        stats = {"groups/zero_std_fraction": float(np.mean(degenerate))}
        kept = list(range(len(rollouts)))
        if a.filter_groups == "zero_std":
            kept, filler, rounds = [i for i, d in enumerate(degenerate) if not d], [i for i, d in enumerate(degenerate) if d], 0
            want = self.cfg.rollout.prompts_per_step
            while a.refill and len(kept) < want and rounds < a.max_refill_rounds:
                rounds += 1
                t2 = time.perf_counter()
                extra = select(self.records, refill_indices(len(self.records), step, rounds, want - len(kept), self.cfg.seed))
                more = self.actors.collect(self.actors.submit([r.messages() for r in extra], self.params(step, rounds)), min_version)
                rollout_s += time.perf_counter() - t2
                more_rewards = self._score(more, extra)
                more_degenerate = zero_std_groups([r["total"] for g in more_rewards for r in g], n)
                offset = len(all_rollouts)
                kept += [offset + i for i, d in enumerate(more_degenerate) if not d]
                filler += [offset + i for i, d in enumerate(more_degenerate) if d]
                all_rollouts += more
                all_rewards += more_rewards
            filled = 0
            if a.refill:
                filled = max(0, want - len(kept))
                kept = kept[:want] + filler[:filled]
            else:  # whole optimizer updates only
                per_update = self.cfg.optim.train_batch_prompts
                kept = kept[: len(kept) // per_update * per_update]
            stats.update({"filter/filtered_fraction": len(filler) / len(all_rollouts), "filter/refill_rounds": float(rounds),
                          "filter/zero_advantage_filled": float(filled), "filter/trained_groups": float(len(kept))})
        kept_rollouts = [all_rollouts[i] for i in kept]
        sequences = to_sequences(kept_rollouts, [all_rewards[i] for i in kept], n, a.std_normalize)
        versions = [g["weights_version"] for g in (kept_rollouts or all_rollouts)]
        stats.update({"time/rollout_s": rollout_s, "time/reward_s": reward_s})
        return Batch(step, all_rollouts, all_rewards, sequences, min(versions), stats)

    def _score(self, rollouts: list[dict], records: list[Record]) -> list[list[dict]]:
        groups = [([s["text"] for s in g["samples"]], r.gold, r.kind, r.prompt()) for g, r in zip(rollouts, records)]
        return self.actors.score(groups)

    def save(self, folder: Path) -> None:
        """Collect the batches in flight and write them into a checkpoint folder (nothing when synchronous)."""
        for step in sorted(self.pending):
            self.ready[step] = self._collect(step, step - 1 - self.max_staleness)
        if self.ready:
            (Path(folder) / INFLIGHT_FILE).write_text(json.dumps({str(k): v for k, v in sorted(self.ready.items())}))

    @staticmethod
    def load(folder: Path | None) -> dict[int, list[dict]]:
        """The in-flight batches a checkpoint holds (none for a synchronous run)."""
        path = Path(folder) / INFLIGHT_FILE if folder is not None else None
        if path is None or not path.exists():
            return {}
        return {int(k): v for k, v in json.loads(path.read_text()).items()}
