"""The per-slice reindex gate (issue 15): a new model that keeps the aggregate recall within the margin
but loses one slice (value of a metadata field) with enough items is refused; real tiny CLIP models,
real FAISS and SQLite, through the command line and the library."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tests.integration.test_reindex import build, cli, current, image_folder
from vitrine.build.reindex import Reindexer, ReindexSettings
from vitrine.evaluate import retrieval_ranks
from vitrine.index.store import IndexStore
from vitrine.model.encoder import Encoder

N = 40


def write_manifest(folder: Path, groups: dict[int, str] | None = None) -> Path:
    """Two captions per image; with ``groups``, a ``group`` column (the slice field)."""
    path = folder / ("grouped.csv" if groups else "captions.csv")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"] + (["group"] if groups else []))
        for i in range(N):
            for caption in (f"pattern {i}", f"stripes no {i * 7}"):
                writer.writerow([f"img_{i:03d}.jpg", caption] + ([groups[i]] if groups else []))
    return path


def hits_per_image(index: Path, encoder: Encoder, folder: Path) -> np.ndarray:
    """How many of each image's two captions find it in the top 10, as the reindex check measures it."""
    with IndexStore.open(index) as store:
        keys = [str((folder / f"img_{i:03d}.jpg").resolve()) for i in range(N)]
        found, images = store.embeddings(keys)
        assert found == keys
    texts = encoder.encode_texts([c for i in range(N) for c in (f"pattern {i}", f"stripes no {i * 7}")])
    ranks = retrieval_ranks(images, texts, np.repeat(np.arange(N), 2))
    return (ranks.t2i.numpy() < 10).reshape(N, 2).sum(1)


def test_a_model_losing_one_slice_is_refused(clip_encoder, clip_path_other, tmp_path, capsys) -> None:
    other = Encoder.from_pretrained(str(clip_path_other), device="cpu", batch_size=8, bf16=False)
    folder = image_folder(tmp_path / "photos", N)
    plain = write_manifest(folder)
    old_hits = {}
    for name, encoder in (("old", clip_encoder), ("new", other)):
        build(tmp_path / f"probe-{name}", plain, encoder)
        old_hits[name] = hits_per_image(tmp_path / f"probe-{name}", encoder, folder)
    lost = [i for i in range(N) if old_hits["new"][i] < old_hits["old"][i]]
    overall_drop = 100 * (old_hits["old"].sum() - old_hits["new"].sum()) / (2 * N)
    slice_drop = 100 * (old_hits["old"][lost].sum() - old_hits["new"][lost].sum()) / (2 * max(1, len(lost)))
    margin = max(0.0, float(overall_drop)) + 1.0
    if len(lost) < 3 or slice_drop <= margin + 1:
        pytest.skip(f"the random models differ too little per image ({len(lost)} images lost)")
    index = tmp_path / "index"
    build(index, write_manifest(folder, {i: "lost" if i in lost else "rest" for i in range(N)}), clip_encoder)

    args = ["--index", str(index), "--model", str(clip_path_other), "--device", "cpu", "--json"]
    gate = ["--recall-margin", f"{margin:g}", "--slice", "group", "--slice-min-items", str(len(lost))]
    code, out, err = cli(capsys, *args, *gate)
    assert code == 1 and current(index) == "gen-000001"
    assert f"slice 'lost' ({len(lost)} items): text->image R@10" in err and "worse by more than" in err
    assert "slice 'rest'" not in err
    validation = json.loads(out)["validation"]
    assert validation["recall_new"] >= validation["recall_old"] - margin  # the aggregate alone would pass
    rows = {row["value"]: row for row in validation["slices"]}
    assert rows["lost"]["items"] == len(lost) and rows["lost"]["judged"] is True
    assert rows["lost"]["old"] - rows["lost"]["new"] == pytest.approx(slice_drop, abs=0.01)

    # a slice smaller than --slice-min-items is reported, not judged: the same model now publishes
    settings = ReindexSettings(recall_margin=margin, slice_field="group", slice_min_items=len(lost) + 1)
    report = Reindexer(index, other, old_encoder=lambda: clip_encoder, settings=settings).run()
    assert report.status == "published" and current(index) != "gen-000001"
    assert {row["value"]: row["judged"] for row in report.validation["slices"]}["lost"] is False
