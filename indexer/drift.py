"""``python -m indexer drift``: is the index stale?

    python -m indexer drift --index DIR [--window 24h] [--sample CATALOG] [--model M] [--slice FIELD] --json

prints ``{"drifted", "p_value", "auc", "mean_shift", "slices", "reason", ...}`` (see
:class:`vitrine.drift.assess.DriftReport`) and appends it to the index's drift history (the app's Drift tab
plots it). Exit 0 whether or not drift was found; 1 with ``error: ...`` when the check cannot run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from indexer.common import INDEX_HELP
from vitrine.config import DEFAULT_INDEX, EncoderSettings, arg, parse_duration
from vitrine.errors import VitrineError


@dataclass(kw_only=True)
class DriftArgs(EncoderSettings):
    """Check whether an index is stale: a model change (exact, from the fingerprint of --model or
    $VITRINE_MODEL), or a shift of newly ingested items or of recent queries away from what the live
    generation was built for (MMD permutation test, domain-classifier AUC, mean shift, per slice)."""

    index: str = arg(DEFAULT_INDEX, INDEX_HELP, env="INDEX")
    window: str | None = arg(None, "only live samples this recent count: 1h, 24h, 7d (default: all kept)")
    sample: str | None = arg(
        None, "compare this catalog (e.g. a new batch, before indexing it) with the reference instead"
    )
    slice: str | None = arg(
        None, "metadata field for the per-slice breakdown (default: the lowest-cardinality field)"
    )
    alpha: float = arg(0.01, "false-alarm rate: drift is flagged when the p-value is below it")
    permutations: int = arg(200, "permutations of the MMD test (at least 1/alpha - 1)")
    max_samples: int = arg(1000, "cap on each side of a comparison (random subsample)")
    record: bool = arg(True, "append the report to the index's drift history")
    json: bool = arg(False, "machine-readable output")


def cmd_drift(a: DriftArgs) -> int:
    from vitrine.drift.assess import DriftSettings, assess, encode_sample, model_change
    from vitrine.drift.journal import Journal
    from vitrine.drift.twosample import TwoSampleSettings
    from vitrine.index.store import IndexStore
    from vitrine.open_index import require_index

    try:
        settings = DriftSettings(
            window_seconds=parse_duration(a.window) if a.window else None,
            slice_field=a.slice,
            tests=TwoSampleSettings(alpha=a.alpha, permutations=a.permutations, max_samples=a.max_samples),
        )
    except ValueError as exc:
        raise VitrineError(str(exc)) from exc
    require_index(a.index)
    fingerprint, sample = None, None
    if a.model or a.sample:
        from vitrine.catalog.readers import open_catalog
        from vitrine.open_index import load_encoder

        encoder = load_encoder(a.index, a.model, **a.encoder_kwargs())
        fingerprint = encoder.fingerprint
        manifest = IndexStore.read_manifest(a.index)
        if a.sample and model_change(manifest["fingerprint"], fingerprint, manifest["generation"]) is None:
            sample = encode_sample(encoder, list(open_catalog(a.sample)), a.max_samples)
    report = assess(a.index, fingerprint=fingerprint, sample=sample, settings=settings).to_dict()
    if a.record:
        Journal(a.index).add_report(report)
    print(json.dumps(report, ensure_ascii=False) if a.json else _text(report))
    return 0


def _text(report: dict[str, Any]) -> str:
    lines = [("DRIFT " if report["drifted"] else "ok    ") + report["reason"]]
    for value, s in sorted(report["slices"].items(), key=lambda kv: kv[1].get("p_value", 1.0)):
        if s.get("tested", True):
            flag = "drift" if s["drifted"] else "ok"
            lines.append(
                f"  {report['slice_field']}={value}: {flag} p={s['p_value']:.4g} AUC {s['auc']:.3f} "
                f"shift {s['mean_shift']:.4f} (n={s['n_live']}{', new' if s['new'] else ''})"
            )
        else:
            lines.append(f"  {report['slice_field']}={value}: too few to test (n={s['n_live']})")
    return "\n".join(lines)
