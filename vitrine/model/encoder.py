"""Encoder: any CLIP-family checkpoint → L2-normalised float32 embeddings of images and texts.

Preprocessing always comes from the checkpoint's own processor config (never hand-written mean/std),
with the Pillow backend so the same pixels come out with or without torchvision installed. The
pooled vector is defined once in :mod:`vitrine.model.embedding`. The :class:`Fingerprint` identifies the
embedding space: an index refuses an encoder whose fingerprint differs from the one that built it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from vitrine.config import DEFAULT_MODEL
from vitrine.errors import ImageDecodeError, ModelLoadError
from vitrine.images import decode_image
from vitrine.model import embedding
from vitrine.model.pipeline import Pipeline, PipelineStats
from vitrine.model.runtimes import choose

# |(1 - mean) / std| is at most ~2.7 for the usual statistics; 0-255 input reaches hundreds.
_MAX_NORMALISED = 20.0
T = TypeVar("T")
# Keys of a processor's to_dict() that name the class or processor rather than change pixels.
_VOLATILE_KEYS = {"processor_class", "_processor_class", "image_processor_type", "auto_map", "_commit_hash"}


def resolve_device(device: str) -> torch.device:
    """``auto`` takes CUDA when present; ``cpu`` / ``cuda`` / ``cuda:N`` are taken literally."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@lru_cache(maxsize=16)
