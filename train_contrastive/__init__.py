"""Contrastive fine-tuning of Vitrine's image–text encoders (issue 4).

``python -m train_contrastive train …`` and ``accelerate launch -m train_contrastive train …`` run the
same code (:mod:`train_contrastive.loop`); ``python -m train_contrastive evaluate`` measures recall@k
with :mod:`vitrine.evaluate`. This package is the only place that imports ``accelerate``: the core
``vitrine`` package must stay importable without it.
"""
