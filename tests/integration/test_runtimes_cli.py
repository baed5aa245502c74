"""``indexer build --runtime onnx --precision int8`` end to end: real processes, real exports and int8
quantization calibrated on the catalog, the gate's result in the report and the manifest, and later
commands reopening the index with its own runtime and precision."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import pattern_image
from tests.integration.test_indexer_cli import as_json, indexer
from vitrine.model.runtimes import cache

pytest.importorskip("onnxruntime", reason="the onnx runtime is an optional dependency (requirements.txt)")


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*.onnx")}


def test_build_with_onnx_int8_validates_records_and_reopens(clip_path, tmp_path):
    model = shutil.copytree(clip_path, tmp_path / "clip", ignore=shutil.ignore_patterns(cache.BESIDE))
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(40):
        pattern_image(i).save(photos / f"img_{i:02d}.jpg", quality=92)
    index = str(tmp_path / "index")
    args = ("build", str(photos), "--index", index, "--model", str(model), "--no-progress", "--json")
    report = as_json(indexer(*args, "--runtime", "onnx", "--precision", "int8"))
    assert report["count"] == 40
    assert report["encoder"]["runtime"] == "onnx" and report["encoder"]["precision"]["image"] == "int8"
    [gate] = report["encoder"]["validation"]
    assert gate["passed"] and gate["images"] == 27 and gate["cosine_min"] >= 0.98  # 13 calibrate, 27 held out
    current = (Path(index) / "CURRENT").read_text().strip()
    fingerprint = json.loads((Path(index) / current / "manifest.json").read_text())["fingerprint"]
    assert fingerprint["precision"]["image"] == "int8" and fingerprint["validation"] == [gate]
    assert fingerprint["quantization"]["calibration"] == report["encoder"]["quantization"]["calibration"]
    exported = _files(model / cache.BESIDE)

    photo = str(photos / "img_05.jpg")
    hits = as_json(indexer("search", "--index", index, "--image", photo, "-k", "1", "--json"))["hits"]
    assert hits[0]["key"].endswith("img_05.jpg")  # reopened with its own runtime, precision, calibration
    again = as_json(indexer(*args))  # no flags: the index's own choice, nothing re-exported
    assert again["unchanged"] == 40 and again["encoder"]["precision"]["image"] == "int8"
    assert _files(model / cache.BESIDE) == exported

    refused = indexer("search", "--index", index, "--text", "x", "--precision", "fp32", check=False)
    assert refused.returncode != 0
    assert "the index was built with onnx int8: omit --runtime/--precision" in refused.stderr