def _weights_hash(folder: str, stamp: tuple) -> str:
    digest = hashlib.sha256()
    for name in sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin"))):
        with open(os.path.join(folder, name), "rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()[:16]


def weights_hash(folder: str | Path) -> str:
    """sha256 of a checkpoint folder's weight files (cached by size+mtime): catches in-place fine-tunes."""
    folder = str(folder)
    stamp = tuple(
        (e.name, e.stat().st_size, e.stat().st_mtime_ns)
        for e in sorted(os.scandir(folder), key=lambda e: e.name)
        if e.name.endswith((".safetensors", ".bin"))
    )
    return _weights_hash(folder, stamp)


def _stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_fingerprint(
    model_id: str, model: torch.nn.Module, image_processor: Any, tokenizer: Any, decode: dict, dim: int
) -> dict:
    """Everything that changes the embedding space, hashed into ``id``.

    ``revision`` is the hub commit when loaded from the hub, else a hash of the weight files, so a
    checkpoint fine-tuned and saved to the same folder gets a new id. The display name (``model``)
    is not part of the id: moving a folder does not invalidate its indexes.
    """
    local = Path(model_id).is_dir()
    revision = weights_hash(model_id) if local else getattr(model.config, "_commit_hash", None) or "unknown"
    processor = {k: v for k, v in image_processor.to_dict().items() if k not in _VOLATILE_KEYS}
    processor["class"] = type(image_processor).__name__.removesuffix("Pil").removesuffix("Fast")
    processor["tokenizer"] = {"class": type(tokenizer).__name__, "vocab": len(tokenizer)}
    processor["pooling"] = embedding.pooling_of(model)
    processor["decode"] = decode
    fp = {
        "model": str(Path(model_id).resolve()) if local else model_id,
        "revision": revision,
        "kind": embedding.model_kind(model),
        "processor_hash": _stable_hash(processor),
        "dim": dim,
    }
    fp["id"] = _stable_hash([fp["revision"], fp["processor_hash"], fp["kind"], dim])
    return fp


def _load_components(name: str, revision: str | None, cache_only: bool = False) -> tuple[Any, Any, Any]:
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    kwargs: dict[str, Any] = {"revision": revision} if revision else {}
    if cache_only:
        kwargs["local_files_only"] = True
    model = AutoModel.from_pretrained(name, **kwargs)
    try:
        image_processor = AutoImageProcessor.from_pretrained(name, backend="pil", **kwargs)
    except TypeError:  # processors that predate the backend switch
        image_processor = AutoImageProcessor.from_pretrained(name, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    return model, image_processor, tokenizer


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint, so an offline machine fails in seconds, not after retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def load_components(name: str, revision: str | None = None) -> tuple[Any, Any, Any]:
    """(model, image_processor, tokenizer) for a hub id or local folder, with a clear error offline.

    A hub id is served from the local cache when it is there; otherwise the hub must be reachable.
    """
    local = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not local.is_dir():
        raise ModelLoadError(f"model folder {name!r} does not exist; set --model (or VITRINE_MODEL)")
    if local.is_dir():
        return _guarded(name, "local folder", lambda: _load_components(str(local), revision))
    try:
        return _load_components(name, revision, cache_only=True)
    except (OSError, ValueError, KeyError):
        pass
    if not hub_reachable():
        raise ModelLoadError(_offline_message(name, "the Hugging Face Hub is not reachable from here"))
    return _guarded(name, "Hugging Face Hub", lambda: _load_components(name, revision))


def _guarded(name: str, where: str, load: Callable[[], tuple[Any, Any, Any]]) -> tuple[Any, Any, Any]:
    try:
        return load()
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).splitlines()[0][:200].rstrip(".") if str(exc) else type(exc).__name__
        raise ModelLoadError(_offline_message(name, f"{where}: {reason}")) from exc


def _offline_message(name: str, reason: str) -> str:
    return (
        f"cannot load model {name!r} ({reason}). Set --model (or the VITRINE_MODEL environment variable) "
        "to a local checkpoint folder saved with save_pretrained, e.g. one built by "
        "`python -m indexer towers --vision-model V --text-model T --output DIR`."
    )


class Encoder:
    """Turns images and texts into one embedding space.

    Knobs: ``batch_size`` trades memory for throughput; ``num_workers`` threads decode and preprocess
    images while the model runs (Pillow releases the GIL, so this overlaps on CPU too; None: as many as
    measurement says, with torch's threads, :mod:`vitrine.model.pipeline`);
    ``draft_size`` lets large JPEGs decode at a reduced DCT scale (part of the fingerprint, since it
    changes pixels slightly; ``"auto"`` = the processor's input size, ``None`` = off); ``fp16`` (CUDA
    only) halves memory and time with ~1e-4 cosine error; ``bf16`` (CPU, default on where the CPU has
    native bf16 matmul: AVX512-BF16 / AMX) runs the model in bfloat16, much faster there and close to
    fp32 (bench/RESULTS.md, "Embedding throughput", has the speed and the cosine to fp32).
    ``runtime`` (``torch`` | ``onnx`` | ``openvino``) and ``precision`` (``auto`` | ``fp32`` | ``bf16`` |
    ``int8``) pick how the towers run; int8 needs ``calibration`` (catalog images) or, when reopening an
    index, its recorded ``quantization`` id (:mod:`vitrine.model.runtimes` has the rules and the gate).
    Preprocessing takes a verified fast path (same Pillow resize, one numpy step) whenever the processor
    is the resize-shortest-edge + center-crop kind and the path matches it on a probe image.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        image_processor: Any,
        tokenizer: Any,
        *,
        model_id: str,
        device: str = "auto",
        batch_size: int = 32,
        num_workers: int | None = None,
        fp16: bool | None = None,
        bf16: bool | None = None,
        draft_size: int | str | None = "auto",
        max_pixels: int | None = None,
        runtime: str = "torch",
        precision: str = "auto",
        calibration: choose.Calibration | choose.Sample | None = None,
        quantization: str | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.kind = embedding.model_kind(model)
        if bf16 is not None and precision == "auto":  # the former knob, kept for callers that set it
            precision = "bf16" if bf16 else "fp32"
        if runtime != "torch" and self.device.type != "cpu":
            raise ModelLoadError(f"--runtime {runtime} runs on the CPU; use --runtime torch on {self.device}")
        half = self.device.type == "cuda" if fp16 is None else fp16 and self.device.type == "cuda"
        self.runtime = choose.select_torch(precision) if runtime == "torch" else None
        brain = self.device.type == "cpu" and self.runtime is not None and self.runtime.precision == "bf16"
        self.dtype = torch.float16 if half else torch.bfloat16 if brain else torch.float32
        self.model = model.to(self.device, self.dtype).eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.num_workers = num_workers if num_workers and num_workers > 0 else None
        self.pipeline_stats = PipelineStats()
        self.draft_size = _input_size(image_processor) if draft_size == "auto" else draft_size
        self._fast = FastPreprocess.verified(image_processor)
        self.max_pixels = max_pixels
        self._text_forward: Callable[..., torch.Tensor] | None = None
        self._image_forward: Callable[..., torch.Tensor] | None = None
        self.trace_notes: dict[str, str] = {}
        self.dim = int(self.encode_texts(["probe"]).shape[1])
        fingerprint = make_fingerprint(
            model_id, model, image_processor, tokenizer, {"draft": self.draft_size}, self.dim
        )
        if self.runtime is None:  # ONNX Runtime / OpenVINO: exported (or cached), validated, chosen
            self.runtime = choose.select_for(
                self, model_id, fingerprint["id"], runtime, precision, calibration, quantization
            )
            self._image_forward, self._text_forward = self.runtime.image, self.runtime.text
        elif self.runtime.dtype != self.dtype:  # on CUDA: fp16 (default) or fp32, never bf16
            name = "fp16" if half else "fp32"
            self.runtime = choose.Choice("torch", name, name)
        self.fingerprint = choose.fingerprint(fingerprint, self.runtime)

    @classmethod
    def from_pretrained(
        cls, name: str = DEFAULT_MODEL, *, revision: str | None = None, **kwargs: Any
    ) -> Encoder:
        """Load by hub id or local folder; ``kwargs`` are the constructor's knobs."""
        model, image_processor, tokenizer = load_components(name, revision)
        return cls(model, image_processor, tokenizer, model_id=name, **kwargs)

    def trace(self) -> dict[str, str]:
        """Run both towers as traced graphs from now on (for serving; :mod:`~vitrine.model.torchscript`
        says why).

        Returns, per tower, ``"traced"`` or why the eager forward stays (a tower that cannot be traced,
        or whose traced output differs from eager, is left as it was). Outputs are unchanged, so the
        fingerprint is too. Idempotent.
        """
        if not self.trace_notes and self.runtime.runtime != "torch":  # already a compiled graph
            self.trace_notes = {"text": self.runtime.runtime, "image": self.runtime.runtime}
        if not self.trace_notes:
            from vitrine.model import torchscript

            probe = self.preprocess([Image.new("RGB", (320, 240), (120, 90, 60))])
            probe = probe.to(self.device, self.dtype)
            self._image_forward, image = torchscript.trace_image(self.model, probe)
            self._text_forward, text = torchscript.trace_text(self.model, self.tokenize, self.device)
            self.trace_notes = {"text": text, "image": image}
        return self.trace_notes

    @property
    def version(self) -> str:
        """Short model version reported with every result and metric."""
        return self.fingerprint["id"]

    # -- images -------------------------------------------------------------------------------------
    def load_image(self, source: str | os.PathLike | bytes | Image.Image, **limits: Any) -> Image.Image:
        """Decode with the same safety rules and draft setting used at index time; ``limits`` are
        :func:`~vitrine.images.decode_image`'s ``max_decoded_pixels`` and ``admit`` (for queries)."""
        if isinstance(source, Image.Image):
            return source if source.mode == "RGB" else source.convert("RGB")
        kwargs: dict[str, Any] = {"draft_size": self.draft_size, **limits}
        if self.max_pixels:
            kwargs["max_pixels"] = self.max_pixels
        return decode_image(source, **kwargs)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The checkpoint's own processor: resize, crop, rescale to [0,1], normalise with its mean/std."""
        if self._fast is not None:
            try:
                return torch.from_numpy(np.stack([self._fast(im) for im in images]))
            except ValueError:  # outside the fast path's assumptions: the processor decides
                pass
        out = self.image_processor(images=list(images), return_tensors="np")
        return torch.from_numpy(np.ascontiguousarray(out["pixel_values"], dtype=np.float32))

    @torch.inference_mode()
    def encode_pixels(self, pixel_values: torch.Tensor) -> np.ndarray:
        """Model forward on already-preprocessed pixels → normalised float32 (n, dim).

        Normalised pixels stay within a few units of zero for every CLIP/ImageNet/SigLIP statistic;
        values above ``_MAX_NORMALISED`` mean raw 0-255 input skipped :meth:`preprocess`, which would
        give embeddings that look fine and are wrong, so it is refused.
        """
        if pixel_values.numel() and float(pixel_values.abs().max()) > _MAX_NORMALISED:
            raise ValueError(
                "pixel values look like raw 0-255 input: pass images through Encoder.preprocess "
                "(the checkpoint's own processor) first"
            )
        pixels = pixel_values.to(self.device, self.dtype)
        forward = self._image_forward
        return _normalise(forward(pixels) if forward else embedding.image_features(self.model, pixels))

    def encode_images(self, images: Iterable[str | os.PathLike | bytes | Image.Image]) -> np.ndarray:
        """Embeddings for images in order; raises ImageDecodeError on the first undecodable one.

        Use :meth:`encode_stream` to keep going past bad items.
        """
        rows = []
        for _, result in self.encode_stream(images, self.load_image):
            if isinstance(result, ImageDecodeError):
                raise result
            rows.append(result)
        return np.stack(rows) if rows else np.zeros((0, self.dim), np.float32)

    def encode_stream(
        self, items: Iterable[T], load: Callable[[T], Image.Image | None]
    ) -> Iterator[tuple[T, np.ndarray | ImageDecodeError | None]]:
        """Yield ``(item, embedding | ImageDecodeError)`` in input order.

        ``load`` (decode) and preprocessing run in worker threads, at most two batches ahead, while the
        model works on the current batch (:mod:`vitrine.model.pipeline`: with ``num_workers`` None on a
        CPU, the split between workers and torch threads is measured as it runs). An item that fails
        to load yields its error and never stops the stream; ``load`` may return None for items that
        need no embedding (the caller reuses a stored one): they yield None. ``pipeline_stats`` holds
        where the last stream's time went.
        """
        pipeline = Pipeline(
            load,
            self._preprocess_one,
            self.encode_pixels,
            _as_decode_error,
            batch_size=self.batch_size,
            workers=self.num_workers,
            adapt_threads=self.device.type == "cpu",
        )
        self.pipeline_stats = pipeline.stats
        yield from pipeline.run(items)

    def _preprocess_one(self, image: Image.Image) -> torch.Tensor:
        return self.preprocess([image])

    # -- texts --------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise as the model was trained (the rule lives in :func:`vitrine.model.embedding.tokenize`)."""
        return embedding.tokenize(
            self.tokenizer, texts, kind=self.kind, limit=embedding.text_limit(self.model, self.tokenizer)
        )

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Normalised float32 (n, dim) text embeddings, batched."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenize(texts[start : start + self.batch_size])
            ids, mask = tokens["input_ids"].to(self.device), tokens.get("attention_mask")
            mask = None if mask is None else mask.to(self.device)
            if self._text_forward is None:
                feats = embedding.text_features(self.model, ids, mask)
            else:
                feats = self._text_forward(ids) if mask is None else self._text_forward(ids, mask)
            out.append(_normalise(feats))
        return np.concatenate(out) if out else np.zeros((0, getattr(self, "dim", 0)), np.float32)


def _as_decode_error(item: Any, exc: Exception) -> ImageDecodeError:
    """A worker's failure as the item's result: a processor failure is one bad item, not a dead batch."""
    if isinstance(exc, ImageDecodeError):
        return exc
    if isinstance(exc, OSError):
        return ImageDecodeError(f"cannot read file: {exc.strerror or exc}", str(item))
    return ImageDecodeError(f"preprocessing failed: {exc}", str(item))


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX), which oneDNN uses;
    elsewhere bf16 is emulated and slower than fp32. (torch's ``_is_mkldnn_bf16_supported`` also says
    True for plain AVX512, so the flags are read directly; non-Linux stays fp32.)"""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _input_size(image_processor: Any) -> int | None:
    """The side the processor resizes to (shortest edge, else crop/size height): the JPEG draft target."""
    cfg = image_processor.to_dict()
    size, crop = cfg.get("size") or {}, cfg.get("crop_size") or {}
    side = size.get("shortest_edge") or crop.get("height") or size.get("height")
    return int(side) if side else None


class FastPreprocess:
    """The CLIP-style Pillow processor's arithmetic (resize the shortest edge, or to the fixed size of
    ViT/DeiT processors, with the same Pillow call; integer center crop; rescale+normalise folded into
    one multiply-add) without its PIL->numpy->PIL round trips (bench/RESULTS.md has its speed-up). Only
    built when the processor is of that kind *and* agrees with it to 1e-5 on a probe image; otherwise
    the checkpoint's processor is used."""

    def __init__(self, processor: Any) -> None:
        cfg = processor.to_dict()
        size, crop = cfg.get("size") or {}, cfg.get("crop_size") or {}
        fixed = set(size) == {"height", "width"}  # ViT/DeiT: resize to a fixed size, then crop
        self.size = (int(size["width"]), int(size["height"])) if fixed else None
        self.supported = bool(
            (set(size) == {"shortest_edge"} or fixed)
            and cfg.get("do_resize", True)
            and cfg.get("do_center_crop")
            and set(crop) == {"height", "width"}
            and cfg.get("do_rescale", True)
            and cfg.get("do_normalize", True)
            and not cfg.get("do_pad")
        )
        self.short = int(size.get("shortest_edge", 0))
        self.crop = (int(crop.get("height", 0)), int(crop.get("width", 0)))
        self.resample = Image.Resampling(int(cfg.get("resample", Image.Resampling.BICUBIC)))
        std = np.asarray(cfg.get("image_std", (1, 1, 1)), np.float64)
        mean = np.asarray(cfg.get("image_mean", (0, 0, 0)), np.float64)
        scale = float(cfg.get("rescale_factor", 1 / 255))
        self.mul = (scale / std).astype(np.float32)
        self.add = (-mean / std).astype(np.float32)

    @classmethod
    def verified(cls, processor: Any, tolerance: float = 1e-5) -> FastPreprocess | None:
        try:
            fast = cls(processor)
            if not fast.supported:
                return None
            rng = np.random.default_rng(0)
            probe = Image.fromarray(rng.integers(0, 256, (301, 457, 3), dtype=np.uint8))
            want = processor(images=[probe], return_tensors="np")["pixel_values"][0]
            return fast if float(np.abs(fast(probe) - want).max()) <= tolerance else None
        except Exception:  # any surprise: the checkpoint's own processor
            return None

    def __call__(self, image: Image.Image) -> np.ndarray:
        image = image if image.mode == "RGB" else image.convert("RGB")
        width, height = image.size
        if self.size is not None:
            new_w, new_h = self.size
        else:
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(self.short * long / short)
            new_w, new_h = (self.short, new_long) if width <= height else (new_long, self.short)
        if (new_w, new_h) != image.size:
            image = image.resize((new_w, new_h), resample=self.resample)
        crop_h, crop_w = self.crop
        top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
        if top < 0 or left < 0:
            raise ValueError("image smaller than the crop after resizing")
        pixels = np.asarray(image)[top : top + crop_h, left : left + crop_w]
        return np.ascontiguousarray((pixels.astype(np.float32) * self.mul + self.add).transpose(2, 0, 1))


def _normalise(feats: torch.Tensor) -> np.ndarray:
    feats = torch.nn.functional.normalize(feats.float(), dim=-1)
    return feats.cpu().numpy().astype(np.float32, copy=False)
