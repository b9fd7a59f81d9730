"""The demo's verdict, read from the evaluation's ``summary.json``: the paper's claim, group by group.

The paper's claim: LLM-only is the most accurate system, and COREA answers within ``max_drop`` (2 points) of its
pass@1 for less (relative cost < 1). Per dataset group: drop = pass@1(LLM-only) - pass@1(COREA), saving =
1 - cost(COREA) / cost(LLM-only). A group *meets* the claim only when LLM-only is at least as accurate as every
other row, COREA's drop is at most ``max_drop`` and its cost is below LLM-only's; the demo is OK only when the
in-domain group meets it. Out of domain the lines report what happened, met or not.
"""

from __future__ import annotations

from dataclasses import dataclass

from corea.evaluate.tables import GROUP_LABELS

#: The paper's criterion: COREA's pass@1 at most 2 points below LLM-only's.
PAPER_MAX_DROP = 0.02


@dataclass(frozen=True)
class GroupVerdict:
    group: str
    llm_pass: float
    corea_pass: float
    relative_cost: float
    llm_pct: float
    strongest: tuple[str, float]  # the most accurate row other than LLM-only

    @property
    def drop(self) -> float:
        return self.llm_pass - self.corea_pass

    @property
    def llm_strongest(self) -> bool:
        return self.llm_pass >= self.strongest[1]

    def met(self, max_drop: float = PAPER_MAX_DROP) -> bool:
        return self.llm_strongest and self.drop <= max_drop + 1e-12 and self.relative_cost < 1.0

    def line(self, max_drop: float = PAPER_MAX_DROP) -> str:
        label = GROUP_LABELS.get(self.group, self.group)
        text = (f"{label}: COREA pass@1 {self.corea_pass:.3f} vs LLM-only {self.llm_pass:.3f} "
                f"(drop {100 * self.drop:+.1f} points), cost {100 * (self.relative_cost - 1):+.1f}% vs LLM-only, "
                f"LLM answers {self.llm_pct:.0f}% of questions: ")
        if not self.llm_strongest:
            name, value = self.strongest
            return text + (f"not the paper's setting: LLM-only is not the most accurate row "
                           f"({name} {value:.3f}), so the drop says nothing of the cascade")
        if self.met(max_drop):
            return text + f"meets the paper's criterion (drop <= {100 * max_drop:.0f} points at a lower cost)"
        why = (f"drop above {100 * max_drop:.0f} points" if self.drop > max_drop + 1e-12
               else "cost not below LLM-only")
        return text + f"does not meet the paper's criterion ({why})"


def group_verdicts(summary: dict) -> list[GroupVerdict]:
    """One verdict per dataset group that has both COREA and LLM-only figures, in the summary's group order."""
    out = []
    systems, llm = summary["systems"], summary["llm"]
    for group in summary.get("groups") or [g for g in systems.get("COREA", {}) if g in llm]:
        corea = systems.get("COREA", {}).get(group)
        llm_pass = (llm.get(group) or {}).get("pass_at_1")
        if corea is None or llm_pass is None:
            continue
        others = [(name, rows[group]["pass_at_1"]) for name, rows in systems.items()
                  if rows.get(group) and rows[group].get("pass_at_1") is not None]
        out.append(GroupVerdict(group, llm_pass, corea["pass_at_1"], corea["relative_cost"], corea["llm_pct"],
                                max(others, key=lambda kv: kv[1])))
    return out


def verdict(summary: dict, max_drop: float = PAPER_MAX_DROP) -> tuple[bool, list[str]]:
    """(in-domain group meets the claim, one line per group)."""
    groups = group_verdicts(summary)
    ok = any(g.group == "in_domain" and g.met(max_drop) for g in groups)
    return ok, [g.line(max_drop) for g in groups]
