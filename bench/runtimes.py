"""Encoder runtimes and precisions, model only: images/s at batch 32 and text-query p50 at batch 1.

Every variant runs the same random ViT-B/32-sized CLIP (``tests/checkpoints.py``) on the same
preprocessed Flickr8k photos, and is compared in the same run with the baseline, torch fp32 (the
encoder's ``--runtime torch --precision fp32``): speed, and cosine of the image and text embeddings
to that baseline. Variants: torch fp32 / bf16, torch's own int8 (``quantize_dynamic`` of the Linear
layers, built here for comparison only), ONNX Runtime fp32 / int8 and OpenVINO fp32 / bf16 / int8
(the int8 ones calibrated on photos and gated as ``indexer build`` does). Decode and preprocessing are
not timed (they are the pipeline's part, bench/embed.py). Variants alternate between rounds; the
median is reported with the load average, because the machine is shared.

    .venv/bin/python -m bench.runtimes                  # ~5 min on 2 quiet cores, ~11 at load 6
    .venv/bin/python -m bench.runtimes --write-results  # also update bench/RESULTS.md
"""

from __future__ import annotations

import copy
import csv
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import base_checkpoint, loadavg, machine, median, table, write_section
from vitrine.config import arg, parse_args, quiet_libraries
from vitrine.model.encoder import Encoder, load_components
from vitrine.model.runtimes import hardware
from vitrine.model.runtimes.calibration import Calibration

HEADING = "## Encoder runtimes (bench/runtimes.py)"
FLICKR = Path(__file__).resolve().parents[2] / "shared/datasets/flickr8k/dev"
VARIANTS = (
    ("torch", "fp32"),
    ("torch", "bf16"),
    ("torch", "int8-dynamic"),
    ("onnx", "fp32"),
    ("onnx", "int8"),
    ("openvino", "fp32"),
    ("openvino", "bf16"),
    ("openvino", "int8"),
)


@dataclass
class Args:
    """Model-only speed and fidelity of every encoder runtime/precision against torch fp32."""

    data: str = arg(str(FLICKR), "Flickr8k split folder (images/ + captions.csv); patterns if absent")
    calibrate: int = arg(64, "photos to calibrate int8 on")
    held_out: int = arg(64, "other photos: the int8 gate and the cosine columns")
    batch: int = arg(32, "images per forward for images/s")
    seconds: float = arg(4.0, "timed seconds per variant and round (images/s)")
    queries: int = arg(40, "single-caption text queries per variant and round (p50)")
    rounds: int = arg(2, "alternating rounds; the median is reported")
    variants: list[str] = arg([], "only these runtime/precision pairs, e.g. onnx/int8 (baseline always runs)")
    recall_gate: bool = arg(
        False,
        "give the int8 gate the captions too (random weights rank at chance, so R@10 moves by noise; "
        "off: the gate checks the cosine only)",
    )
    write_results: bool = arg(False, "replace this benchmark's section of bench/RESULTS.md")


@dataclass
class Variant:
    name: str
    encoder: Encoder
    note: str = ""


