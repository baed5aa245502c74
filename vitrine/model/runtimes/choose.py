"""Which runtime and precision an encoder runs with: export (cached), quantize, validate, measure, pick.

``precision auto`` considers, for the chosen runtime, the precisions this CPU runs natively
(:mod:`.hardware`: bf16 only with bf16 dot products; int8 only with calibration images from the
catalog), validates each against torch fp32 and keeps the fastest validated one, timed here on this
machine. An explicit precision that fails its gate falls back to the next one in :data:`FALLBACK`
(the reason is logged and recorded). For the torch runtime ``auto`` keeps the earlier rule (bf16
where the CPU has bf16 units, else fp32; bench/RESULTS.md, "Embedding throughput") so the default
encoder is what it was; both are the same embedding space (see :func:`fingerprint_part`).

Reopening an index passes the index's recorded runtime and, for int8, its precision and calibration id
(:func:`vitrine.open_index.recorded_runtime`): ``auto`` may re-pick between fp32 and bf16 for the machine
at hand (one embedding space), never int8 for an index that is not, nor a new int8 model for one that is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitrine.errors import ModelLoadError
from vitrine.model import embedding
from vitrine.model.runtimes import PRECISIONS, RUNTIMES, cache, export, hardware, quantize, sessions
from vitrine.model.runtimes.calibration import Calibration, Sample
from vitrine.model.runtimes.validate import Gate, Validation, check

log = logging.getLogger("vitrine.runtimes")
Forward = sessions.Forward
FALLBACK = {"int8": ("bf16", "fp32"), "bf16": ("fp32",), "fp32": ()}
# Float outputs of another runtime must match torch fp32 this closely (relative max difference).
FLOAT_TOLERANCE = {"fp32": 1e-3}


@dataclass
class Choice:
    runtime: str
    precision: str  # the image tower's
    text_precision: str
    image: Forward | None = None  # None: the torch model in ``dtype``
    text: Forward | None = None
    quantization: str | None = None
    tried: list[dict] = field(default_factory=list)

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.runtime == "torch" and self.precision == "bf16" else torch.float32

    def record(self) -> dict[str, Any]:
        """What the fingerprint keeps: enough to reopen the same encoder, plus the validation results."""
        out: dict[str, Any] = {
            "runtime": self.runtime,
            "precision": {"image": self.precision, "text": self.text_precision},
        }
        if self.quantization:
            out["quantization"] = {"calibration": self.quantization, **quantize.SETTINGS}
        if self.tried:
            out["validation"] = self.tried
        return out


def select_torch(precision: str) -> Choice:
    """The torch runtime: fp32 or bf16 (``auto``: bf16 where the CPU has bf16 units); no int8 path."""
    if precision not in PRECISIONS:
        raise ModelLoadError(f"unknown precision {precision!r}: choose one of {PRECISIONS}")
    return _torch_choice(precision)


def select_for(
    encoder: Any,
    model_id: str,
    fingerprint_id: str,
    runtime: str,
    precision: str,
    calibration: Calibration | Sample | None = None,
    quantization: str | None = None,
) -> Choice:
    """:func:`select` for an :class:`~vitrine.model.encoder.Encoder` whose torch model is still fp32;
    a :class:`Sample` of catalog records is decoded and preprocessed by the encoder first."""
    from vitrine.catalog.readers import read_source

    tower = Tower(encoder.model, model_id, fingerprint_id, encoder.tokenize, probe_pixels(encoder.preprocess))
    if isinstance(calibration, Sample):
        calibration = calibration.prepare(encoder.load_image, encoder.preprocess, read_source)
    return select(tower, runtime, precision, calibration=calibration, quantization=quantization)


def probe_pixels(preprocess: Callable[[list], torch.Tensor], count: int = 8) -> torch.Tensor:
    """A few synthetic photos-like images (smooth gradients plus noise), preprocessed: the export
    example, the float check when no catalog images are given, and what ``auto`` times."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for i in range(count):
        ramp = np.linspace(0, 255, 320, dtype=np.float32)[None, :, None] * rng.uniform(0.2, 1.0, 3)
        noise = rng.normal(0, 25 + 5 * i, (240, 320, 3))
        images.append(Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8)))
    return preprocess(images)


def fingerprint(base: dict[str, Any], choice: Choice) -> dict[str, Any]:
    """``base`` (:func:`~vitrine.model.encoder.make_fingerprint`) plus the choice's record; the id
    changes only by :func:`fingerprint_part`."""
    out = {**base, **choice.record()}
    part = fingerprint_part(choice)
    if part:
        out["id"] = hashlib.sha256(json.dumps([base["id"], *part]).encode()).hexdigest()[:16]
    return out


