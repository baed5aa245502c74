"""Two-sample tests on embeddings: are a reference sample and a live sample from one distribution?

Three numbers, because each answers a different question:

* **MMD** (maximum mean discrepancy, Gaussian kernel) with a **permutation p-value**: the decision.
  Under "no drift" the labels reference/live are exchangeable, so the p-value
  ``(1 + #{permuted MMD >= observed}) / (1 + permutations)`` is valid at any sample size: flagging when
  ``p < alpha`` raises false alarms at rate <= alpha, whatever the embedding model. The kernel width is
  the median pairwise distance of the pooled sample (the usual heuristic; it adapts to each model's
  geometry, so no per-model threshold is needed).
* **Domain-classifier AUC**: how well a linear classifier tells live from reference on held-out folds
  (0.5 = indistinguishable, 1.0 = separable). An effect size people can read, and the basis of the
  optional ``min_auc`` gate: with thousands of samples tiny, harmless shifts become significant.
* **Mean shift**: distance between the two mean embeddings; cheap, and it shows direction over time.

Cost: one ``n x n`` kernel (``n`` = both samples together, each capped at ``max_samples``) and one
``permutations x n`` by ``n x n`` product: about a second for 1,000 + 1,000 vectors on 2 cores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Sample:
    """Embedding rows with each row's metadata (item metadata, or a query's mode), for slicing."""

    embeddings: np.ndarray
    metadata: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.metadata:
            self.metadata = [{} for _ in range(len(self.embeddings))]
        if len(self.metadata) != len(self.embeddings):
            raise ValueError(f"{len(self.embeddings)} embeddings but {len(self.metadata)} metadata rows")

    def __len__(self) -> int:
        return len(self.embeddings)

    def slice_values(self, name: str) -> list[str | None]:
        """Each row's value of metadata field ``name`` as the string filters compare (None if absent)."""
        return [None if m.get(name) is None else str(m[name]) for m in self.metadata]

    def where(self, name: str, value: str) -> Sample:
        rows = [i for i, v in enumerate(self.slice_values(name)) if v == value]
        return Sample(self.embeddings[rows], [self.metadata[i] for i in rows])


@dataclass(frozen=True)
class TwoSampleSettings:
    """Knobs of :func:`compare`.

    ``alpha`` is the false-alarm rate you accept; it needs ``permutations + 1 >= 1 / alpha`` so a
    p-value that small can occur at all. ``max_samples`` caps each side (random subsample) so cost
    stays bounded. ``folds`` and ``ridge`` set the domain classifier's cross-validation and L2 penalty
    (relative to the mean feature variance). ``min_auc`` demands that effect size on top of
    significance (0.5 disables the gate).
    """

    alpha: float = 0.01
    permutations: int = 200
    max_samples: int = 1000
    folds: int = 5
    ridge: float = 1.0
    min_auc: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if (self.permutations + 1) * self.alpha < 1:
            raise ValueError(
                f"{self.permutations} permutations cannot give p < {self.alpha}: "
                f"use at least {int(np.ceil(1 / self.alpha)) - 1}"
            )
        if self.folds < 2 or self.max_samples < 4:
            raise ValueError("need folds >= 2 and max_samples >= 4")


@dataclass(frozen=True)
class Comparison:
    """One comparison. ``drifted`` = ``p_value < alpha`` and ``auc >= min_auc``."""

    p_value: float
    mmd: float
    auc: float
    mean_shift: float
    n_reference: int
    n_live: int
    drifted: bool

    def to_dict(self) -> dict[str, float | int | bool]:
        return {
            "p_value": round(self.p_value, 6),
            "mmd": round(self.mmd, 6),
            "auc": round(self.auc, 4),
            "mean_shift": round(self.mean_shift, 6),
            "n_reference": self.n_reference,
            "n_live": self.n_live,
            "drifted": self.drifted,
        }


