"""The recipe sweep behind ``bench/finetune.py --recipes A,B,... --seeds 0,1,2`` (issue 15).

Each named recipe (``train_contrastive/recipes/NAME.toml``) is trained once per seed, from scratch, with
the same models and data, by the plain command a user runs (``python -m train_contrastive train --config
NAME --seed S ...``) in a child process, whose wall-clock and CPU time (``getrusage`` of the children:
the trainer and its DataLoader workers) are measured around it. The ``default`` recipe is always part of
the sweep: it is the baseline every other recipe is compared with, measured in the same run on the
same (shared) machine.

A finished run records itself in ``OUT/RECIPE-seedS/sweep-run.json``; running the same sweep again (same
``--output``) reuses every run whose record names the same command and recipe file content and trains only
what is missing, so a sweep of hours survives a stop and grows one recipe at a time (``--fresh`` retrains
everything).

Two tables come out: one row per run, and one per recipe with the mean and standard deviation over
seeds and the difference of its mean text→image R@1 from the default's. Recall on 1000 images moves by
one or two points from seed to seed, so a gain smaller than the spread is not a gain.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import loadavg, table

REPO = Path(__file__).resolve().parents[1]
BASELINE = "default"
KEYS = [("t2i", k) for k in (1, 5, 10)] + [("i2t", k) for k in (1, 5, 10)]
RECALL_HEADS = ["T→I R@1", "T→I R@5", "T→I R@10", "I→T R@1", "I→T R@5", "I→T R@10"]


@dataclass
class RunResult:
    """One recipe × seed: dev recall after training, and what it cost."""

    recipe: str
    seed: int
    recall: dict[str, dict[str, float]]
    train_minutes: float  # the training loop (the trainer's own clock), without the cache
    cache_minutes: float
    wall_minutes: float  # the whole command, from scratch: loading, cache, training, evaluation, saving
    cpu_minutes: float  # user + system CPU of the command and its workers
    steps: int
    command: list[str] = field(default_factory=list)
    recipe_sha: str = ""  # the recipe file's content when it ran: an edited recipe is trained again

    def cell(self, direction: str, k: int) -> float:
        return float(self.recall[direction][f"R@{k}"])


def recipe_list(names: Sequence[str]) -> list[str]:
    """The recipes to run, the baseline first (added when missing), each once."""
    return list(dict.fromkeys([BASELINE, *names]))


def train_command(recipe: str, seed: int, out: Path, common: Sequence[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "train_contrastive",
        "train",
        "--config",
        recipe,
        "--seed",
        str(seed),
        "--output",
        str(out),
        "--no-progress",
        *common,
    ]


RECORD = "sweep-run.json"


def recipe_sha(recipe: str) -> str:
    from train_contrastive.args import resolve_config

    return hashlib.sha256(resolve_config(recipe).read_bytes()).hexdigest()[:16]


def recorded(out: Path, command: Sequence[str], recipe: str) -> RunResult | None:
    """The finished run recorded in ``out`` when it was trained by ``command`` from the recipe file as it
    is now, else None."""
    try:
        data = json.loads((out / RECORD).read_text())
        result = RunResult(**data)
    except (OSError, ValueError, TypeError):
        return None
    same_command = result.command[1:] == list(command)[1:]  # any interpreter path
    return result if same_command and result.recipe_sha == recipe_sha(recipe) else None


def run_one(recipe: str, seed: int, out: Path, common: Sequence[str]) -> RunResult:
    """Train ``recipe`` with ``seed`` into ``out`` (a fresh folder: its cache is built from scratch)."""
    command = train_command(recipe, seed, out, common)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{recipe} seed {seed} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads((out / "train_report.json").read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return RunResult(
        recipe=recipe,
        seed=seed,
        recall=report["recall_after"],
        train_minutes=report["train_seconds"] / 60,
        cache_minutes=report.get("cache_seconds", 0.0) / 60,
        wall_minutes=wall / 60,
        cpu_minutes=cpu / 60,
        steps=report["steps"],
        command=command,
        recipe_sha=recipe_sha(recipe),
    )


def record(result: RunResult, out: Path) -> None:
    tmp = out / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(dataclasses.asdict(result), indent=1))
    os.replace(tmp, out / RECORD)


def sweep(
    recipes: Sequence[str],
    seeds: Sequence[int],
    root: Path,
    common: Sequence[str],
    log: Any = print,
    fresh: bool = False,
) -> list[RunResult]:
    """Every recipe × seed, seeds in the outer loop so a stopped sweep has every recipe's first seeds;
    runs recorded by an earlier call with the same command are reused unless ``fresh``."""
    results = []
    for seed in seeds:
        for recipe in recipe_list(recipes):
            out = root / f"{recipe}-seed{seed}"
            done = None if fresh else recorded(out, train_command(recipe, seed, out, common), recipe)
            if done is not None:
                log(f"{recipe} seed {seed}: recorded in {out / RECORD}, reused")
                results.append(done)
                continue
            if out.exists():
                import shutil

                shutil.rmtree(out)
            log(f"[{time.strftime('%H:%M:%S')}] {recipe} seed {seed} (load {loadavg()})")
            results.append(run_one(recipe, seed, out, common))
            record(results[-1], out)
            r = results[-1]
            cost = f"{r.wall_minutes:.1f} wall-min, {r.cpu_minutes:.1f} CPU-min"
            log(f"  t2i R@1 {r.cell('t2i', 1):.1f}, {cost}")
    return results


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def run_table(results: Sequence[RunResult]) -> str:
    rows = [
        [r.recipe, r.seed]
        + [f"{r.cell(d, k):.1f}" for d, k in KEYS]
        + [
            f"{r.train_minutes:.1f}",
            f"{r.cache_minutes:.1f}",
            f"{r.wall_minutes:.1f}",
            f"{r.cpu_minutes:.1f}",
        ]
        for r in results
    ]
    heads = ["recipe", "seed", *RECALL_HEADS, "train min", "cache min", "wall min", "CPU min"]
    return table(heads, rows)


def recipe_table(results: Sequence[RunResult]) -> str:
    """Mean ± sd over seeds per recipe, and the difference from the baseline's mean T→I R@1."""
    by_recipe: dict[str, list[RunResult]] = {}
    for r in results:
        by_recipe.setdefault(r.recipe, []).append(r)
    base = by_recipe.get(BASELINE)
    base_r1 = statistics.fmean(r.cell("t2i", 1) for r in base) if base else None
    rows = []
    for recipe, runs in by_recipe.items():
        r1 = statistics.fmean(r.cell("t2i", 1) for r in runs)
        delta = "—" if base_r1 is None or recipe == BASELINE else f"{r1 - base_r1:+.1f}"
        rows.append(
            [recipe, len(runs)]
            + [_spread([r.cell(d, k) for r in runs]) for d, k in KEYS]
            + [delta]
            + [
                f"{statistics.fmean(getattr(r, m) for r in runs):.1f}"
                for m in ("wall_minutes", "cpu_minutes")
            ]
        )
    return table(["recipe", "seeds", *RECALL_HEADS, "Δ T→I R@1", "wall min", "CPU min"], rows)


def render(results: Sequence[RunResult], common: Sequence[str], loads: tuple[str, str], machine: str) -> str:
    """The RESULTS.md section: the command, both tables, load and machine."""
    lines = [
        "Named recipes of `train_contrastive/recipes/` × seeds, each trained from scratch (cache included) "
        "on Flickr8k train and measured on dev; `default` is the baseline, run in the same sweep.",
        "",
        "```",
        " ".join(shlex.quote(c) for c in results[0].command[:4])
        + " --config RECIPE --seed SEED "
        + " ".join(shlex.quote(c) for c in common),
        "```",
        "",
        "Per recipe (mean ± sd over seeds; Δ against `default`):",
        "",
        recipe_table(results),
        "",
        "Per run:",
        "",
        run_table(results),
        "",
        f"- load average (1/5/15 min) at start {loads[0]}, at end {loads[1]}; the machine was shared with "
        "other agents, so minutes are provisional",
        f"- machine: {machine}; recorded {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
    ]
    return "\n".join(lines)
