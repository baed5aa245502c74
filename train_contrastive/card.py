"""The model card (``README.md``) written next to the fine-tuned weights.

It records what a reader needs to trust or reproduce the checkpoint: where it started, the data, every
hyperparameter, recall before and after on the evaluation catalog, and how long training took.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _recall_table(before: dict | None, after: dict | None) -> str:
    if not after:
        return "No evaluation catalog was given (`--eval-data`), so recall was not measured.\n"
    lines = ["| | T→I R@1 | T→I R@5 | T→I R@10 | I→T R@1 | I→T R@5 | I→T R@10 |", "|---" * 7 + "|"]
    for label, report in (("before", before), ("after", after)):
        if report:
            cells = [f"{report[d][f'R@{k}']:.1f}" for d in ("t2i", "i2t") for k in (1, 5, 10)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    sizes = f"\n{after['images']} images, {after['captions']} captions; recall in percent.\n"
    return "\n".join(lines) + "\n" + sizes


_POSITIVES = {
    "one": "one caption sampled per image per epoch",
    "all": "all of its captions as positives at every step",
}


def _blocks(report: dict[str, Any]) -> str:
    blocks = report.get("trainable_blocks")
    if not blocks:
        return ""
    return f" (last blocks trained: vision {blocks['vision']}, text {blocks['text']}; -1 = all)"


def write_card(path: Path, report: dict[str, Any]) -> None:
    """``report`` is the training report (see ``train_contrastive.loop.train``)."""
    args = report["args"]
    start = args.get("model") or f"vision `{args.get('vision_model')}` + text `{args.get('text_model')}`"
    minutes = report["train_seconds"] / 60
    text = f"""---
library_name: transformers
tags: [vitrine, clip, image-text-retrieval, contrastive]
---

# Fine-tuned image–text encoder (Vitrine)

Produced by `python -m train_contrastive train`. Load it with
`python -m indexer build CATALOG --model {Path(args["output"]).name}` or any of
`transformers.AutoModel` / `AutoImageProcessor` / `AutoTokenizer`; embeddings are defined by
`vitrine.model.embedding` (pooling: `{json.dumps(report["pooling"])}`).

## Start
{start} ({report["model_kind"]}).

## Data
- train: `{args["train_data"]}` — {report["train_pairs"]} images, {_POSITIVES.get(args.get("positives"), "")}
  ({report["train_skipped"]} files skipped as undecodable)
- eval: `{args.get("eval_data")}`

## Training
- {report["steps"]} optimizer steps, {report["epochs_run"]} epoch(s), {report["train_seconds"]:.0f} s
  ({minutes:.1f} min), {report["samples_per_second"]:.1f} samples/s on {report["device"]}
  × {report["processes"]} process(es); frozen-layer cache: {report["cached"]}
- trainable parameters: {report["trainable"]:,} of {report["total"]:,}{_blocks(report)}
- final temperature: {report["temperature"]:.4f}; stopped because: {report["stop_reason"]}

## Recall (evaluation catalog)
{_recall_table(report.get("recall_before"), report.get("recall_after"))}
## Hyperparameters
```json
{json.dumps(args, indent=2, sort_keys=True)}
```
"""
    path.write_text(text)
