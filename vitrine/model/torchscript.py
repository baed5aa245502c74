"""Traced tower forwards for serving: the same arithmetic as eager, without Python between the ops.

Why a server wants this: it runs the model in one thread beside an event loop and request threads.
An eager transformers forward is a few hundred small ops, and each op releases the GIL and takes it
back; whenever another thread is running Python, taking it back waits (up to
``sys.getswitchinterval()``), so under load a forward took several times its CPU time in wall time.
Traced, TorchScript runs the whole graph in C++ after one GIL release, and it also skips the
transformers modules' Python (bench/RESULTS.md, "Serving fixes": traced forwards).

Parity is proved, not assumed. :func:`trace` traces on one example and compares the traced forward
with eager on a *second* example of another batch size and, for text, other lengths with padding (so
a graph that baked in a shape or dropped the attention mask is caught); anything further apart than
``tolerance`` keeps the eager forward, and the reason is reported. ``torch.jit.trace`` is deprecated
in favour of ``torch.compile``/``torch.export``, which need a C++ toolchain at start-up or run the graph
op by op from Python again; torch is pinned, and where tracing is unavailable the eager path is used.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from vitrine.model import embedding

Forward = Callable[..., torch.Tensor]


class TextTower(nn.Module):
    """The text embedding as a module; ``masked=False`` drops the attention mask (families without one)."""

    def __init__(self, model: nn.Module, masked: bool) -> None:
        super().__init__()
        self.model, self.masked = model, masked

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return embedding.text_features(self.model, input_ids, attention_mask if self.masked else None)


class ImageTower(nn.Module):
    """The image embedding (:func:`vitrine.model.embedding.image_features`) as a module to trace or export."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return embedding.image_features(self.model, pixel_values)


def trace(
    module: nn.Module, example: tuple[torch.Tensor, ...], check: tuple[torch.Tensor, ...], tolerance: float
) -> tuple[Forward | None, str]:
    """(traced forward, "traced") or (None, why not): traced on ``example``, verified on ``check``."""
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation and "converting a tensor to a Python value"
            traced = torch.jit.trace(module, example, check_trace=False)
            expected, got = module(*check).float(), traced(*check).float()
    except Exception as exc:  # tracing is an optimisation: any failure keeps the eager path
        return None, f"not traceable ({type(exc).__name__}: {str(exc)[:120]})"
    if got.shape != expected.shape:
        return None, f"traced output shape {tuple(got.shape)} != eager {tuple(expected.shape)}"
    gap = float((got - expected).abs().max()) / max(float(expected.abs().max()), 1e-12)
    if not gap <= tolerance:
        return None, f"traced output differs from eager by {gap:.2e} (tolerance {tolerance:.0e})"
    return traced, "traced"


def trace_text(
    model: nn.Module,
    tokenize: Callable[[list[str]], dict[str, torch.Tensor]],
    device: torch.device,
    tolerance: float = 1e-3,
) -> tuple[Forward | None, str]:
    """Trace the text tower; ``tokenize`` is the encoder's own (padding rule included)."""
    first = tokenize(["a photo of a dog", "two people walking along a beach at sunset with a kite"])
    second = tokenize(["red", "a small child in a yellow raincoat jumping into a puddle", "a cat", "snow"])
    masked = "attention_mask" in first

    def args(tokens: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        ids = tokens["input_ids"].to(device)
        return (ids, tokens["attention_mask"].to(device)) if masked else (ids,)

    return trace(TextTower(model, masked).eval(), args(first), args(second), tolerance)


def trace_image(
    model: nn.Module, pixels: torch.Tensor, tolerance: float = 1e-3
) -> tuple[Forward | None, str]:
    """Trace the image tower on preprocessed ``pixels`` (one image; the checks use batches of 2 and 3)."""
    gen = torch.Generator().manual_seed(0)
    batch = [pixels.float().cpu() + 0.1 * torch.randn((n, *pixels.shape[1:]), generator=gen) for n in (2, 3)]
    example, check = (b.to(pixels.device, pixels.dtype) for b in batch)
    return trace(ImageTower(model).eval(), (example,), (check,), tolerance)
