"""The encoder variants bench/embed.py measures: subclasses and copies of
:class:`vitrine.model.encoder.Encoder` (bf16 weights, autocast, channels-last, fast preprocessing,
torch.compile) and the runners that time them, beside the naive loop they are compared with. Built here,
not in the core, so a variant is measured before the core adopts it."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vitrine.model import embedding
from vitrine.model.encoder import Encoder, FastPreprocess


class FastPreprocessEncoder(Encoder):
    """Marker class: :func:`derive` gives it the encoder's verified fast preprocessing path."""


class AutocastEncoder(Encoder):
    """fp32 weights, model forward under ``torch.autocast('cpu', bfloat16)``."""

    def encode_pixels(self, pixel_values: torch.Tensor) -> np.ndarray:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return super().encode_pixels(pixel_values)


class ChannelsLastEncoder(Encoder):
    """Pixels (and the patch-embedding conv weights) in channels-last memory format."""

    def encode_pixels(self, pixel_values: torch.Tensor) -> np.ndarray:
        return super().encode_pixels(pixel_values.contiguous(memory_format=torch.channels_last))


def derive(base: Encoder, cls: type[Encoder] | None = None, **attrs: Any) -> Encoder:
    """A shallow copy of ``base`` (sharing its model unless ``model=`` is given) with attributes replaced."""
    enc = copy.copy(base)
    if cls is not None:
        enc.__class__ = cls
    for name, value in attrs.items():
        setattr(enc, name, value)
    fast = isinstance(enc, FastPreprocessEncoder)
    enc._fast = FastPreprocess.verified(enc.image_processor) if fast else None
    return enc


Runner = Callable[[list[Path]], np.ndarray]


@dataclasses.dataclass
class Variant:
    name: str
    make: Callable[[], Runner]
    notes: str = ""
    sets: tuple[str, ...] = ("small", "large")
    cold: bool = False  # first call compiles: measured once as "cold", then warm in the rounds


def naive_runner(enc: Encoder) -> Runner:
    """PIL open -> checkpoint processor -> fp32 model, one batch at a time, nothing overlapped."""

    @torch.inference_mode()
    def run(paths: list[Path]) -> np.ndarray:
        out = []
        for start in range(0, len(paths), enc.batch_size):
            images = [Image.open(p).convert("RGB") for p in paths[start : start + enc.batch_size]]
            pixels = enc.image_processor(images=images, return_tensors="pt")["pixel_values"]
            feats = embedding.image_features(enc.model, pixels)
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).numpy())
        return np.concatenate(out)

    return run


def encoder_runner(enc: Encoder, threads: int | None = None, mkldnn: bool | None = None) -> Runner:
    def run(paths: list[Path]) -> np.ndarray:
        with _torch_settings(threads, mkldnn):
            return enc.encode_images(paths)

    return run


@contextlib.contextmanager
def _torch_settings(threads: int | None, mkldnn: bool | None) -> Iterator[None]:
    old_threads, old_mkldnn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    try:
        if threads:
            torch.set_num_threads(threads)
        if mkldnn is not None:
            torch.backends.mkldnn.enabled = mkldnn
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.backends.mkldnn.enabled = old_mkldnn


def bf16_model(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).to(torch.bfloat16).eval()


def compiled_model(model: torch.nn.Module, dtype: torch.dtype, freezing: bool) -> torch.nn.Module:
    """A copy whose vision tower is ``torch.compile``d (inductor; ``freezing`` prepacks weights)."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = freezing
    model = copy.deepcopy(model).to(dtype).eval()
    model.vision_model = torch.compile(model.vision_model)
    return model


def eager_model(model: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(model)
    model.set_attn_implementation("eager")
    return model
