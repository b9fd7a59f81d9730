"""The paper's Tables 1 and 2 and a "what this shows" paragraph, written from a ``summary.json`` object.

Both tables have one row per system (LLM-only first, then the paper's seven systems, then any other system in
the summary) and, per column scope, four cells at the default threshold:

    Pass@1 (%)   pass@1 of the cascade
    Cost         average cost per query in SLM input-token units (C_SLM = n_in + 4 n_out, C_LLM scaled)
    vs LLM       change of that cost against LLM-only: 100 (relative_cost - 1) %, negative = cheaper
    LLM%         share of queries answered by the LLM

Table 1's scopes are the dataset groups (in-domain, OOD math, OOD non-math: macro means of their datasets),
Table 2's the datasets themselves. Everything here is a pure function of the summary dict.
"""

from __future__ import annotations

import math
from typing import Iterable

from corea.evaluate.cascade import SYSTEMS
from corea.evaluate.tables import DATASET_LABELS, GROUP_LABELS

PAPER_ORDER = [s.name for s in SYSTEMS]
CELLS = ("Pass@1 (%)", "Cost", "vs LLM", "LLM%")


def _ok(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def _fmt(x, spec: str) -> str:
    return format(x, spec) if _ok(x) else "–"


def system_order(summary: dict) -> list[str]:
    """The paper's seven systems in its order, then the other systems of the summary in theirs."""
    present = list(summary.get("systems", {}))
    return [n for n in PAPER_ORDER if n in present] + [n for n in present if n not in PAPER_ORDER]


def _cells(entry: dict | None) -> list[str]:
    if not entry:
        return ["–"] * len(CELLS)
    rel = entry.get("relative_cost")
    change = f"{100 * (rel - 1):+.1f}%" if _ok(rel) else "–"
    return [_fmt(100 * entry["pass_at_1"] if _ok(entry.get("pass_at_1")) else None, ".1f"),
            _fmt(entry.get("avg_cost"), ".1f"), change, _fmt(entry.get("llm_pct"), ".1f")]


def _table(summary: dict, scopes: list[str], by: str, labels: dict[str, str]) -> str:
    header = ["System"] + [f"{labels.get(s, s)} {c}" for s in scopes for c in CELLS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    llm = summary.get("llm", {})
    rows = [["LLM only"] + [c for s in scopes for c in _cells(llm.get(s))]]
    source = summary.get(by, {})
    for name in system_order(summary):
        rows.append([name] + [c for s in scopes for c in _cells(source.get(name, {}).get(s))])
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _labels() -> dict[str, str]:
    return {**GROUP_LABELS, **DATASET_LABELS}


def table_one(summary: dict) -> str:
    """Systems x dataset groups: Pass@1, cost, cost change vs LLM-only, LLM%."""
    return _table(summary, list(summary.get("groups", {})), "systems", _labels())


def table_two(summary: dict) -> str:
    """Systems x datasets: Pass@1, cost, cost change vs LLM-only, LLM%."""
    datasets = [d for members in summary.get("groups", {}).values() for d in members]
    return _table(summary, datasets, "datasets", _labels())


def _dominated(summary: dict, scope: str, by: str = "COREA") -> list[str]:
    """Systems that ``by`` matches or beats on pass@1 at no higher cost, in this scope."""
    systems = summary.get("systems", {})
    ref = systems.get(by, {}).get(scope)
    if not ref or not _ok(ref.get("pass_at_1")) or not _ok(ref.get("relative_cost")):
        return []
    out = []
    for name in system_order(summary):
        e = systems[name].get(scope)
        if name == by or not e or not _ok(e.get("pass_at_1")) or not _ok(e.get("relative_cost")):
            continue
        if ref["pass_at_1"] >= e["pass_at_1"] and ref["relative_cost"] <= e["relative_cost"]:
            out.append(name)
    return out


def _join(names: Iterable[str]) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


#: The same RL without the confidence term: what the confidence reward adds is read against it.
RLVR_VERB = "RLVR-SLM-Verb"
#: Below this AUROC a confidence barely separates right from wrong answers.
WEAK_AUROC = 0.6


def _against_rlvr(systems: dict, scope: str, system: str, e: dict) -> str:
    """A sentence setting ``system``'s deferral, ECE and AUROC beside RLVR-SLM-Verb's, and saying so when the
    confidence does not separate right from wrong (AUROC < ``WEAK_AUROC``)."""
    text = ""
    r = systems.get(RLVR_VERB, {}).get(scope) if system != RLVR_VERB else None
    if r and _ok(r.get("ece")) and _ok(e.get("ece")):
        text += (f" Against {RLVR_VERB} (the same RL without the confidence term): the LLM answers "
                 f"{_fmt(e.get('llm_pct'), '.0f')}% vs {_fmt(r.get('llm_pct'), '.0f')}% of the questions, "
                 f"ECE {e['ece']:.3f} vs {r['ece']:.3f}, AUROC {_fmt(e.get('auroc'), '.3f')} vs "
                 f"{_fmt(r.get('auroc'), '.3f')}.")
    if _ok(e.get("auroc")) and e["auroc"] < WEAK_AUROC:
        text += (f" Here its confidence barely separates right from wrong answers (AUROC below {WEAK_AUROC}): the "
                 "calibration it learned does not carry over to this group.")
    return text


def findings(summary: dict, system: str = "COREA") -> str:
    """A few sentences per dataset group comparing ``system`` with LLM-only and the other systems, from the
    figures of the summary (pass@1 and cost at the default threshold, ECE and AUROC of the confidence)."""
    systems, llm, labels = summary.get("systems", {}), summary.get("llm", {}), _labels()
    if system not in systems:
        return f"{system} is not in this evaluation."
    sentences = []
    for scope in summary.get("groups", {}):
        e, ref = systems[system].get(scope), llm.get(scope)
        if not e or not ref or not _ok(e.get("pass_at_1")) or not _ok(ref.get("pass_at_1")):
            continue
        gap = 100 * (e["pass_at_1"] - ref["pass_at_1"])
        saving = 100 * (1 - e["relative_cost"]) if _ok(e.get("relative_cost")) else float("nan")
        versus = ("the same as" if round(abs(gap), 1) == 0 else
                  f"{abs(gap):.1f} points {'above' if gap > 0 else 'below'}")
        text = (f"{labels.get(scope, scope)}: {system} reaches {100 * e['pass_at_1']:.1f}% pass@1, "
                f"{versus} LLM-only ({100 * ref['pass_at_1']:.1f}%), "
                f"at {_fmt(100 * e['relative_cost'] if _ok(e.get('relative_cost')) else None, '.0f')}% of its cost "
                f"({'a saving of ' + format(saving, '.0f') + '%' if saving >= 0 else 'dearer by ' + format(-saving, '.0f') + '%'}"
                f", the LLM answering {_fmt(e.get('llm_pct'), '.0f')}% of the questions).")
        beaten = _dominated(summary, scope, system)
        others = [n for n in system_order(summary) if n != system and systems[n].get(scope)]
        if beaten:
            text += f" It matches or beats {_join(beaten)} on pass@1 at no higher cost."
        elif others:
            text += " No other system is both less accurate and dearer."
        calibrated = [(n, systems[n][scope].get("ece"), systems[n][scope].get("auroc")) for n in others]
        calibrated = [(n, ece, auroc) for n, ece, auroc in calibrated if _ok(ece)]
        if _ok(e.get("ece")) and calibrated:
            best = min(calibrated, key=lambda t: t[1])
            word = "lower" if e["ece"] < best[1] else "higher"
            text += (f" Its confidence has ECE {e['ece']:.3f} and AUROC {_fmt(e.get('auroc'), '.3f')}, "
                     f"{word} ECE than the best other system ({best[0]}, {best[1]:.3f}).")
        text += _against_rlvr(systems, scope, system, e)
        sentences.append(text)
    return "\n\n".join(sentences) if sentences else f"No group has figures for {system} and LLM-only."
