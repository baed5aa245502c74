"""GPU paths in one prepared run: ViT-B/32-sized encoders end to end (decode included) and GPU FAISS.

Written to be run once, unattended, on a borrowed GPU machine (``run`` in the device tool), so it needs
nothing but the repository: it makes its own JPEGs (catalog-sized, 640x480 q90) and a random ViT-B/32-sized
CLIP (random weights cost exactly what trained ones do). Rows, all in the same run:

- ``naive``: PIL open -> the checkpoint's processor -> fp32 ``get_image_features``, batch 32, nothing
  overlapped (the baseline the issue names);
- ``encoder fp16`` / ``encoder bf16``: :class:`vitrine.model.encoder.Encoder` end to end from JPEG files,
  decode and preprocessing in ``--workers`` threads overlapped with the model;
- ``model only``: the forward alone on preprocessed pixels at ``--batch`` (the ceiling decode must feed);
- FAISS: GPU k-means training of an IVF coarse quantizer and GPU search, against the CPU in the same run
  (skipped with a reason when faiss-cpu is installed).

On a machine without CUDA it prints one line saying so and exits 0.

    python -m bench.gpu --images 4000 --workers 16 --out $OUT/gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from bench.common import base_checkpoint, table


@dataclass
class Args:
    images: int
    workers: int
    batch: int
    vectors: int
    out: Path | None


def parse(argv: list[str] | None) -> Args:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4000, help="JPEGs to encode end to end")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 4, help="decode/preprocess threads")
    p.add_argument("--batch", type=int, default=256, help="images per forward on the GPU")
    p.add_argument("--vectors", type=int, default=2_000_000, help="vectors for the FAISS rows (dim 512)")
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    return Args(**vars(p.parse_args(argv)))


def make_jpegs(folder: Path, n: int) -> list[Path]:
    """Distinct catalog-sized JPEGs: smooth gradients plus noise, so they compress like photos."""
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, 640, dtype=np.float32)[None, :, None].repeat(480, 0).repeat(3, 2)
    paths = []
    for i in range(n):
        pixels = (base * rng.uniform(0.3, 1.0, 3) + rng.normal(0, 12, base.shape)).clip(0, 255)
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def rate(n: int, fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def naive(checkpoint: Path, paths: list[Path]) -> float:
    from transformers import AutoImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(checkpoint).cuda().eval()
    processor = AutoImageProcessor.from_pretrained(checkpoint, backend="pil")

    def loop() -> None:
        with torch.inference_mode():
            for i in range(0, len(paths), 32):
                images = [Image.open(p).convert("RGB") for p in paths[i : i + 32]]
                pixels = processor(images=images, return_tensors="pt")["pixel_values"].cuda()
                model.get_image_features(pixel_values=pixels)

    return rate(len(paths), loop)


def encoder_rows(checkpoint: Path, paths: list[Path], args: Args) -> list[tuple]:
    return [
        row for dtype in (torch.float16, torch.bfloat16) for row in _encoder(checkpoint, paths, args, dtype)
    ]


def _encoder(checkpoint: Path, paths: list[Path], args: Args, dtype: torch.dtype) -> list[tuple]:
    from vitrine.model.encoder import Encoder

    encoder = Encoder.from_pretrained(
        str(checkpoint), device="cuda", batch_size=args.batch, num_workers=args.workers
    )
    encoder.model.to(dtype)  # the Encoder's own knob is fp16 on CUDA; bf16 is set here for the comparison
    encoder.dtype = dtype
    name = str(dtype).removeprefix("torch.")
    encoder.encode_images(paths[: args.batch])  # warm-up: cuDNN/cuBLAS plans
    end_to_end = rate(len(paths), lambda: encoder.encode_images(paths))
    pixels, loops = torch.randn(args.batch, 3, 224, 224), 20
    encoder.encode_pixels(pixels)
    model_only = rate(args.batch * loops, lambda: [encoder.encode_pixels(pixels) for _ in range(loops)])
    return [
        (f"encoder {name}, decode included", end_to_end),
        (f"model only {name}, batch {args.batch}", model_only),
    ]


def faiss_rows(n: int) -> list[tuple]:
    import faiss

    from vitrine.index import gpu

    if gpu.gpu_count() == 0:
        return [("faiss", "skipped: faiss-cpu installed (pip install -r requirements-gpu.txt)")]
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4096, 512)).astype(np.float32)
    data = centres[rng.integers(0, 4096, n)] + 0.3 * rng.normal(size=(n, 512)).astype(np.float32)
    faiss.normalize_L2(data)
    queries = data[rng.integers(0, n, 10_000)]
    rows = []
    for where in ("cpu", "gpu"):
        index = faiss.index_factory(512, "IVF16384,Flat", faiss.METRIC_INNER_PRODUCT)
        context = gpu.gpu_training(index) if where == "gpu" else contextlib.nullcontext()
        start = time.perf_counter()
        with context:
            index.train(data[: 16384 * 40])
        rows.append((f"IVF16384 k-means, {where}", f"{time.perf_counter() - start:.1f} s"))
        index.add(data)
        index.nprobe = 64
        searcher = faiss.index_cpu_to_all_gpus(index) if where == "gpu" else index
        start = time.perf_counter()
        searcher.search(queries, 10)
        rows.append((f"search nprobe 64, {where}", f"{len(queries) / (time.perf_counter() - start):.0f} q/s"))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not torch.cuda.is_available():
        print("bench.gpu: no CUDA device here; nothing measured")
        return 0
    checkpoint = base_checkpoint()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.images)
        rows = [("naive fp32, batch 32", naive(checkpoint, paths))]
        rows += encoder_rows(checkpoint, paths, args)
    shown = [(name, f"{value:.0f} img/s" if isinstance(value, float) else value) for name, value in rows]
    shown += faiss_rows(args.vectors)
    print(f"GPU: {torch.cuda.get_device_name()}; CPU threads: {os.cpu_count()}; workers {args.workers}")
    print(table(["path", "result"], shown))
    if args.out:
        args.out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": shown}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
