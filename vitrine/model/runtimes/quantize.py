"""Static int8 quantization of the image tower, calibrated on images of the catalog being indexed.

Static: activation ranges are measured once on calibration images (so no range is computed per
batch at run time), weights per output channel. Only the matrix products (MatMul/Gemm, where the
time goes) are quantized; layer norms, softmax and GELU stay in float, which is where a transformer
loses most accuracy when quantized. The output is a QDQ ONNX file, which ONNX Runtime and OpenVINO
both execute with int8 kernels. A quantized model is never trusted: :mod:`.validate` gates it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vitrine.errors import ModelLoadError

SETTINGS = {"format": "QDQ", "per_channel": True, "ops": ["MatMul", "Gemm"], "activations": "uint8"}


def calibration_id(pixels: np.ndarray) -> str:
    """Identifies the calibration data (the quantized model depends on it): hash of the pixels."""
    digest = hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.float32).tobytes())
    digest.update(str(pixels.shape).encode())
    return digest.hexdigest()[:16]


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over preprocessed pixels, a few images at a time."""

    def __init__(self, pixels: np.ndarray, batch: int = 8) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            {"pixel_values": pixels[i : i + batch]} for i in range(0, len(pixels), batch)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_image(fp32: Path, out: Path, pixels: np.ndarray) -> None:
    """Write the int8 QDQ image tower to ``out``, calibrated on preprocessed ``pixels`` (n, 3, H, W)."""
    try:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise ModelLoadError("int8 quantization needs onnxruntime: pip install onnxruntime") from exc
    if not len(pixels):
        raise ModelLoadError("int8 quantization needs calibration images; none could be read")
    prepared = out.with_name(out.stem + ".prepared.onnx")
    # ONNX shape inference + graph cleanup that the quantizer expects (the symbolic pass fails on SigLIP)
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared),
        str(out),
        _Reader(np.ascontiguousarray(pixels, dtype=np.float32)),
        quant_format=QuantFormat.QDQ,
        per_channel=SETTINGS["per_channel"],
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=SETTINGS["ops"],
    )
    prepared.unlink(missing_ok=True)
