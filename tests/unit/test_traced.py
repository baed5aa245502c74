"""Traced tower forwards (vitrine/traced.py): the same embeddings as eager for every model kind, on
batches and lengths other than the ones traced, and eager kept whenever parity fails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import pattern_image
from vitrine.model.encoder import Encoder
from vitrine.model.torchscript import trace

TEXTS = ["a", "a red bicycle leaning on a wall beside a blue door at dawn", "two dogs", "snow " * 40]


@pytest.mark.parametrize("kind", ["clip_path", "siglip_path", "dual_path"])
@pytest.mark.parametrize("bf16", [False, True])
def test_traced_equals_eager(kind: str, bf16: bool, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(kind)
    encoder = Encoder.from_pretrained(str(path), device="cpu", bf16=bf16)
    images = [pattern_image(i, (64 + 9 * i, 48)) for i in range(5)]
    eager_text = encoder.encode_texts(TEXTS)
    eager_one = encoder.encode_texts(TEXTS[1:2])
    eager_images = encoder.encode_images(images)
    fingerprint = encoder.fingerprint

    assert encoder.trace() == {"text": "traced", "image": "traced"}
    assert encoder._text_forward is not None and encoder._image_forward is not None
    np.testing.assert_allclose(encoder.encode_texts(TEXTS), eager_text, atol=1e-5)
    np.testing.assert_allclose(encoder.encode_texts(TEXTS[1:2]), eager_one, atol=1e-5)
    np.testing.assert_allclose(encoder.encode_images(images), eager_images, atol=1e-5)
    assert encoder.fingerprint == fingerprint
    assert encoder.trace() == {"text": "traced", "image": "traced"}  # idempotent


class ShapeDependent(torch.nn.Module):
    """Python control flow on a tensor's size: tracing bakes in the example's branch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.shape[0] < 3 else x * 3


def test_parity_failure_keeps_eager() -> None:
    forward, why = trace(ShapeDependent(), (torch.ones(2, 4),), (torch.ones(3, 4),), tolerance=1e-3)
    assert forward is None and "differs from eager" in why


def test_untraceable_keeps_eager() -> None:
    class DictOut(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> object:
            return object()

    forward, why = trace(DictOut(), (torch.ones(2, 4),), (torch.ones(3, 4),), tolerance=1e-3)
    assert forward is None and why.startswith("not traceable")