def compare(reference: np.ndarray, live: np.ndarray, settings: TwoSampleSettings | None = None) -> Comparison:
    """Test whether ``live`` rows come from the distribution of ``reference`` rows (same dimension)."""
    settings = settings or TwoSampleSettings()
    rng = np.random.default_rng(settings.seed)
    x = _subsample(np.asarray(reference, dtype=np.float64), settings.max_samples, rng)
    y = _subsample(np.asarray(live, dtype=np.float64), settings.max_samples, rng)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"samples must be 2-D with one width, got {x.shape} and {y.shape}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError("each sample needs at least 2 rows")
    mmd, p_value = mmd_permutation_test(x, y, settings.permutations, rng)
    auc = domain_auc(x, y, settings.folds, settings.ridge, rng)
    shift = float(np.linalg.norm(x.mean(0) - y.mean(0)))
    drifted = p_value < settings.alpha and auc >= settings.min_auc
    return Comparison(p_value, mmd, auc, shift, len(x), len(y), drifted)


def _subsample(a: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    return a if len(a) <= cap else a[rng.choice(len(a), cap, replace=False)]


def mmd_permutation_test(
    x: np.ndarray, y: np.ndarray, permutations: int, rng: np.random.Generator
) -> tuple[float, float]:
    """(unbiased MMD^2, permutation p-value) with a median-heuristic Gaussian kernel.

    All permutations are scored at once: with ``A`` the 0/1 membership matrix of the permuted "x" side,
    the within-x kernel sums are ``rowsum((A K) * A)``; the other blocks follow from row and total sums.
    """
    z = np.concatenate([x, y])
    n, m = len(x), len(y)
    sq = np.maximum((z * z).sum(1)[:, None] + (z * z).sum(1)[None, :] - 2 * z @ z.T, 0.0)
    off_diagonal = sq[np.triu_indices(len(z), 1)]
    width = float(np.median(off_diagonal[off_diagonal > 0])) if np.any(off_diagonal > 0) else 1.0
    kernel = np.exp(-sq / width)
    total = kernel.sum()
    trace = float(np.trace(kernel))

    membership = np.zeros((permutations + 1, n + m))
    membership[0, :n] = 1.0  # row 0: the observed split
    for row in membership[1:]:
        row[rng.permutation(n + m)[:n]] = 1.0
    ak = membership @ kernel
    xx = (ak * membership).sum(1)
    xy = ak.sum(1) - xx
    yy = total - 2 * xy - xx
    # The diagonal (k(a, a) = 1) is excluded from the within-sample sums of the unbiased estimator.
    x_diag = membership @ np.diag(kernel)
    y_diag = trace - x_diag
    stats = (xx - x_diag) / (n * (n - 1)) + (yy - y_diag) / (m * (m - 1)) - 2 * xy / (n * m)
    observed = float(stats[0])
    p_value = float((1 + np.sum(stats[1:] >= observed - 1e-12)) / (permutations + 1))
    return observed, p_value


def domain_auc(x: np.ndarray, y: np.ndarray, folds: int, ridge: float, rng: np.random.Generator) -> float:
    """Held-out ROC AUC of a ridge-regularised linear classifier telling ``y`` (live) from ``x``.

    Ridge regression on +-1 labels is a least-squares linear discriminant: closed form, deterministic,
    no iterations to tune. Scores come from the fold that did not train on them, so under "no drift"
    the AUC hovers around 0.5 rather than rewarding memorisation.
    """
    features = np.concatenate([x, y])
    labels = np.concatenate([-np.ones(len(x)), np.ones(len(y))])
    fold_of = rng.permutation(len(features)) % min(folds, len(x), len(y))
    scores = np.empty(len(features))
    for fold in np.unique(fold_of):
        train, test = fold_of != fold, fold_of == fold
        mean = features[train].mean(0)
        centred = features[train] - mean
        penalty = ridge * float((centred**2).sum()) / centred.shape[1]  # ridge x mean eigenvalue
        gram = centred.T @ centred + penalty * np.eye(centred.shape[1])
        target = labels[train] - labels[train].mean()
        weights = np.linalg.solve(gram, centred.T @ target)
        scores[test] = (features[test] - mean) @ weights
    return roc_auc(scores, labels > 0)


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUC: the chance a random positive outscores a random negative (ties count half)."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both classes")
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
