"""``python -m indexer reindex``: rebuild an index into a new generation, validate it, then swap it in.

    python -m indexer reindex --index DIR [--model M] [--if-drifted] [--retrain-ivf] [--keep N]
                              [--eval-size N] [--recall-margin P] [--slice FIELD [--slice-min-items N]]
                              [--every 1h] [--json]
    python -m indexer reindex --index DIR --rollback [--json]

Exit status: 0 when published, skipped (``--if-drifted`` and no drift) or rolled back; 1 with one
``error: ...`` line when validation refused the swap (the live generation keeps serving) or the job
stopped (a re-run of the same command resumes it). ``--every`` runs until SIGTERM or Ctrl-C, logging a
failed run to stderr and going on. Cron works as well (a run while another holds the index's writer
lock exits 1 and touches nothing):

    17 * * * * cd /srv/vitrine && .venv/bin/python -m indexer reindex --index vitrine-data/index --if-drifted --json >> vitrine-data/reindex-cron.log 2>&1
"""  # noqa: E501

from __future__ import annotations

import json
import signal
import sys
import traceback
from dataclasses import dataclass
from typing import Any

from indexer.common import emit, fail
from vitrine.config import DEFAULT_INDEX, EncoderSettings, arg
from vitrine.errors import ValidationFailed, VitrineError


@dataclass(kw_only=True)
class ReindexArgs(EncoderSettings):
    """Rebuild the index into a new generation beside the live one (a new model with --model, or the same
    model with a freshly trained IVF quantizer), validate it against the live one, and only then swap it
    in atomically; readers move over without downtime. Safe to kill: a re-run resumes."""

    index: str = arg(
        DEFAULT_INDEX, f"index directory (default: $VITRINE_INDEX or {DEFAULT_INDEX})", env="INDEX"
    )
    if_drifted: bool = arg(False, "run only when drift is detected (a different --model always counts)")
    retrain_ivf: bool = arg(False, "same model, fresh coarse quantizer trained on the current data")
    rollback: bool = arg(False, "make the previously published generation live again, then stop")
    keep: int = arg(3, "published generations kept on disk (at least 2; rollback can go back keep-1)")
    eval_size: int = arg(500, "captioned items in the recall check (0 = skip it)")
    recall_margin: float = arg(
        2.0, "R@10 points the new generation may lose against the live one (overall and per --slice value)"
    )
    slice: str | None = arg(
        None, "also compare R@10 per value of this metadata field; refuse when any judged slice loses more"
    )
    slice_min_items: int = arg(50, "with --slice: judge only slices with at least this many sampled items")
    commit_every: int = arg(256, "items per transaction: the most work a kill can lose")
    every: str | None = arg(None, "run as a scheduler every interval (90s, 15m, 1h, 1d) until SIGTERM")
    progress: bool = arg(False, "show a progress bar on stderr")
    json: bool = arg(False, "print the job record (as logged to DIR/reindex.jsonl) as JSON")


def cmd_reindex(a: ReindexArgs) -> int:
    from vitrine.build.reindex import rollback

    if a.rollback:
        if a.every or a.if_drifted or a.retrain_ivf:
            return fail("--rollback cannot be combined with --every, --if-drifted or --retrain-ivf")
        _print(rollback(a.index).to_dict(), a.json)
        return 0
    if a.every:
        return _schedule(a)
    try:
        _print(_job(a).to_dict(), a.json)
    except ValidationFailed as exc:
        _rejected(exc, a.json)
        return 1
    return 0


def _job(a: ReindexArgs) -> Any:
    """One reindex with a freshly loaded encoder (the index's own model may change between runs)."""
    from tqdm import tqdm

    from vitrine.build.reindex import Reindexer, ReindexSettings
    from vitrine.open_index import load_encoder, require_index

    require_index(a.index)
    kwargs = a.encoder_kwargs()
    settings = ReindexSettings(
        retrain_ivf=a.retrain_ivf,
        keep=a.keep,
        eval_size=a.eval_size,
        recall_margin=a.recall_margin,
        commit_every=a.commit_every,
        slice_field=a.slice,
        slice_min_items=a.slice_min_items,
    )
    encoder = load_encoder(a.index, a.model, **kwargs)
    bar = tqdm(unit="img", disable=not a.progress, file=sys.stderr, desc="reindexing")
    try:
        return Reindexer(
            a.index,
            encoder,
            old_encoder=lambda: load_encoder(a.index, None, **kwargs),
            settings=settings,
            progress=bar.update,
        ).run(if_drifted=a.if_drifted)
    finally:
        bar.close()


def _print(record: dict[str, Any], as_json: bool) -> None:
    emit(record, as_json, _describe)
    sys.stdout.flush()


def _describe(r: dict[str, Any]) -> str:
    if r["status"] == "skipped":
        return f"skipped: {r['reason']}"
    if r["status"] == "rolled_back":
        return f"rolled back: {r['to_generation']} is live again (was {r['from_generation']})"
    v = r["validation"] or {}
    recall = "" if v.get("recall_new") is None else f", R@10 {v['recall_old']:.2f} -> {v['recall_new']:.2f}"
    return (
        f"published {r['to_generation']} (was {r['from_generation']}) in {r['seconds']:.1f}s: "
        f"{v.get('count')} items, {v.get('new_failures')} new failures{recall}; {r['reason']}"
    )


def _rejected(exc: ValidationFailed, as_json: bool) -> None:
    if as_json:
        print(json.dumps(exc.report.to_dict(), ensure_ascii=False), flush=True)  # type: ignore[attr-defined]
    print(f"error: {exc}", file=sys.stderr, flush=True)


def _schedule(a: ReindexArgs) -> int:
    """``--every``: run now and then at a fixed rate; SIGTERM and Ctrl-C stop it cleanly (exit 0),
    even mid-job, since an interrupted job resumes at the next run."""
    from vitrine.build.reindex import run_every
    from vitrine.config import parse_duration

    try:
        interval = parse_duration(a.every or "")
    except ValueError as exc:
        return fail(str(exc))
    runs = 0

    def once() -> None:
        nonlocal runs
        runs += 1
        _print(_job(a).to_dict(), a.json)

    def failed(exc: Exception) -> None:
        if isinstance(exc, ValidationFailed):
            _rejected(exc, a.json)
        else:
            detail = str(exc) if isinstance(exc, VitrineError) else "".join(traceback.format_exception(exc))
            print(f"error: run {runs} failed: {detail.strip()}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run_every(interval, once, on_error=failed)
    except KeyboardInterrupt:
        print(f"stopped after {runs} run(s)", file=sys.stderr, flush=True)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