def photos(args: Args, encoder: Encoder) -> tuple[np.ndarray, list[tuple[str, ...]]]:
    """Preprocessed photos (calibration first, then held out) and each photo's captions."""
    folder = Path(args.data)
    wanted = args.calibrate + args.held_out
    if not (folder / "captions.csv").is_file():
        from tests.conftest import pattern_image

        images = [pattern_image(i, (320, 240)) for i in range(wanted)]
        return encoder.preprocess(images).numpy(), [(f"pattern {i}",) for i in range(wanted)]
    captions: dict[str, list[str]] = {}
    with open(folder / "captions.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            captions.setdefault(row["image"], []).append(row["caption"])
    names = sorted(captions)[:wanted]
    images = [encoder.load_image(folder / "images" / name) for name in names]
    return encoder.preprocess(images).numpy(), [tuple(captions[n]) for n in names]


def build_variants(args: Args, calibration: Calibration) -> list[Variant]:
    """One fp32 torch model shared by every variant that does not change it (exports read it)."""
    path = str(base_checkpoint())
    model, processor, tokenizer = load_components(path)
    common: dict[str, Any] = {"model_id": path, "device": "cpu", "batch_size": args.batch}
    chosen = [v for v in VARIANTS if not args.variants or "/".join(v) in args.variants or v == VARIANTS[0]]
    out = []
    for runtime, precision in chosen:
        started = time.perf_counter()
        if precision == "int8-dynamic":
            encoder = Encoder(copy.deepcopy(model), processor, tokenizer, precision="fp32", **common)
            encoder.model = torch.ao.quantization.quantize_dynamic(
                encoder.model, {torch.nn.Linear}, torch.qint8
            )
        else:
            own = copy.deepcopy(model) if (runtime, precision) == ("torch", "bf16") else model
            kwargs = {"calibration": calibration} if precision == "int8" else {}
            encoder = Encoder(
                own, processor, tokenizer, runtime=runtime, precision=precision, **common, **kwargs
            )
        note = f"ready in {time.perf_counter() - started:.0f}s"
        gate = [g for g in encoder.fingerprint.get("validation", []) if g["precision"] == "int8"]
        if gate:
            note += f"; gate: {'passed' if gate[0]['passed'] else 'REFUSED ' + gate[0]['reason']}"
        out.append(Variant(f"{runtime} {precision}", encoder, note))
        print(f"  {out[-1].name}: {note}", flush=True)
    return out


def images_per_second(encoder: Encoder, pixels: torch.Tensor, seconds: float) -> float:
    encoder.encode_pixels(pixels)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        encoder.encode_pixels(pixels)
        done += len(pixels)
    return done / (time.perf_counter() - start)


def text_p50_ms(encoder: Encoder, queries: Sequence[str]) -> float:
    encoder.encode_texts([queries[0]])
    times = []
    for query in queries:
        start = time.perf_counter()
        encoder.encode_texts([query])
        times.append((time.perf_counter() - start) * 1000)
    return median(times)


def fidelity(
    variant: Variant, reference: tuple[np.ndarray, np.ndarray], held_out: torch.Tensor, texts: list[str]
) -> tuple[float, float]:
    """(min image cosine, min text cosine) to the torch fp32 ``reference`` (image, text embeddings)."""
    image = np.sum(variant.encoder.encode_pixels(held_out) * reference[0], 1)
    text = np.sum(variant.encoder.encode_texts(texts) * reference[1], 1)
    return float(image.min()), float(text.min())


def measure(args: Args, variants: list[Variant], pixels: np.ndarray, queries: list[str]) -> list[list[Any]]:
    batch = torch.from_numpy(pixels[args.calibrate : args.calibrate + args.batch])
    speed: dict[str, list[float]] = {v.name: [] for v in variants}
    latency: dict[str, list[float]] = {v.name: [] for v in variants}
    for round_ in range(args.rounds):
        order = variants if round_ % 2 == 0 else variants[::-1]
        for v in order:
            speed[v.name].append(images_per_second(v.encoder, batch, args.seconds))
            latency[v.name].append(text_p50_ms(v.encoder, queries))
            rate, p50 = speed[v.name][-1], latency[v.name][-1]
            print(f"  round {round_ + 1} {v.name}: {rate:.1f} img/s, text p50 {p50:.2f} ms", flush=True)
    held_out = torch.from_numpy(pixels[args.calibrate :])
    base = variants[0]
    reference = (base.encoder.encode_pixels(held_out), base.encoder.encode_texts(queries))
    rows = []
    for v in variants:
        image_cos, text_cos = fidelity(v, reference, held_out, queries)
        rate, p50 = median(speed[v.name]), median(latency[v.name])
        ratio = rate / median(speed[base.name])
        rows.append(
            [
                v.name,
                f"{rate:.1f}",
                f"{ratio:.2f}",
                f"{p50:.2f}",
                f"{image_cos:.5f}",
                f"{text_cos:.5f}",
                v.note,
            ]
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(Args, argv, prog="python -m bench.runtimes")
    quiet_libraries()
    started, load_start = time.time(), loadavg()
    print(
        f"machine: {machine()}\nCPU: {hardware.describe()}\nload average at start: {load_start}", flush=True
    )
    probe = Encoder.from_pretrained(str(base_checkpoint()), device="cpu", precision="fp32")
    pixels, captions = photos(args, probe)
    del probe
    held_captions = captions[args.calibrate :] if args.recall_gate else []
    calibration = Calibration(pixels[: args.calibrate], pixels[args.calibrate :], held_captions)
    queries = [caps[0] for caps in captions[args.calibrate :]][: args.queries]
    variants = build_variants(args, calibration)
    rows = measure(args, variants, pixels, queries)
    headers = [
        "variant",
        "images/s (b32)",
        "x torch fp32",
        "text p50 ms (b1)",
        "min cos image",
        "min cos text",
        "notes",
    ]
    result = table(headers, rows)
    load_end, wall = loadavg(), time.time() - started
    print(f"\n{result}\n\nload average at end: {load_end}; wall {wall:.0f} s")
    if args.write_results:
        command = shlex.join(
            [".venv/bin/python", "-m", "bench.runtimes", *(argv if argv is not None else sys.argv[1:])]
        )
        write_section(HEADING, report(command, load_start, load_end, wall, result, args))
    return 0


def report(command: str, load_start: str, load_end: str, wall: float, result: str, args: Args) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (
        f"Command: `{command}`  \nDate: {when}  \n"
        f"Machine: {machine()}; CPU features read at run time: {hardware.describe()}  \n"
        f"Load average (1/5/15 min) at start {load_start}, at end {load_end}; wall {wall:.0f} s. "
        "The machine was shared with other agents: the numbers are provisional.\n\n"
        "Model only (preprocessed pixels in, normalised embeddings out), "
        f"median of {args.rounds} alternating rounds; images/s at batch {args.batch}; "
        f"text p50 over {args.queries} single-caption queries at batch 1. Cosines: minimum over "
        f"{args.held_out} held-out Flickr8k photos and their first captions against torch fp32. int8 is "
        f"calibrated on {args.calibrate} other photos and gated like a build "
        f"({'cosine and text→image R@10' if args.recall_gate else 'cosine only: random weights'}).\n\n"
        f"{result}\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
