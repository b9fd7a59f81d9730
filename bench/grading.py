"""Benchmark: grading a rollout batch, naive math-verify loop vs corea's batched grader; pathological answers.

Batch: ``--prompts`` x ``--group-size`` responses (default 1024 x 8 = 8,192). Gold answers are drawn from
MATH-500, GSM8K and the DeepMath-style sample (``/work/shared/data`` when present, else the shipped
fixtures). Each response's answer is the gold (sometimes an equivalent rewrite), a perturbed answer (number + 1,
swapped fraction, another number or a changed expression, another question's gold) or, for 2% of them, a
pathological answer (power towers, huge powers and factorials, 10,000 nested braces, a 1 MB answer, invalid
UTF-8). Each answer is wrapped as a whole response: 70% ``... \\boxed{ans} \\confidence{0.8}``, 10% without a
box (``So the final answer is $ans$.``), 10% a first box, a long correction, then ``\\boxed{ans}``, 10% a
``<think>`` block first; correctness is read from the whole response.

(a) naive: ``math_verify.verify(math_verify.parse(math_gold_text(gold)), math_verify.parse(response))`` per
    response, one after another in the main thread, math-verify's default settings (signal-based timeouts);
    ``math_gold_text(gold)``: the gold as written, or boxed. Pathological responses get corea's pre-screen instead
    (math-verify alone can hang on them: its alarm cannot interrupt a C-level big-integer power).
(b) corea: ``corea.rewards.batch_group_rewards(groups)`` (parse, grade, rewards) with a fresh worker pool per
    run, started and warmed up before the clock starts: pool start-up is excluded. Timed with and without the
    pathological responses; pathological_overhead = (t_with - t_clean) / t_clean. Medians over ``--repeats``;
    the naive loop runs in ``--repeats`` slices interleaved with them (a shared machine's load hits both).
Warm-up: both (a) and (b) first grade an untimed batch of 256 prompts drawn from the other half of the gold rows
(math-verify's ANTLR parser and sympy warm up over their first calls; no timed prompt's gold is cached).
(c) pathological: 200 pathological responses (the list above plus integrals, sums, products, limits and
    derivatives with large parameters; bare, boxed and after "final answer is") graded by ``grade`` from 8
    threads with a fresh pool: wall time, verdicts, and whether any reached a worker.
The 1-minute load average is printed beside each figure (the machine may be shared).

    python bench/grading.py [--prompts 1024] [--group-size 8] [--seed 0] [--repeats 3] [--workers N]
                            [--only-pathological] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import statistics
import time
from pathlib import Path

SHARED = Path("/work/shared/data")
FIXTURES = Path(__file__).resolve().parents[1] / "corea" / "data" / "fixtures"
SOURCES = {"math500": ("math500.jsonl", "math500.jsonl"), "gsm8k": ("gsm8k.jsonl", "gsm8k.jsonl"),
           "deepmath": ("deepmath_style_sample.jsonl", "deepmath_sample.jsonl")}
PATHOLOGICAL = [
    "9^{9^{9^{9}}}", "(x+1)^{100000}", "{" * 10_000 + "1" + "}" * 10_000, "7" * 1_000_000, b"\xff\xfe\xfd12",
    "100000000!", "10^{10^{10}}", "(a+b+c+d)^{50}", "2^{2^{2^{2^{2^{2}}}}}", "x" * 200_000,
]
CALCULUS = [
    r"\int_0^{\infty} e^{-x^{1000}} dx", r"\sum_{n=1}^{100000} \frac{1}{n^{3}}",
    r"\prod_{k=1}^{5000} \left(1 + \frac{1}{k^2}\right)", r"\lim_{n \to \infty} \left(1 + \frac{1}{n}\right)^{n^{500}}",
    r"\int_0^1 \int_0^1 \int_0^1 \int_0^1 x y z w \, dx\, dy\, dz\, dw", r"\frac{d^{200}}{dx^{200}} \sin(x^{300})",
    r"\sum_{k=0}^{10^{9}} \binom{10^{9}}{k}", r"\int_{-1000}^{1000} \sin(x^{999}) dx",
]


def load_golds() -> list[str]:
    golds = []
    for name, (shared, fixture) in SOURCES.items():
        path = SHARED / shared if (SHARED / shared).exists() else FIXTURES / fixture
        with open(path, encoding="utf-8") as f:
            golds += [str(json.loads(line)["answer"]) for line in f if line.strip()]
        print(f"  golds from {path}")
    return [g for g in golds if g.strip()]


def equivalent(gold: str, rng: random.Random) -> str:
    """The gold, or a rewrite math-verify treats as equal."""
    roll = rng.random()
    if roll < 0.15 and "\\frac" in gold:
        return gold.replace("\\frac", "\\dfrac")
    if roll < 0.25 and re.fullmatch(r"\d+", gold):
        return rng.choice([f"\\${gold}", f"{gold}.0", f"{int(gold):,}"])
    if roll < 0.3:
        return f" {gold} "
    return gold


def perturb(gold: str, pool: list[str], rng: random.Random) -> str:
    """A (most likely) wrong answer."""
    roll = rng.random()
    numbers = list(re.finditer(r"\d+", gold))
    if roll < 0.4 and numbers:
        m = rng.choice(numbers)
        return gold[: m.start()] + str(int(m.group()) + 1) + gold[m.end() :]
    if roll < 0.55 and (m := re.search(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", gold)):
        return gold[: m.start()] + f"\\frac{{{m.group(2)}}}{{{m.group(1)}}}" + gold[m.end() :]
    if roll < 0.75 and re.fullmatch(r"-?\d+", gold):
        return str(rng.choice([2 * int(gold), int(gold) - 1, -int(gold), int(gold) // 10]))
    if roll < 0.75:
        return rng.choice([f"{gold} + 1", f"2\\left({gold}\\right)", f"-{gold}", f"\\sqrt{{{gold}}}"])
    return rng.choice(pool)


def wrap(answer: str | bytes, roll: float, other: str) -> str | bytes:
    """A whole response around ``answer`` (see the module docstring for the shapes)."""
    head = "Let me reason step by step.\nSo the final answer is "
    if isinstance(answer, bytes):
        return head.encode() + b"\\boxed{" + answer + b"}\n\\confidence{0.8}"
    if roll < 0.7:
        return f"{head}\\boxed{{{answer}}}\n\\confidence{{0.8}}"
    if roll < 0.8:
        return f"Let me reason step by step.\nSo the final answer is ${answer}$.\n\\confidence{{0.6}}"
    if roll < 0.9:
        return (f"First I get \\boxed{{{other}}}. Checking this against the second condition shows a mistake in "
                f"the sign of the middle term, so I redo the computation.\nThe answer is \\boxed{{{answer}}}\n"
                "\\confidence{0.5}")
    return f"<think>\nMaybe {other}? Let me check again.\n</think>\nThe answer is \\boxed{{{answer}}} \\confidence{{0.9}}"


def pathological_run(workers: int | None) -> dict:
    """(c): 200 pathological responses from 8 threads, a fresh pool."""
    from concurrent.futures import ThreadPoolExecutor

    from corea import grading

    answers = [b"\xff\xfe\xfd 9^{9^{9^{9}}}" if isinstance(a, bytes) else a for a in PATHOLOGICAL] + CALCULUS
    jobs = []
    for i in range(200):
        a = answers[i % len(answers)]
        if isinstance(a, bytes):
            jobs.append((b"so \\boxed{" + a + b"}", "2"))
        else:
            jobs.append(([a, f"so \\boxed{{{a}}} \\confidence{{0.9}}", f"The final answer is ${a}$."][i % 3],
                         ["2", "x^2 + 1", "\\frac{1}{2}", "1"][i % 4]))
    load = os.getloadavg()[0]
    with grading.Grader(processes=workers) as grader, ThreadPoolExecutor(8) as threads:
        start = time.perf_counter()
        verdicts = list(threads.map(lambda job: grader.grade(*job), jobs))
        elapsed = time.perf_counter() - start
        reached = len(grader.worker_pids())
        stats = dict(grader.stats)
    print(f"(c) pathological: {len(jobs)} responses from 8 threads in {elapsed:.3f} s (load {load:.1f} -> "
          f"{os.getloadavg()[0]:.1f}); correct: {sum(verdicts)}; workers started: {reached}; paths: {stats}")
    return {"pathological_s": elapsed, "pathological_n": len(jobs), "pathological_correct": sum(verdicts),
            "pathological_workers_started": reached, "pathological_load": load}


def build(prompts: int, group_size: int, pool: list[str], rng: random.Random) -> tuple[list, set]:
    groups, patho, k = [], set(), 0
    golds = rng.sample(pool, prompts) if prompts <= len(pool) else [rng.choice(pool) for _ in range(prompts)]
    for p, gold in enumerate(golds):
        responses = []
        for i in range(group_size):
            if rng.random() < 0.02:
                answer = PATHOLOGICAL[k % len(PATHOLOGICAL)]
                k += 1
                patho.add((p, i))
            elif rng.random() < 0.5:
                answer = equivalent(gold, rng)
            else:
                answer = perturb(gold, pool, rng)
            responses.append(wrap(answer, rng.random(), rng.choice(pool)))
        groups.append((responses, gold, "math"))
    return groups, patho


def batches(prompts: int, group_size: int, seed: int) -> tuple[list, set, list]:
    """The timed batch and a warm-up batch (256 prompts) drawn from disjoint halves of the gold rows."""
    rng = random.Random(seed)
    pool = load_golds()
    rng.shuffle(pool)
    timed_pool, warm_pool = pool[: len(pool) // 2], pool[len(pool) // 2 :]
    groups, patho = build(prompts, group_size, timed_pool, rng)
    warm, _ = build(256, group_size, warm_pool, rng)
    return groups, patho, warm


def naive(groups: list, patho: set) -> tuple[float, float, list[list[bool]]]:
    import math_verify

    from corea.grading import math_gold_text, prescreen
    from corea.protocol import parse_response

    out = []
    cpu, start = time.process_time(), time.perf_counter()
    for p, (responses, gold, _) in enumerate(groups):
        row = []
        for i, response in enumerate(responses):
            if (p, i) in patho:
                answer = parse_response(response).answer or ""
                row.append(False if prescreen(answer, gold) else None)  # None: the pre-screen let it through
            else:
                row.append(bool(math_verify.verify(math_verify.parse(math_gold_text(gold)),
                                                   math_verify.parse(response))))
        out.append(row)
    return time.perf_counter() - start, time.process_time() - cpu, out


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc); 0 when unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def corea_run(groups: list, warm: list, workers: int | None) -> tuple[float, float, list[list[bool]]]:
    """(wall s, CPU s of this process and the workers, verdicts) of batch_group_rewards on ``groups``."""
    from corea import grading
    from corea.rewards import batch_group_rewards

    grader = grading.configure(processes=workers)  # a fresh pool: no gold of this batch cached earlier
    grader.warmup()
    batch_group_rewards(warm)
    grader.warmup()  # a worker replaced during the warm-up batch has finished starting
    before = {pid: _cpu_s(pid) for pid in grader.worker_pids()}
    stats = dict(grader.stats)
    cpu, start = time.process_time(), time.perf_counter()
    rewards = batch_group_rewards(groups)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    cpu += sum(_cpu_s(pid) - before.get(pid, 0.0) for pid in set(before) | set(grader.worker_pids()))
    print(f"    corea paths: {({k: v - stats[k] for k, v in grader.stats.items()})}")
    return elapsed, cpu, [[r.correct for r in row] for row in rewards]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1024)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="grader processes (default: os.cpu_count())")
    parser.add_argument("--only-pathological", action="store_true", help="run (c) only")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    from corea import grading

    print(__doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0])
    figures = pathological_run(args.workers)
    if args.only_pathological:
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
        return
    load_start = os.getloadavg()[0]
    groups, patho, warm = batches(args.prompts, args.group_size, args.seed)
    clean = [([r for i, r in enumerate(rs) if (p, i) not in patho], g, k) for p, (rs, g, k) in enumerate(groups)]
    n = sum(len(rs) for rs, _, _ in groups)
    print(f"\nbatch: {len(groups)} prompts, {n} responses, {len(patho)} pathological; "
          f"pool: {grading.Grader(args.workers).processes} workers, per-response deadline {grading.TIMEOUT_S} s")

    # Runs interleave, so that a load change on a shared machine hits both sides: per repeat, corea with and
    # without the pathological responses, then one slice of the naive loop.
    naive(warm, set())  # the same warm-up for the naive loop's process
    cut = [round(i * len(groups) / args.repeats) for i in range(args.repeats + 1)]
    with_s, clean_s, with_cpu, clean_cpu, ours, t_naive, cpu_naive, plain = [], [], [], [], None, 0.0, 0.0, []
    for r in range(args.repeats):
        t, cpu, ours = corea_run(groups, warm, args.workers)
        with_s.append(t)
        with_cpu.append(cpu)
        t, cpu, _ = corea_run(clean, warm, args.workers)
        clean_s.append(t)
        clean_cpu.append(cpu)
        part = {(p - cut[r], i) for p, i in patho if cut[r] <= p < cut[r + 1]}
        t, cpu, verdicts = naive(groups[cut[r] : cut[r + 1]], part)
        t_naive, cpu_naive, plain = t_naive + t, cpu_naive + cpu, plain + verdicts
    t_with, t_clean, cpu_with, cpu_clean = (statistics.median(x) for x in (with_s, clean_s, with_cpu, clean_cpu))
    print(f"(b) corea: {t_with:.2f} s with pathological, {t_clean:.2f} s clean; CPU s (this process + workers): "
          f"{cpu_with:.2f} with, {cpu_clean:.2f} clean\n    runs, wall s: {', '.join(f'{t:.2f}' for t in with_s)} | "
          f"{', '.join(f'{t:.2f}' for t in clean_s)}")
    print(f"(a) naive: {t_naive:.2f} s ({cpu_naive:.2f} CPU s), in {args.repeats} slices")

    agree, differ, screened_out = 0, [], 0
    for p, (rs, gold, _) in enumerate(groups):
        for i, (a, b) in enumerate(zip(plain[p], ours[p])):
            if (p, i) in patho:
                screened_out += a is False
                continue
            if a == b:
                agree += 1
            else:
                differ.append((gold, grading.parse_response(rs[i]).answer, a, b))
    total = n - len(patho)
    print(f"verdicts: {agree}/{total} non-pathological agree; pathological: {screened_out}/{len(patho)} rejected "
          f"by the pre-screen, all False in corea: {all(not ours[p][i] for p, i in patho)}")
    for gold, answer, a, b in differ[:30]:
        print(f"  differ: gold={gold!r} answer={answer!r} naive={a} corea={b}")
    speedup, cpu_ratio, overhead = t_naive / t_with, cpu_naive / cpu_with, (t_with - t_clean) / t_clean
    cpu_overhead = (cpu_with - cpu_clean) / cpu_clean
    load_end = os.getloadavg()[0]
    print(f"\nspeedup = naive / corea = {speedup:.2f}x wall ({cpu_ratio:.2f}x in CPU seconds); "
          f"pathological_overhead = {overhead:+.3f} wall ({cpu_overhead:+.3f} in CPU seconds); "
          f"1-minute load average {load_start:.1f} at the start, {load_end:.1f} at the end")
    if args.json:
        args.json.write_text(json.dumps({
            "naive_s": t_naive, "corea_s": t_with, "corea_clean_s": t_clean, "speedup": speedup,
            "naive_cpu_s": cpu_naive, "corea_cpu_s": cpu_with, "corea_clean_cpu_s": cpu_clean,
            "cpu_speedup": cpu_ratio, "pathological_overhead_cpu": cpu_overhead,
            "pathological_overhead": overhead, "responses": n, "prompts": len(groups),
            "pathological": len(patho), "agree": agree, "compared": total, "differ": len(differ),
            "workers": grading.Grader(args.workers).processes, "repeats": args.repeats,
            "load_start": load_start, "load_end": load_end, **figures,
        }, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
