"""torch → ONNX for both towers, through the embedding wrappers of :mod:`vitrine.model.torchscript`.

The exported graph is the eager forward of :func:`vitrine.model.embedding.image_features` /
:func:`~vitrine.model.embedding.text_features` (pooling included), with the batch (and, for text, the
sequence length) left dynamic; the runtime that loads it is checked against eager on other shapes
(:mod:`.choose`). The legacy TorchScript exporter is used because it needs no extra packages beyond
``onnx`` and handles every family's control flow the same way ``trace`` does.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from vitrine.errors import ModelLoadError
from vitrine.model.torchscript import ImageTower, TextTower

OPSET = 17
IMAGE, TEXT = "image.onnx", "text.onnx"
EXAMPLE_TEXTS = ["a photo of a dog", "two people walking along a beach at sunset with a kite"]


def _export(module: nn.Module, args: tuple, out: Path, names: list[str], dynamic: dict) -> None:
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "converting a tensor to a Python value", deprecation notes
            torch.onnx.export(
                module,
                args,
                str(out),
                dynamo=False,
                input_names=names,
                output_names=["features"],
                dynamic_axes={**dynamic, "features": {0: "batch"}},
                opset_version=OPSET,
            )
    except Exception as exc:
        raise ModelLoadError(f"cannot export {out.stem} tower to ONNX: {type(exc).__name__}: {exc}") from exc


def export_towers(
    model: nn.Module, pixels: torch.Tensor, tokenize: Callable[[list[str]], dict], folder: Path
) -> dict[str, str]:
    """Write ``image.onnx`` and ``text.onnx`` (fp32) into ``folder``; returns the text inputs used.

    ``pixels`` is one preprocessed example batch (its height and width are fixed in the graph, as the
    processor fixes them); ``tokenize`` is the encoder's own, so padding follows the family's rule.
    """
    if next(model.parameters()).dtype != torch.float32:
        raise ModelLoadError("export needs the model in float32 (load it without bf16/fp16)")
    _export(
        ImageTower(model).eval(),
        (pixels.float().cpu(),),
        folder / IMAGE,
        ["pixel_values"],
        {"pixel_values": {0: "batch"}},
    )
    tokens = tokenize(EXAMPLE_TEXTS)
    masked = "attention_mask" in tokens
    names = ["input_ids", "attention_mask"] if masked else ["input_ids"]
    args = tuple(tokens[n].cpu() for n in names)
    _export(
        TextTower(model, masked).eval(),
        args,
        folder / TEXT,
        names,
        {n: {0: "batch", 1: "seq"} for n in names},
    )
    return {"text_inputs": ",".join(names), "opset": str(OPSET)}
