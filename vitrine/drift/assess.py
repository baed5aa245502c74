"""Is the index stale? Model changes found exactly, data shifts found statistically.

Two ways an index goes stale:

* **The model changed** (a fine-tuned checkpoint replaced the one that built the index): every
  stored vector is in the wrong space. That is not a statistical question: the fingerprint id of the
  model on offer differs from the one in the manifest, and the report says so with certainty.
* **The data shifted**: new batches of images (camera colour cast, a new product line) or the
  queries people ask move away from what the generation was built for. Each is a two-sample test
  (:mod:`vitrine.drift.twosample`):

  - ``ingest``: items added since the generation was built vs the generation's reference sample
    (:mod:`vitrine.drift.reference`);
  - ``queries``: the recent query window vs the generation's query baseline (its first queries;
    text and image queries live in other regions of a CLIP space than images, so queries are only
    ever compared with queries);
  - ``sample``: a catalog given on the command line (a batch about to be indexed) vs the reference.

Several checks at once share the false-alarm budget (Bonferroni: each p-value is multiplied by the
number of checks), so ``alpha`` remains the rate of false alarms per assessment. Per-slice results
(one metadata field, e.g. ``folder`` or a query's ``mode``) say *where* it moved; slice p-values are
corrected for the number of slices, and slice values absent from the reference are marked ``new``.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from vitrine.drift import reference
from vitrine.drift.journal import Journal
from vitrine.drift.twosample import Comparison, Sample, TwoSampleSettings, compare
from vitrine.errors import ImageDecodeError
from vitrine.index.store import IndexStore

QUERY_SLICE = "mode"


@dataclass(frozen=True)
class DriftSettings:
    """``window_seconds``: only live samples this recent count (None: all kept for the generation).
    ``slice_field``: metadata field for the breakdown (None: the lowest-cardinality field with 2 to
    ``max_slice_values`` values; queries slice by ``mode``). ``min_samples``/``min_slice``: fewer live
    rows than this and a check (a slice) is not run, because the test would have no power."""

    window_seconds: float | None = None
    slice_field: str | None = None
    min_samples: int = 30
    min_slice: int = 20
    max_slices: int = 8
    max_slice_values: int = 50
    tests: TwoSampleSettings = field(default_factory=TwoSampleSettings)


@dataclass
class DriftReport:
    """The JSON contract of ``python -m indexer drift``: ``drifted``, ``p_value``, ``auc``,
    ``mean_shift``, ``slices``, ``reason``, plus where it came from. For a model change the statistics
    are certain (p 0, AUC 1) and ``mean_shift`` is None: means in two spaces cannot be compared."""

    drifted: bool
    p_value: float
    auc: float
    mean_shift: float | None
    reason: str
    source: str
    generation: str
    model: str
    slices: dict[str, dict[str, Any]] = field(default_factory=dict)
    slice_field: str | None = None
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    alpha: float = 0.01
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "drifted": self.drifted,
            "p_value": round(self.p_value, 6),
            "auc": round(self.auc, 4),
            "mean_shift": None if self.mean_shift is None else round(self.mean_shift, 6),
            "slices": self.slices,
            "reason": self.reason,
            "source": self.source,
            "slice_field": self.slice_field,
            "generation": self.generation,
            "model": self.model,
            "alpha": self.alpha,
            "checks": self.checks,
            "time": round(self.time, 3),
        }


def model_change(index_fingerprint: dict, fingerprint: dict, generation: str) -> DriftReport | None:
    """A certain drift report when ``fingerprint`` is another model than the index's, else None."""
    old, new = str(index_fingerprint.get("id")), str(fingerprint.get("id"))
    if old == new:
        return None
    reason = (
        f"model changed: index built with {index_fingerprint.get('model')} (id {old}), "
        f"current model {fingerprint.get('model')} (id {new}); every stored embedding is in the old space"
    )
    return DriftReport(True, 0.0, 1.0, None, reason, "fingerprint", generation, old)


def compare_samples(
    ref: Sample, live: Sample, settings: DriftSettings, *, slice_field: str | None = None
) -> tuple[Comparison, str | None, dict[str, dict[str, Any]]]:
    """The overall comparison, the slice field used and the per-slice breakdown."""
    overall = compare(ref.embeddings, live.embeddings, settings.tests)
    name = slice_field or settings.slice_field or pick_slice_field(ref, live, settings.max_slice_values)
    return overall, name, _slices(ref, live, name, settings) if name else {}


