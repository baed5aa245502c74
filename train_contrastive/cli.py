"""Command line: ``train`` and ``evaluate``.

    python -m train_contrastive train --vision-model V --text-model T \
        --train-data TR --eval-data EV --output OUT
    accelerate launch -m train_contrastive train ...            # same code path, N processes
    python -m train_contrastive evaluate --model M --data CATALOG [--slice FIELD] [--json]
    python -m train_contrastive train --config recipe.yaml      # any flag can come from a JSON/YAML file

Exit status: 0 on success, 1 with a one-line ``error: ...`` on stderr for a fatal problem (bad data,
unloadable model, nothing to resume), 2 for usage errors.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from train_contrastive.args import EvaluateArgs, TrainArgs, parse
from vitrine.config import quiet_libraries
from vitrine.errors import VitrineError

USAGE = "usage: python -m train_contrastive {train,evaluate} [options]   (add -h for the options of each)"


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def _recall_line(report: dict) -> str:
    cells = [f"{d} " + " ".join(f"{k}={v:.1f}" for k, v in report[d].items()) for d in ("t2i", "i2t")]
    return " | ".join(cells) + f" | {report['images']} images, {report['captions']} captions"


def _slice_lines(report: dict) -> list[str]:
    """One line per slice: its value, counts, and R@k (95 % interval) both ways."""
    lines = [f"per {report['slice_field']}:"]
    for s in report["slices"]:
        cells = [
            f"{d} "
            + " ".join(
                f"{k}={v:.1f} [{s[d + '_ci'][k][0]:.1f}, {s[d + '_ci'][k][1]:.1f}]" for k, v in s[d].items()
            )
            for d in ("t2i", "i2t")
        ]
        lines.append(
            f"  {s['value']!r} ({s['images']} images, {s['captions']} captions): " + " | ".join(cells)
        )
    return lines


def cmd_train(a: TrainArgs) -> int:
    from train_contrastive.loop import train

    report = train(a, log=lambda message: print(message, file=sys.stderr, flush=True))
    from accelerate import PartialState

    if PartialState().is_main_process:
        # A run resumed without --eval-data keeps its "before" but measures no "after".
        for label, key in (("before: ", "recall_before"), ("after:  ", "recall_after")):
            if report[key]:
                print(label + _recall_line(report[key]))
        took = f"{report['steps']} steps, {report['train_seconds']:.0f} s, {report['stop_reason']}"
        print(f"saved {a.output} ({took})")
    return 0


def cmd_evaluate(a: EvaluateArgs) -> int:
    from vitrine.catalog.readers import open_catalog
    from vitrine.evaluate import evaluate_catalog
    from vitrine.model.encoder import DEFAULT_MODEL, Encoder

    catalog = open_catalog(a.data, image_column=a.image_column, caption_column=a.caption_column)
    encoder = Encoder.from_pretrained(a.model or DEFAULT_MODEL, **a.encoder_kwargs())
    report = evaluate_catalog(encoder, catalog, slice_field=a.slice)
    if a.json:
        print(json.dumps(report.to_dict()))
    else:
        print(_recall_line(report.to_dict()))
        if a.slice is not None:
            print("\n".join(_slice_lines(report.to_dict())))
        for path, reason in report.skipped:
            print(f"skipped {path}: {reason}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    prog = f"python -m train_contrastive {command}"
    quiet_libraries()
    try:
        if command == "train":
            return cmd_train(parse(TrainArgs, rest, prog))
        if command == "evaluate":
            return cmd_evaluate(parse(EvaluateArgs, rest, prog))
    except VitrineError as exc:
        return _fail(str(exc))
    print(f"unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2
