"""Image embedding throughput of the full pipeline (JPEG decode + preprocessing + ViT-B/32-sized CLIP).

Every variant embeds the same JPEG files from disk (page cache warm) and is compared in the same run
with a naive loop (PIL open -> the checkpoint's processor -> fp32 model, one batch at a time, nothing
overlapped), and against the fp32 reference embeddings (full decode, checkpoint processor, fp32 model)
by cosine. Two image sets: the real Flickr8k photos (small, 224 px) and the same photos upscaled to
catalog size (1024x768 JPEG q90, generated once into a cache folder). Variants are alternated between
rounds and the median is reported, with the load average, because the machine is shared.

Variants that need core changes (bf16 weights, a faster preprocessing path) are built here by composing
or subclassing :class:`vitrine.model.encoder.Encoder`; the core is not modified.

    .venv/bin/python bench/embed.py                    # everything, ~8 min on 2 cores
    .venv/bin/python bench/embed.py --rounds 1 --n 64  # quicker
    .venv/bin/python bench/embed.py --write-results    # also update bench/RESULTS.md
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from bench.common import (
    CACHE_DIR,
    base_checkpoint,
    loadavg,
    machine,
    median,
    table,
    timed,
    write_section,
)
from bench.embed_variants import (
    AutocastEncoder,
    ChannelsLastEncoder,
    FastPreprocessEncoder,
    Runner,
    Variant,
    bf16_model,
    compiled_model,
    derive,
    eager_model,
    encoder_runner,
    naive_runner,
)
from vitrine.config import arg, parse_args, quiet_libraries
from vitrine.images import decode_image
from vitrine.model.encoder import Encoder, FastPreprocess

HEADING = "## Embedding throughput (bench/embed.py)"
DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared/datasets/flickr8k/dev/images"
MIN_COSINE = 0.999
#: Throughput per CORES CPU-seconds of this process: on a machine shared with other jobs, wall-clock
#: images/s mostly measures the neighbours; CPU time estimates the quiet-machine rate (upper bound).
CORES = os.cpu_count() or 1


@dataclasses.dataclass
class Args:
    """Image embedding throughput: naive loop vs the Encoder pipeline and its speed knobs."""

    images: str = arg(str(DEFAULT_IMAGES), "folder of real JPEGs (generated photos are used if absent)")
    n: int = arg(64, "images per measurement (a multiple of the batch sizes avoids odd last batches)")
    rounds: int = arg(2, "alternating rounds per variant; the median is reported")
    large: str = arg("1024x768", "size of the generated catalog-size JPEGs (WxH)")
    sets: list[str] = arg(["small", "large"], "image sets to measure", choices=["small", "large"])
    variants: list[str] = arg([], "only these variant names (default: all); the naive loop always runs")
    compile: bool = arg(True, "include torch.compile variants (each compiles for ~1 min on 2 cores)")
    write_results: bool = arg(False, "replace this benchmark's section of bench/RESULTS.md")


# ---------------------------------------------------------------------------------------------------
# Image sets
# ---------------------------------------------------------------------------------------------------
def _synthetic_photo(rng: np.random.Generator, width: int, height: int, grid: int = 8) -> Image.Image:
    """Smooth colour fields with texture and edges: compresses and decodes like a photo, not like noise."""
    low = rng.random((grid * 3 // 4, grid, 3)) * 255
    image = Image.fromarray(low.astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    pixels = np.asarray(image).astype(np.int16) + rng.normal(0, 12, (height, width, 3)).astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def image_sets(args: Args) -> dict[str, list[Path]]:
    """{'small': real Flickr8k JPEGs (or generated 320x240), 'large': catalog-size JPEG q90}."""
    width, height = (int(v) for v in args.large.lower().split("x"))
    source = Path(args.images)
    real = sorted(source.glob("*.jpg"))[: args.n] if source.is_dir() else []
    sets: dict[str, list[Path]] = {}
    rng = np.random.default_rng(0)
    if len(real) < args.n:
        folder = CACHE_DIR / "generated-small"
        folder.mkdir(parents=True, exist_ok=True)
        real = [folder / f"{i:05d}.jpg" for i in range(args.n)]
        for path in real:
            if not path.exists():
                _synthetic_photo(rng, 320, 240).save(path, "JPEG", quality=90)
    sets["small"] = real
    folder = CACHE_DIR / f"large-{width}x{height}-{'flickr' if source.is_dir() else 'generated'}"
    folder.mkdir(parents=True, exist_ok=True)
    large = []
    for i, src in enumerate(real):
        path = folder / f"{i:05d}.jpg"
        if not path.exists():
            photo = Image.open(src).convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
            photo.save(path, "JPEG", quality=90)
        large.append(path)
    sets["large"] = large
    for paths in sets.values():
        for path in paths:  # page cache: the benchmark measures decoding, not the disk
            path.read_bytes()
    return {name: sets[name] for name in args.sets}


# ---------------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------------
def variants(base: Encoder, args: Args) -> list[Variant]:
    bf16 = torch.bfloat16
    shared_bf16: dict[str, torch.nn.Module] = {}

    def b16() -> torch.nn.Module:
        if "m" not in shared_bf16:
            shared_bf16["m"] = bf16_model(base.model)
        return shared_bf16["m"]

    def enc(**kw: Any) -> Runner:
        threads, mkldnn = kw.pop("threads", None), kw.pop("mkldnn", None)
        return encoder_runner(derive(base, **kw), threads, mkldnn)

    fast = FastPreprocessEncoder
    out = [
        Variant("naive", lambda: naive_runner(base), "PIL open -> processor -> fp32 model, no overlap"),
        Variant(
            "encoder fp32 (current defaults)",
            lambda: enc(),
            "encode_images: batch 32, 2 decode threads, no draft",
        ),
        Variant("fp32 +draft224", lambda: enc(draft_size=224), "JPEG DCT-scaled decode"),
        Variant("fp32 +fastpre", lambda: enc(cls=fast), "exact processor arithmetic, no round trips"),
        Variant("bf16", lambda: enc(model=b16(), dtype=bf16), "bf16 weights+activations (avx512_bf16)"),
        Variant("bf16 +draft224", lambda: enc(model=b16(), dtype=bf16, draft_size=224)),
        Variant(
            "bf16 +draft224 +fastpre",
            lambda: enc(cls=fast, model=b16(), dtype=bf16, draft_size=224),
            "the encoder's defaults on a bf16 CPU",
        ),
        Variant(
            "bf16 +draft224 +fastpre b16",
            lambda: enc(cls=fast, model=b16(), dtype=bf16, draft_size=224, batch_size=16),
        ),
        Variant(
            "bf16 +draft224 +fastpre b8",
            lambda: enc(cls=fast, model=b16(), dtype=bf16, draft_size=224, batch_size=8),
        ),
        Variant(
            "bf16 +draft224 +fastpre 1 worker",
            lambda: enc(cls=fast, model=b16(), dtype=bf16, draft_size=224, num_workers=1),
        ),
        Variant(
            "bf16 +draft224 +fastpre torch 1 thread",
            lambda: enc(cls=fast, model=b16(), dtype=bf16, draft_size=224, threads=1),
            "torch.set_num_threads(1): decode threads get the other core",
        ),
        # Model-side knobs: measured on the small set, where decoding is ~2% of the work.
        Variant(
            "fp32 autocast bf16", lambda: enc(cls=AutocastEncoder), "fp32 weights, autocast", sets=("small",)
        ),
        Variant(
            "fp32 int8 dynamic",
            lambda: enc(
                model=torch.ao.quantization.quantize_dynamic(
                    copy.deepcopy(base.model), {torch.nn.Linear}, dtype=torch.qint8
                )
            ),
            "quantize_dynamic(Linear)",
            sets=("small",),
        ),
        Variant(
            "fp32 eager attention",
            lambda: enc(model=eager_model(base.model)),
            "vs SDPA (the default)",
            sets=("small",),
        ),
        Variant(
            "fp32 channels-last",
            lambda: enc(
                cls=ChannelsLastEncoder, model=copy.deepcopy(base.model).to(memory_format=torch.channels_last)
            ),
            "only the patch conv is 4-D",
            sets=("small",),
        ),
        Variant(
            "fp32 mkldnn off",
            lambda: enc(mkldnn=False),
            "torch.backends.mkldnn.enabled=False",
            sets=("small",),
        ),
        Variant("bf16 mkldnn off", lambda: enc(model=b16(), dtype=bf16, mkldnn=False), sets=("small",)),
    ]
    if args.compile:
        out += [
            Variant(
                "fp32 torch.compile",
                lambda: enc(model=compiled_model(base.model, torch.float32, False)),
                "inductor, vision tower",
                sets=("small",),
                cold=True,
            ),
            Variant(
                "bf16 torch.compile freezing",
                lambda: enc(model=compiled_model(base.model, bf16, True), dtype=bf16),
                "inductor + freezing (weight prepacking)",
                sets=("small",),
                cold=True,
            ),
        ]
    if args.variants:
        out = [v for v in out if v.name == "naive" or v.name in args.variants]
    return out


# ---------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------
def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).min())


def check_fast_preprocess(enc: Encoder, sets: dict[str, list[Path]]) -> float:
    """Max |fast - processor| over every benchmark image (full and draft decode) plus odd shapes."""
    fast = FastPreprocess(enc.image_processor)  # unverified: compared below
    if not fast.supported:
        return float("nan")
    images: list[Image.Image] = []
    for paths in sets.values():
        for path in paths[:48]:
            images.append(decode_image(path))
            images.append(decode_image(path, draft_size=224))
    first = images[0]
    for w, h in ((333, 500), (500, 333), (225, 1000), (1000, 225), (224, 224), (1280, 720), (719, 1279)):
        images.append(first.resize((w, h), Image.Resampling.BILINEAR))
    worst = 0.0
    for image in images:
        want = enc.image_processor(images=[image], return_tensors="np")["pixel_values"][0]
        worst = max(worst, float(np.abs(fast(image) - want).max()))
    return worst


def detail_cosines(base: Encoder, n: int, size: tuple[int, int]) -> list[list[Any]]:
    """Draft decoding on *detailed* catalog-size photos (the upscaled Flickr set is smooth, which flatters
    it): min cosine vs the fp32 full-decode reference on generated high-frequency 1024x768 JPEGs."""
    folder = CACHE_DIR / f"detail-{size[0]}x{size[1]}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = [folder / f"{i:05d}.jpg" for i in range(n)]
    for path in paths:
        if not path.exists():
            _synthetic_photo(rng, *size, grid=64).save(path, "JPEG", quality=90)
    reference = naive_runner(base)(paths)
    b16 = bf16_model(base.model)
    candidates = {
        "fp32 +draft224": derive(base, draft_size=224),
        "bf16": derive(base, model=b16, dtype=torch.bfloat16),
        "bf16 +draft224 +fastpre": derive(
            base, FastPreprocessEncoder, model=b16, dtype=torch.bfloat16, draft_size=224
        ),
    }
    return [[name, f"{min_cosine(e.encode_images(paths), reference):.5f}"] for name, e in candidates.items()]


def stage_costs(enc: Encoder, sets: dict[str, list[Path]]) -> list[list[Any]]:
    """Single-thread ms per image for each stage, to see where the time goes."""
    fast = FastPreprocess(enc.image_processor)  # unverified: compared below

    def processor(image: Image.Image) -> Any:
        return enc.image_processor(images=[image], return_tensors="np")

    rows = []
    for name, paths in sets.items():
        sample = paths[:24]
        full = [decode_image(p) for p in sample]
        draft = [decode_image(p, draft_size=224) for p in sample]

        def per_image(fn: Callable[[Any], Any], items: Sequence[Any]) -> float:
            seconds, _ = timed(lambda: [fn(x) for x in items])
            return 1000 * seconds / len(items)

        rows.append(
            [
                name,
                f"{full[0].size[0]}x{full[0].size[1]}",
                f"{per_image(decode_image, sample):.1f}",
                f"{per_image(lambda p: decode_image(p, draft_size=224), sample):.1f}",
                f"{per_image(lambda im: processor(im), full):.1f}",
                f"{per_image(fast, full):.1f}",
                f"{per_image(fast, draft):.1f}",
            ]
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(Args, argv, prog="bench/embed.py")
    quiet_libraries()
    started = time.time()
    sets = image_sets(args)
    # The baseline is the plain fp32 pipeline; each variant switches on what it measures.
    base = Encoder.from_pretrained(
        str(base_checkpoint()), device="cpu", batch_size=32, num_workers=2, bf16=False, draft_size=None
    )
    base._fast = None
    print(f"machine: {machine()}\nload average at start: {loadavg()}", flush=True)
    print(f"images: {', '.join(f'{k}={len(v)}' for k, v in sets.items())} (from {args.images})", flush=True)

    pre_diff = check_fast_preprocess(base, sets)
    print(f"fast preprocessing vs checkpoint processor: max |diff| = {pre_diff:.2e}", flush=True)
    stages = stage_costs(base, sets)
    stage_table = table(
        [
            "set",
            "size",
            "decode ms",
            "decode draft224 ms",
            "processor ms",
            "fastpre ms",
            "fastpre after draft ms",
        ],
        stages,
    )
    print(stage_table, flush=True)

    width, height = (int(v) for v in args.large.lower().split("x"))
    details = table(
        ["variant", "min cosine (high-detail generated photos)"], detail_cosines(base, 32, (width, height))
    )
    print(details, flush=True)
    reference = {name: naive_runner(base)(paths) for name, paths in sets.items()}
    all_variants = variants(base, args)
    runners: dict[str, Runner] = {}
    cold: dict[str, str] = {}
    cosines: dict[tuple[str, str], float] = {}
    speeds: dict[tuple[str, str], list[float]] = {}
    cpu_speeds: dict[tuple[str, str], list[float]] = {}
    loads: list[float] = []
    for v in all_variants:  # set-up and warm-up (one batch), outside the timed rounds
        setup_s, runners[v.name] = timed(v.make)
        warm = sets[v.sets[0]][: base.batch_size]
        if v.cold:
            seconds, _ = timed(lambda r=runners[v.name], w=warm: r(w))
            cold[v.name] = f"cold: first batch {seconds + setup_s:.0f} s incl. compile"
        else:
            runners[v.name](warm[:8])
        print(f"  ready: {v.name} ({setup_s:.1f} s set-up)", flush=True)

    for r in range(args.rounds):
        order = all_variants[r % len(all_variants) :] + all_variants[: r % len(all_variants)]
        order = order if r % 2 == 0 else order[::-1]
        for name, paths in sets.items():
            for v in order:
                if name not in v.sets:
                    continue
                cpu0 = time.process_time()
                seconds, emb = timed(lambda r_=runners[v.name], p=paths: r_(p))
                cpu_s = time.process_time() - cpu0
                speeds.setdefault((v.name, name), []).append(len(paths) / seconds)
                cpu_speeds.setdefault((v.name, name), []).append(len(paths) / (cpu_s / CORES))
                cosines[(v.name, name)] = min(
                    cosines.get((v.name, name), 1.0), min_cosine(emb, reference[name])
                )
                loads.append(os.getloadavg()[0])
                print(
                    f"  round {r + 1} {name:5s} {v.name:40s} {len(paths) / seconds:6.1f} img/s "
                    f"{len(paths) / (cpu_s / CORES):6.1f} img/{CORES} CPU-s (load {loads[-1]:.2f})",
                    flush=True,
                )

    sections = []
    best: dict[str, tuple[float, str]] = {}
    for name in sets:
        naive = median(speeds[("naive", name)])
        naive_cpu = median(cpu_speeds[("naive", name)])
        rows = []
        for v in all_variants:
            if name not in v.sets:
                continue
            speed, cos = median(speeds[(v.name, name)]), cosines[(v.name, name)]
            cpu_speed = median(cpu_speeds[(v.name, name)])
            notes = "; ".join(x for x in (v.notes, cold.get(v.name, "")) if x)
            rows.append(
                [
                    v.name,
                    f"{speed:.1f}",
                    f"{speed / naive:.2f}",
                    f"{cos:.5f}",
                    f"{cpu_speed:.1f}",
                    f"{cpu_speed / naive_cpu:.2f}",
                    notes,
                ]
            )
            if v.sets == ("small", "large") and cos >= MIN_COSINE:
                best[v.name] = (best.get(v.name, (0.0, ""))[0] + cpu_speed, v.name)
        width, height = Image.open(sets[name][0]).size
        title = f"{name} images ({width}x{height} JPEG, e.g. {sets[name][0].name}), n={len(sets[name])}"
        text = table(
            [
                "variant",
                "images/s",
                "x naive",
                "min cosine vs fp32 ref",
                f"images per {CORES} CPU-s",
                "x naive (CPU)",
                "notes",
            ],
            rows,
        )
        sections.append(f"**{title}**\n\n{text}")
        print(f"\n{title}\n{text}", flush=True)
    winner = max(best.values())[1] if best else "?"
    summary = (
        f"load average (1 min) during rounds: min {min(loads):.2f}, median {median(loads):.2f}, "
        f"max {max(loads):.2f}; at end: {loadavg()}; wall time {time.time() - started:.0f} s"
    )
    print(f"\n{summary}\nfastest variant on both sets with min cosine >= {MIN_COSINE}: {winner}")
    if args.write_results:
        given = list(argv) if argv is not None else sys.argv[1:]
        command = shlex.join([".venv/bin/python", "bench/embed.py", *given])
        body = "\n\n".join(
            [
                f"Command: `{command.strip()}`  \nMachine: {machine()}  \n{summary}.",
                "Median of the rounds; `x naive` divides by the naive loop measured in the same run. "
                f"`images per {CORES} CPU-s` = images / (process CPU seconds / {CORES}): the rate on a quiet "
                f"{CORES}-core machine if the work parallelised perfectly (an upper bound; less sensitive to "
                "the neighbours' load than wall-clock images/s). "
                "Min cosine is over every image against the fp32 reference (full decode, checkpoint "
                "processor, fp32 model). Random-weight ViT-B/32-sized CLIP "
                "(`make_clip_checkpoint(size='base')`).",
                f"Fast preprocessing vs the checkpoint processor: max |diff| = {pre_diff:.2e} "
                "(all benchmark images, full and draft decode, plus 7 odd shapes).",
                "Stage costs, single thread, ms per image:\n\n" + stage_table,
                "Draft decoding on 32 generated high-detail 1024x768 JPEGs (q90), "
                "fp32 reference = full decode:"
                "\n\n" + details,
                *sections,
                f"Fastest variant on both sets with min cosine >= {MIN_COSINE}: **{winner}**.",
            ]
        )
        write_section(HEADING, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
