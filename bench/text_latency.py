"""Text query encoding latency by query length, per encoder runtime and precision (issue 14 item 2).

A server encodes one query per request, so this times ``Encoder.encode_texts([query])`` at batch 1: 40
timed calls after 5 warm-ups, the median reported, each runtime loaded as a server loads it (torch
traced). The default checkpoint is the random ViT-B/32-sized CLIP of ``tests/checkpoints.py``, whose test
tokenizer is character-level: the queries are chosen by their token count, so a short string stands for a
query of typical CLIP-BPE length (5-15 tokens).

    .venv/bin/python -m bench.text_latency
    .venv/bin/python -m bench.text_latency --variants torch:bf16 openvino:bf16
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import base_checkpoint, loadavg, machine, table
from vitrine.config import arg, parse_args, quiet_libraries

QUERIES = (
    "a dog..",
    "a dog running on the beach",
    "a small child in a yellow raincoat jumping into a muddy puddle",
)


@dataclass(kw_only=True)
class TextLatencyArgs:
    """Text query p50 by token count for each RUNTIME:PRECISION."""

    model: str = arg("", "checkpoint folder (default: a random ViT-B/32-sized CLIP, built once)")
    variants: list[str] = arg(
        ["torch:bf16", "torch:fp32", "openvino:bf16", "onnx:fp32"], "RUNTIME:PRECISION pairs to time"
    )
    calls: int = arg(40, "timed calls per query")


def p50_ms(encoder, query: str, calls: int) -> float:
    for _ in range(5):
        encoder.encode_texts([query])
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        encoder.encode_texts([query])
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> int:
    a = parse_args(TextLatencyArgs, argv, prog="python -m bench.text_latency")
    quiet_libraries()
    from vitrine.model.encoder import Encoder

    path = a.model or str(base_checkpoint("base"))
    print(f"{machine()}\nload average at start: {loadavg()}", flush=True)
    rows, lengths = [], []
    for variant in a.variants:
        runtime, precision = variant.split(":")
        encoder = Encoder.from_pretrained(path, device="cpu", runtime=runtime, precision=precision)
        encoder.trace()
        lengths = [int(encoder.tokenize([q])["input_ids"].shape[1]) for q in QUERIES]
        rows.append([f"{runtime} {precision}", *(f"{p50_ms(encoder, q, a.calls):.2f}" for q in QUERIES)])
    print(table(["runtime / precision", *(f"p50 ms, {n} tokens" for n in lengths)], rows))
    print(f"load average at end: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
