"""Vitrine core: encoder, image decoding, catalogs, index store, search, drift and evaluation.

Entry packages (``indexer``, ``app``, ``train_contrastive``) import from here; this package never imports
them, nor gradio or accelerate (tests/unit/test_layering.py enforces it).
"""

import os

# OpenMP threads that spin while waiting are fast on an idle machine and disastrous on a shared one:
# with another process on one of the cores, spinning made text queries many times slower than passive
# waiting (bench/RESULTS.md, "OpenMP wait policy under contention"). Vitrine runs beside indexers, web
# servers and notebooks, so it asks for passive waiting unless the user chose otherwise. It must be set
# before torch loads its OpenMP runtime, hence here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

#: The public Python API, importable as ``from vitrine import open_searcher`` (README, "Python API").
#: Loaded on first use, so ``import vitrine`` (and every ``--help``) stays free of torch and FAISS.
_PUBLIC = {
    "Encoder": "vitrine.model.encoder",
    "open_catalog": "vitrine.catalog.readers",
    "open_searcher": "vitrine.open_index",
    "open_for_build": "vitrine.open_index",
    "run_build": "vitrine.open_index",
    "Ingestor": "vitrine.build.ingest",
    "IndexStore": "vitrine.index.store",
    "Searcher": "vitrine.search.searcher",
    "evaluate_catalog": "vitrine.evaluate",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> object:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'vitrine' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_PUBLIC[name]), name)
