"""Vitrine core: encoder, image decoding, catalogs, index store, search, drift and evaluation.

Entry packages (``indexer``, ``app``, ``train_contrastive``) import from here; this package never imports
them, nor gradio or accelerate (tests/unit/test_layering.py enforces it).
"""

__version__ = "0.1.0"