def fingerprint_part(choice: Choice) -> list[str]:
    """What the fingerprint id adds for this choice: nothing for floating point (fp32 and bf16 of any
    runtime are the space the model defines, as bf16 torch always was: indexes built before runtimes
    existed keep their id), and runtime, precision and calibration for int8, whose embeddings depend
    on the calibration data and the int8 kernels."""
    if choice.precision != "int8":
        return []
    return [choice.runtime, choice.precision, choice.text_precision, str(choice.quantization)]


@dataclass
class Tower:
    """What this module needs of an encoder: its fp32 model, where it came from, its tokenizer rule and
    a probe batch of preprocessed pixels (the export example, the float check without a catalog, and
    the timing of ``auto``)."""

    model: torch.nn.Module
    model_id: str
    fingerprint_id: str
    tokenize: Callable[[Sequence[str]], dict]
    probe_pixels: torch.Tensor


def select(
    tower: Tower,
    runtime: str,
    precision: str,
    *,
    calibration: Calibration | None = None,
    quantization: str | None = None,
    gate: Gate | None = None,
) -> Choice:
    """The :class:`Choice` for ``runtime``/``precision`` (see the module docstring)."""
    if runtime not in RUNTIMES or precision not in PRECISIONS:
        raise ModelLoadError(
            f"unknown runtime/precision {runtime}/{precision}: choose {RUNTIMES} / {PRECISIONS}"
        )
    if runtime == "torch":
        return _torch_choice(precision)
    if runtime == "onnx" and precision == "bf16":
        raise ModelLoadError(
            "ONNX Runtime has no bf16 CPU kernels here: use --runtime openvino or torch for bf16"
        )
    if precision == "int8" and calibration is None and quantization is None:
        raise ModelLoadError(
            "--precision int8 needs calibration images: build from a catalog (indexer build draws them from "
            "it, or from --calibration CATALOG)"
        )
    sessions.require(runtime)
    folder = _exported(tower)
    candidates = _candidates(runtime, precision, calibration, quantization)
    choices, tried = [], []
    pool = _Candidates(tower, folder, runtime, calibration, gate)
    for want in candidates:
        choice, validation = pool.build(want, quantization)
        if validation is not None:
            tried.append(validation.to_dict())
            if not validation.passed:
                log.warning("%s %s refused, falling back: %s", runtime, want, validation.reason)
                continue
        choices.append(choice)
        if precision != "auto":
            break
    if not choices:
        raise ModelLoadError(f"no {runtime} precision passed validation: {[t['reason'] for t in tried]}")
    best = choices[0] if len(choices) == 1 else _fastest(choices, tower.probe_pixels)
    best.tried = tried
    return best


def _torch_choice(precision: str) -> Choice:
    if precision == "int8":
        raise ModelLoadError("--runtime torch has no int8 path: use --runtime onnx or openvino for int8")
    if precision == "auto":
        precision = "bf16" if hardware.native_bf16() else "fp32"
    return Choice("torch", precision, precision)


def _candidates(
    runtime: str, precision: str, calibration: Calibration | None, quantization: str | None
) -> list:
    if precision != "auto":
        fallback = [p for p in FALLBACK[precision] if runtime == "openvino" or p != "bf16"]
        return [precision, *fallback]
    found = ["fp32"]
    if runtime == "openvino" and hardware.native_bf16():
        found.append("bf16")
    if calibration is not None or quantization is not None:
        found.append("int8")
    return found


def _exported(tower: Tower) -> Path:
    parts = {
        "export": "towers",
        "fingerprint": tower.fingerprint_id,
        "opset": export.OPSET,
        **cache.versions(),
    }
    root = cache.root_for(tower.model_id)
    return cache.build(
        root, parts, lambda tmp: export.export_towers(tower.model, tower.probe_pixels, tower.tokenize, tmp)
    )


