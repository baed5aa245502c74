"""Open an index together with the encoder that matches it.

An index remembers the model (and decode settings) that built it, so later commands need not repeat
``--model``; naming a different model is refused by the fingerprint check rather than silently
mixing embedding spaces.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from vitrine.build.ingest import BuildReport, Ingestor
from vitrine.catalog.readers import Catalog
from vitrine.drift import reference
from vitrine.drift.journal import IngestSampler, Journal
from vitrine.errors import IndexDamaged, StoreError
from vitrine.index import layout
from vitrine.index.diagnosis import ABSENT, DAMAGED, diagnose
from vitrine.index.store import IndexStore, IndexWriter
from vitrine.model.encoder import DEFAULT_MODEL, Encoder
from vitrine.search.searcher import Searcher, SearchLimits


def require_index(index: str | Path) -> None:
    """StoreError telling how to create an index when there is none at ``index``; IndexDamaged (the
    shared diagnosis and its way out) when the one there is damaged."""
    state = diagnose(index)
    if state.kind == DAMAGED:
        raise IndexDamaged(state)
    if state.kind == ABSENT:
        raise StoreError(state.message())


def index_model(index: str | Path) -> tuple[str, dict[str, Any]] | None:
    """(model name, encoder kwargs) recorded by an existing index, or None if there is no index.

    A damaged index raises its diagnosis: guessing a model for it (the default one, downloaded) would
    only end in a second, contradictory error."""
    state = diagnose(index)
    if state.kind == ABSENT:
        return None
    require_index(index)
    fp = IndexStore.read_manifest(index)["fingerprint"]
    return fp["model"], {"draft_size": (fp.get("decode") or {}).get("draft"), **recorded_runtime(fp)}


def recorded_runtime(fp: dict[str, Any]) -> dict[str, Any]:
    """The runtime an index was built with, and its precision where that defines the embedding space.

    int8 comes back with its calibration id (the same quantized model, from the cache). fp32 and bf16
    share the model's space, so they are left to ``auto`` on the machine at hand: an index built where
    bf16 is native still opens at full speed and in the same space where it is not. Indexes from before
    runtimes existed record nothing and reopen with the torch runtime and ``auto``, as they were built.
    """
    if "runtime" not in fp:
        return {}
    calibration = (fp.get("quantization") or {}).get("calibration")
    if (fp.get("precision") or {}).get("image") == "int8" and calibration:
        return {"runtime": fp["runtime"], "precision": "int8", "quantization": calibration}
    return {"runtime": fp["runtime"]}


def load_encoder(
    index: str | Path, model: str | None, *, catalog: Catalog | None = None, **encoder_kwargs: Any
) -> Encoder:
    """The encoder for ``index``: ``model`` if given, else the index's own, else $VITRINE_MODEL/default.

    The index's recorded runtime (and int8 model) are reused unless ``encoder_kwargs`` name a runtime
    or precision. A build passes its ``catalog``: int8 calibration images are drawn from it for a new
    index whose runtime may quantize (``int8``, or ``auto`` off torch), or when int8 is asked for.
    """
    recorded = index_model(index)
    if recorded is not None:
        name, recorded_kwargs = recorded
        if "runtime" in encoder_kwargs or "precision" in encoder_kwargs:
            recorded_kwargs = {k: v for k, v in recorded_kwargs.items() if k == "draft_size"}
        encoder_kwargs = {**recorded_kwargs, **encoder_kwargs}
    name = model or (recorded[0] if recorded else os.environ.get("VITRINE_MODEL") or DEFAULT_MODEL)
    calibrate = recorded is None or encoder_kwargs.get("precision") == "int8"
    return Encoder.from_pretrained(name, **_with_calibration(encoder_kwargs, catalog if calibrate else None))


def _with_calibration(kwargs: dict[str, Any], catalog: Catalog | None) -> dict[str, Any]:
    precision = kwargs.get("precision", "auto")
    quantizes = kwargs.get("runtime", "torch") != "torch" and precision in ("auto", "int8")
    if catalog is None or not quantizes or kwargs.get("quantization") or "calibration" in kwargs:
        return kwargs
    from vitrine.model.runtimes.calibration import draw

    return {**kwargs, "calibration": draw(list(catalog))}


def encoder_fingerprint(encoder: Encoder) -> dict[str, Any]:
    """The fingerprint stored in a manifest: the encoder's, plus what reopening it needs."""
    return {**encoder.fingerprint, "decode": {"draft": encoder.draft_size}}


def open_for_build(index: str | Path, encoder: Encoder, *, factory: str | None = None) -> IndexWriter:
    """Writable store for ``encoder``: created on first use, fingerprint-checked afterwards."""
    if diagnose(index).kind != ABSENT:  # a damaged index raises its diagnosis here, never starts anew
        return IndexStore.open_writer(index, expected_fingerprint=encoder.fingerprint)
    layout.check_index_dir(Path(index))
    try:
        return IndexStore.create(index, encoder_fingerprint(encoder), factory=factory)
    except OSError as exc:
        raise StoreError(f"cannot create index directory {str(index)!r}: {exc.strerror or exc}") from exc


def open_searcher(
    index: str | Path, model: str | None = None, limits: SearchLimits | None = None, **encoder_kwargs: Any
) -> Searcher:
    """Read-only Searcher over an existing index with its own model."""
    require_index(index)
    encoder = load_encoder(index, model, **encoder_kwargs)
    store = IndexStore.open(index, expected_fingerprint=encoder.fingerprint)
    return Searcher(encoder, store, limits)


def run_build(store: IndexWriter, encoder: Encoder, catalog: Catalog, **options: Any) -> BuildReport:
    """One :class:`Ingestor` run (``options`` are its knobs) plus the drift bookkeeping around it.

    A generation's first complete build becomes its reference sample; later builds into it (new
    batches) are sampled into the drift journal as ``ingest`` rows, which ``drift`` compares with
    that reference. Journal trouble never fails a build.
    """
    has_reference = reference.load(store.root, store.generation) is not None
    model = str(store.fingerprint.get("id"))
    sampler = IngestSampler(Journal(store.root), store.generation, model) if has_reference else None
    report = Ingestor(store, encoder, on_commit=sampler, **options).run(catalog)
    if sampler is not None:
        with contextlib.suppress(StoreError):
            sampler.close()
    elif report.count:
        reference.capture(store)
    return report
