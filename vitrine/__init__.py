"""Vitrine core: encoder, image decoding, catalogs, index store, search, drift and evaluation.

Entry packages (``indexer``, ``app``, ``train_contrastive``) import from here; this package never imports
them, nor gradio or accelerate (tests/unit/test_layering.py enforces it).
"""

import os

# OpenMP threads that spin while waiting are fast on an idle machine and disastrous on a shared one:
# with another process on one of 2 cores, a 2-thread text query measured 1281 ms spinning vs 35 ms
# passive (and image batches 11.7 vs 16.8 img/s; bench/RESULTS.md). Vitrine runs beside indexers, web
# servers and notebooks, so it asks for passive waiting unless the user chose otherwise. It must be set
# before torch loads its OpenMP runtime, hence here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