class _Candidates:
    """Builds and validates the candidates of one :func:`select`, computing the fp32 references once."""

    def __init__(
        self, tower: Any, folder: Path, runtime: str, calibration: Calibration | None, gate: Any
    ) -> None:
        self.tower, self.folder, self.runtime = tower, folder, runtime
        self.calibration, self.gate = calibration, gate
        self.held_out = calibration.holdout if calibration is not None else tower.probe_pixels.numpy()
        self.captions = calibration.captions if calibration is not None else []
        if len(self.captions) != len(self.held_out):
            self.captions = []

    @cached_property
    def reference(self) -> np.ndarray:
        with torch.inference_mode():
            return embedding.image_features(self.tower.model, torch.from_numpy(self.held_out)).float().numpy()

    @cached_property
    def tokens(self) -> list[list[torch.Tensor]]:
        flat = [c for caps in self.captions for c in caps]
        batches = []
        for start in range(0, len(flat), 64):
            tokens = self.tower.tokenize(flat[start : start + 64])
            batches.append(
                [tokens["input_ids"]] + ([tokens["attention_mask"]] if "attention_mask" in tokens else [])
            )
        return batches

    @cached_property
    def text_reference(self) -> np.ndarray | None:
        with torch.inference_mode():
            out = [embedding.text_features(self.tower.model, *args).float().numpy() for args in self.tokens]
        return np.concatenate(out) if out else None

    def build(self, precision: str, quantization: str | None) -> tuple[Choice, Validation | None]:
        """One candidate and its validation (None: an int8 model reopened by its recorded calibration,
        validated when the index was built)."""
        names = cache.read_meta(self.folder)["text_inputs"].split(",")
        text_precision = "fp32" if precision == "int8" else precision
        text = sessions.load(self.runtime, self.folder / export.TEXT, names, text_precision)
        if precision != "int8":
            image = sessions.load(self.runtime, self.folder / export.IMAGE, ["pixel_values"], precision)
            return self.validate(Choice(self.runtime, precision, text_precision, image, text))
        entry, calib_id = _quantized(self.folder, self.calibration, quantization)
        image = sessions.load(self.runtime, entry / export.IMAGE, ["pixel_values"], "fp32")
        choice = Choice(self.runtime, "int8", text_precision, image, text, calib_id)
        return (choice, None) if self.calibration is None else self.validate(choice)

    def validate(self, choice: Choice) -> tuple[Choice, Validation]:
        """The gate of :mod:`.validate`; fp32 must also reproduce torch (export parity)."""
        got = choice.image(torch.from_numpy(self.held_out)).numpy()  # type: ignore[misc]
        texts = None
        if self.text_reference is not None:
            candidate = np.concatenate([choice.text(*args).numpy() for args in self.tokens])  # type: ignore[misc]
            texts = (self.text_reference, candidate)
        result = check(choice.runtime, choice.precision, got, self.reference, self.captions, texts, self.gate)
        tolerance = FLOAT_TOLERANCE.get(choice.precision)
        gap = float(np.abs(got - self.reference).max() / max(np.abs(self.reference).max(), 1e-12))
        if tolerance is not None and result.passed and not gap <= tolerance:
            result.passed, result.reason = False, f"{choice.runtime} fp32 differs from torch by {gap:.2e}"
        return choice, result


def _quantized(folder: Path, calibration: Calibration | None, quantization: str | None) -> tuple[Path, str]:
    calib_id = quantization or quantize.calibration_id(calibration.pixels)  # type: ignore[union-attr]
    parts = {"quantized": folder.name, "calibration": calib_id, **quantize.SETTINGS, **cache.versions()}
    root = folder.parent
    found = cache.lookup(root, parts)
    if found is not None:
        return found, calib_id
    if calibration is None:
        raise ModelLoadError(
            f"the int8 model this index was built with (calibration {calib_id}) is not in {root}; "
            "run the build where it was made, or reindex with --precision fp32"
        )
    return cache.build(root, parts, lambda tmp: _write_quantized(folder, tmp, calibration)), calib_id


def _write_quantized(folder: Path, tmp: Path, calibration: Calibration) -> dict:
    quantize.quantize_image(folder / export.IMAGE, tmp / export.IMAGE, calibration.pixels)
    return {"calibration_images": len(calibration.pixels)}


def _fastest(choices: list[Choice], pixels: torch.Tensor) -> Choice:
    """The choice with the most images/s on this machine now (best of three timed forwards each)."""
    speeds = []
    for choice in choices:
        choice.image(pixels)  # type: ignore[misc]  # warm-up: first call allocates and compiles
        times = []
        for _ in range(3):
            start = time.perf_counter()
            choice.image(pixels)  # type: ignore[misc]
            times.append(time.perf_counter() - start)
        speeds.append(len(pixels) / min(times))
    ranked = sorted(zip(speeds, range(len(choices)), strict=True), reverse=True)
    log.info("precision auto: %s", {choices[i].precision: round(s, 1) for s, i in ranked})
    return choices[ranked[0][1]]