def pick_slice_field(ref: Sample, live: Sample, max_values: int) -> str | None:
    """The metadata field with the fewest distinct values (2..max_values) across both samples."""
    names = sorted({k for m in ref.metadata + live.metadata for k in m})
    counts = {n: len(set(ref.slice_values(n) + live.slice_values(n)) - {None}) for n in names}
    usable = [(c, n) for n, c in counts.items() if 2 <= c <= max_values]
    return min(usable)[1] if usable else None


def _slices(ref: Sample, live: Sample, name: str, settings: DriftSettings) -> dict[str, dict[str, Any]]:
    sizes = Counter(v for v in live.slice_values(name) if v is not None)
    tested = [v for v, n in sizes.most_common(settings.max_slices) if n >= settings.min_slice]
    known = Counter(v for v in ref.slice_values(name) if v is not None)
    out: dict[str, dict[str, Any]] = {}
    tests = corrected(settings.tests, len(tested))
    for value in tested:
        own = ref.where(name, value)
        is_new = known[value] < settings.min_slice
        result = compare((ref if is_new else own).embeddings, live.where(name, value).embeddings, tests)
        p_adjusted = min(1.0, result.p_value * len(tested))
        out[value] = {
            **result.to_dict(),
            "p_value": round(p_adjusted, 6),
            "drifted": p_adjusted < settings.tests.alpha and result.auc >= settings.tests.min_auc,
            "new": is_new,
        }
    for value, n in sizes.items():
        if value not in out:
            out[value] = {"n_live": n, "new": known[value] == 0, "tested": False}
    return out


def summarise(
    checks: dict[str, tuple[Comparison, str | None, dict]],
    settings: DriftSettings,
    generation: str,
    model: str,
) -> DriftReport:
    """One report from several checks, each p-value Bonferroni-corrected by the number of checks."""
    alpha = settings.tests.alpha
    if not checks:
        return DriftReport(
            False, 1.0, 0.5, 0.0, "no live samples to test", "none", generation, model, alpha=alpha
        )
    adjusted = {name: min(1.0, c[0].p_value * len(checks)) for name, c in checks.items()}
    worst = min(adjusted, key=lambda n: (adjusted[n], -checks[n][0].auc))
    result, slice_name, slices = checks[worst]
    drifted = adjusted[worst] < alpha and result.auc >= settings.tests.min_auc
    per_check = {n: {**c[0].to_dict(), "p_value": round(adjusted[n], 6)} for n, c in checks.items()}
    report = DriftReport(
        drifted,
        adjusted[worst],
        result.auc,
        result.mean_shift,
        "",
        worst,
        generation,
        model,
        slices,
        slice_name,
        per_check,
        alpha,
    )
    report.reason = _reason(report, result)
    return report


def _reason(report: DriftReport, result: Comparison) -> str:
    stats = (
        f"{report.source}: MMD p={report.p_value:.4g} (alpha {report.alpha}), AUC {result.auc:.3f}, "
        f"mean shift {result.mean_shift:.4f}, {result.n_live} live vs {result.n_reference} reference"
    )
    new = sorted(v for v, s in report.slices.items() if s.get("new"))
    moved = sorted((s["p_value"], v) for v, s in report.slices.items() if s.get("drifted"))
    detail = "".join(
        [
            f"; new {report.slice_field} values: {', '.join(new[:5])}" if new else "",
            f"; most shifted {report.slice_field}={moved[0][1]}" if moved else "",
        ]
    )
    return ("drift detected in " if report.drifted else "no drift: ") + stats + detail


