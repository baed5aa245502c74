"""Encoder runtimes (torch, ONNX Runtime, OpenVINO) and precisions (fp32, bf16, int8) with a validation gate.

The towers are exported from the same ``transformers`` model through :mod:`vitrine.model.embedding`
(the wrappers of :mod:`vitrine.model.torchscript`), so every runtime computes the one embedding
definition; nothing here re-implements pooling. One module per concept:

- :mod:`.hardware`: which CPU instructions are there (bf16 dot products, VNNI, AMX), read at run time.
- :mod:`.cache`: where exported models live (beside the checkpoint, else a cache folder) and when a
  cached one is still valid (fingerprint, versions, calibration), so a model is never re-exported.
- :mod:`.export`: torch → ONNX for both towers, checked against eager on other shapes.
- :mod:`.quantize`: static int8 quantization of the image tower, calibrated on catalog images.
- :mod:`.calibration`: the catalog images drawn for int8 (calibration and held-out split).
- :mod:`.sessions`: an exported model as a forward for the :class:`~vitrine.model.encoder.Encoder`.
- :mod:`.validate`: the gate: cosine to fp32 on held-out images and text→image R@10 where captions exist.
- :mod:`.choose`: ``precision auto``: the fastest validated option, measured on this machine; the
  fallback order when a precision fails its gate.

Why these dependencies (measured in ``bench/runtimes.py``, figures and reading in bench/RESULTS.md,
"Encoder runtimes"): OpenVINO has the bf16 kernels that were by far the fastest on a CPU with bf16 units,
and ONNX Runtime's tooling writes the static int8 model (one QDQ ONNX file) that both runtimes execute,
so a catalog is calibrated once whichever runs it; torch's own int8 (dynamic quantization) was slower
and less faithful than either, so it is not offered. The text tower stays in floating point under
``int8``: a text query is one short sequence (latency, not throughput), and quantizing it would put
quantization error into every query for little time saved.
"""

from __future__ import annotations

RUNTIMES = ("torch", "onnx", "openvino")
PRECISIONS = ("auto", "fp32", "bf16", "int8")
