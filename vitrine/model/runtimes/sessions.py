"""An exported tower as a forward the :class:`~vitrine.model.encoder.Encoder` calls like the torch one.

ONNX Runtime sessions are thread-safe; an OpenVINO compiled model is shared but each thread gets its
own infer request (one request must not run two inferences at once). Both use as many threads as
torch does (``torch.set_num_threads``, the app's ``--torch-threads``) when they are created. OpenVINO
picks bf16 by itself on CPUs with bf16 units, so fp32 is asked for explicitly; its compiled blobs
are cached beside the exported model (``CACHE_DIR``) so a second start skips compilation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitrine.errors import MissingDependency

Forward = Callable[..., torch.Tensor]
_PACKAGES = {"onnx": "onnxruntime", "openvino": "openvino"}


def require(runtime: str) -> None:
    """MissingDependency naming the package when ``runtime``'s library is not installed."""
    package = _PACKAGES.get(runtime)
    if package is None:
        return
    try:
        __import__(package)
    except ImportError as exc:
        raise MissingDependency(
            f"--runtime {runtime} needs the {package} package: pip install {package} "
            "(requirements.txt pins the tested version)"
        ) from exc


def _as_numpy(args: tuple[torch.Tensor, ...], names: list[str], wanted: set[str]) -> dict[str, np.ndarray]:
    feeds = {}
    for name, value in zip(names, args, strict=False):
        if name in wanted:
            array = value.detach().cpu()
            feeds[name] = (array.float() if array.is_floating_point() else array.long()).numpy()
    return feeds


def onnxruntime_forward(path: Path, names: list[str]) -> Forward:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Idle pool threads would otherwise spin on the cores the decode threads and other requests need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}  # an input the graph ignores (SigLIP's mask) is dropped

    def forward(*args: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, _as_numpy(args, names, wanted))[0])

    return forward


def openvino_forward(path: Path, names: list[str], precision: str) -> Forward:
    import openvino as ov

    core = ov.Core()
    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "PERFORMANCE_HINT": "LATENCY",
        "CACHE_DIR": str(path.parent / f"openvino-{precision}"),
    }
    compiled = core.compile_model(str(path), "CPU", config)
    wanted = {name for port in compiled.inputs for name in port.get_names()}
    local = threading.local()

    def forward(*args: torch.Tensor) -> torch.Tensor:
        request = getattr(local, "request", None)
        if request is None:
            request = local.request = compiled.create_infer_request()
        result = request.infer(_as_numpy(args, names, wanted))
        return torch.from_numpy(np.array(result[compiled.outputs[0]], dtype=np.float32))

    return forward


def load(runtime: str, path: Path, names: list[str], precision: str) -> Forward:
    """A forward over the model file at ``path`` whose inputs are ``names`` (in call order)."""
    require(runtime)
    if runtime == "onnx":
        return onnxruntime_forward(path, names)
    return openvino_forward(path, names, precision)