def assess(
    root: str | Path,
    *,
    fingerprint: dict | None = None,
    window_seconds: float | None = None,
    sample: Sample | None = None,
    settings: DriftSettings | None = None,
    journal: Journal | None = None,
) -> DriftReport:
    """Assess the live generation of the index at ``root``.

    ``fingerprint``: the model on offer (a different id is reported as a model change, no statistics
    needed). ``sample``: compare these embeddings (a new batch) with the reference instead of the
    recorded live windows. ``window_seconds`` overrides ``settings.window_seconds``.
    """
    settings = settings or DriftSettings()
    root = Path(root)
    manifest = IndexStore.read_manifest(root)
    generation, model = manifest["generation"], str(manifest["fingerprint"].get("id"))
    if fingerprint is not None and (
        changed := model_change(manifest["fingerprint"], fingerprint, generation)
    ):
        return changed
    window = window_seconds if window_seconds is not None else settings.window_seconds
    since = None if window is None else time.time() - window
    journal = journal or Journal(root)
    pairs = _pairs(root, journal, generation, model, since, sample, settings.min_samples)
    tests = corrected(settings.tests, len(pairs))
    checks = {
        name: compare_samples(ref, live, replace(settings, tests=tests), slice_field=field)
        for name, (ref, live, field) in pairs.items()
    }
    report = summarise(checks, settings, generation, model)
    if not checks:
        report.reason = _not_enough(journal, generation, model, sample, settings)
    return report


def _pairs(
    root: Path,
    journal: Journal,
    generation: str,
    model: str,
    since: float | None,
    sample: Sample | None,
    min_samples: int,
) -> dict[str, tuple[Sample, Sample, str | None]]:
    """(reference, live, slice field) per check that has enough live rows to be run."""
    pairs: dict[str, tuple[Sample, Sample, str | None]] = {}
    if sample is not None:
        if len(sample) >= min_samples:
            pairs["sample"] = (_reference(root).sample, sample, None)
        return pairs
    if journal.count("ingest", generation, model) >= min_samples:
        pairs["ingest"] = (
            _reference(root).sample,
            journal.sample("ingest", generation, model, since=since),
            None,
        )
    baseline = journal.sample("query_baseline", generation, model)
    recent = journal.sample("query", generation, model, since=since)
    if len(baseline) >= min_samples and len(recent) >= min_samples:
        pairs["queries"] = (baseline, recent, QUERY_SLICE)
    return {name: pair for name, pair in pairs.items() if len(pair[1]) >= min_samples}


def corrected(tests: TwoSampleSettings, count: int) -> TwoSampleSettings:
    """Settings whose permutation p-values can still pass ``alpha`` after multiplying by ``count``.

    A permutation p-value is at least ``1 / (permutations + 1)``; corrected for ``count`` tests it must
    stay below ``alpha``, with room to spare (twice), or a test could never fire however strong the shift.
    """
    needed = math.ceil(2 * max(count, 1) / tests.alpha) - 1
    return tests if tests.permutations >= needed else replace(tests, permutations=needed)


def _reference(root: Path) -> reference.Reference:
    ref = reference.load(root)
    if ref is not None:
        return ref
    with IndexStore.open(root) as store:  # an index built before references existed: capture now
        return reference.capture(store)


def _not_enough(
    journal: Journal, generation: str, model: str, sample: Sample | None, s: DriftSettings
) -> str:
    if sample is not None:
        return f"the sample has {len(sample)} decodable images; need at least {s.min_samples}"
    counts = {k: journal.count(k, generation, model) for k in ("ingest", "query_baseline", "query")}
    return (
        f"not enough live samples for generation {generation}: {counts['ingest']} ingested items, "
        f"{counts['query_baseline']} baseline and {counts['query']} recent queries "
        f"(need {s.min_samples} of a kind)"
    )


def encode_sample(encoder: Any, records: list[Any], limit: int = 1000, seed: int = 0) -> Sample:
    """Embed up to ``limit`` randomly chosen catalog records (a batch to check before indexing it).

    Images that fail to decode are left out: they are the indexer's business, not drift's.
    """
    from vitrine.catalog.readers import read_source

    rng = np.random.default_rng(seed)
    if len(records) > limit:
        records = [records[i] for i in sorted(rng.choice(len(records), limit, replace=False))]
    rows, meta = [], []
    for record, result in encoder.encode_stream(records, lambda r: encoder.load_image(read_source(r.path))):
        if not isinstance(result, ImageDecodeError):
            rows.append(result)
            meta.append(dict(record.metadata))
    dim = int(encoder.fingerprint["dim"])
    return Sample(np.stack(rows) if rows else np.zeros((0, dim), dtype=np.float32), meta)
