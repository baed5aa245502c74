"""Vitrine web app: ``python -m app`` serves the search page, its Gradio API, ``/healthz`` and ``/metrics``.

Nothing is loaded at import: ``app.cli.main`` opens the index and model once, ``app.ui.build_demo``
draws the page over an :class:`app.service.SearchService`.
"""
