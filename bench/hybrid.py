"""Hybrid search quality: text→image recall of vector, lexical (BM25) and hybrid (RRF) search.

Flickr8k dev (1,000 images, 5 captions each), a fine-tuned model (README "Fine-tuning"). The index must
not hold the query text, or the lexical side finds every answer by its own caption: each image is
queried with one caption (``--query-caption``) and indexed with ``N`` of its *other* captions, for each
``N`` in ``--indexed`` (0 = no captions: only file names are text). Every variant runs on the same
index, query vectors and texts in the same run, so the vector-only baseline is measured beside hybrid.
A second table compares FTS5 tokenizers on the same text (size, query time, lexical recall, and whether
a whole, a leading and an inner part of a product code are found).

    .venv/bin/python bench/hybrid.py --model artifacts/flickr-ft --write-results
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.common import loadavg, machine, table, write_section
from vitrine.config import arg, parse_args
from vitrine.index import fulltext
from vitrine.index.store import IndexStore, NewItem
from vitrine.search import hybrid

HEADING = "## Hybrid search: vector vs lexical vs RRF on Flickr8k (bench/hybrid.py)"
REPO = Path(__file__).resolve().parents[1]
KS = (1, 5, 10)
PRODUCT = "red dress with a tag SKU-4471-B"
CODE_PROBES = ("SKU-4471-B", "SKU-447", "471-B")


@dataclasses.dataclass
class Args:
    """Recall of vector, lexical and hybrid search with held-out query captions (module docstring)."""

    model: str = arg(str(REPO / "artifacts/flickr-ft"), "fine-tuned model folder")
    data: str = arg(str(REPO.parent / "shared/datasets/flickr8k/dev/captions.csv"), "captioned catalog")
    query_caption: int = arg(0, "which caption of each image (0-4) is the query, never indexed")
    indexed: list[int] = arg([0, 1, 4], "numbers of other captions indexed per image, one index each")
    rrf_k: list[int] = arg([60, 10], "RRF constants to measure (60 = the default)")
    lexical_weight: list[float] = arg([1.0, 0.5], "lexical shares to measure (1.0 = the default)")
    train_data: str = arg(
        str(REPO.parent / "shared/datasets/flickr8k/train/captions.csv"), "captions for the larger FTS table"
    )
    limit: int | None = arg(None, "use the first N images only (a quick run)")
    write_results: bool = arg(False, "replace this benchmark's section of bench/RESULTS.md")


def read_catalog(path: Path, limit: int | None) -> dict[str, list[str]]:
    """image file -> its captions, in file order."""
    captions: dict[str, list[str]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            captions.setdefault(row["image"], []).append(row["caption"])
    return dict(list(captions.items())[:limit])


def encode(a: Args, catalog: dict[str, list[str]]):
    from vitrine.model.encoder import Encoder

    encoder = Encoder.from_pretrained(a.model, device="cpu", batch_size=32)
    folder = Path(a.data).parent / "images"
    started = time.perf_counter()
    images = np.concatenate(
        [encoder.encode_images([folder / n for n in chunk]) for chunk in _chunks(list(catalog), 64)]
    )
    queries = encoder.encode_texts([c[a.query_caption] for c in catalog.values()])
    print(f"encoded {len(images)} images and queries in {time.perf_counter() - started:.0f} s", flush=True)
    return encoder, images, queries


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def other_captions(captions: list[str], a: Args, n: int) -> list[str]:
    """The first ``n`` captions of an image other than its query caption."""
    return [c for i, c in enumerate(captions) if i != a.query_caption][:n]


def build_index(root: Path, fingerprint: dict, catalog: dict, images: np.ndarray, a: Args, n: int):
    store = IndexStore.create(root, fingerprint, factory="Flat")
    folder = Path(a.data).parent / "images"
    items = []
    for (name, caps), emb in zip(catalog.items(), images, strict=True):
        items.append(NewItem(name, str(folder / name), name, 1, 1, other_captions(caps, a, n), {}, "", emb))
    store.write(items)
    return store


def keys(hits: list) -> list[str]:
    return [h.key for h in hits]


def recall(ranked: list[list[str]], truth: list[str]) -> list[float]:
    return [100 * float(np.mean([t in r[:k] for r, t in zip(ranked, truth, strict=True)])) for k in KS]


def measure(run: Callable[[int], list], count: int) -> tuple[list[list[str]], float]:
    """Rankings (keys) of every query and the median milliseconds per query."""
    ranked, times = [], []
    for i in range(count):
        started = time.perf_counter()
        ranked.append(run(i))
        times.append(1000 * (time.perf_counter() - started))
    return ranked, statistics.median(times)


def variants(store: IndexStore, queries: np.ndarray, texts: list[str], a: Args) -> dict[str, Callable]:
    out: dict[str, Callable] = {
        "vector": lambda i: keys(store.search(queries[i], k=10)[0]),
        "lexical (BM25)": lambda i: keys(hybrid.lexical(store, texts[i], k=10)),
    }
    for rrf_k in a.rrf_k:
        for w in a.lexical_weight:
            out[f"hybrid RRF k={rrf_k}, lexical x{w:g}"] = lambda i, rrf_k=rrf_k, w=w: keys(
                hybrid.search(store, queries[i], texts[i], k=10, rrf_k=rrf_k, lexical_weight=w)
            )
    return out


def recall_rows(a: Args, catalog: dict, fingerprint: dict, images, queries, tmp: Path) -> list[list]:
    texts = [c[a.query_caption] for c in catalog.values()]
    truth = list(catalog)
    rows = []
    for n in a.indexed:
        with build_index(tmp / f"index-{n}", fingerprint, catalog, images, a, n) as store:
            for name, run in variants(store, queries, texts, a).items():
                ranked, ms = measure(run, len(texts))
                rows.append([n, name, *(f"{r:.1f}" for r in recall(ranked, truth)), f"{ms:.2f}"])
                print(" | ".join(map(str, rows[-1])), flush=True)
    return rows


TOKENIZERS = {
    "unicode61 remove_diacritics 2 (chosen)": "tokenize='unicode61 remove_diacritics 2'",
    "unicode61 rd2 + prefix='3' index": "tokenize='unicode61 remove_diacritics 2', prefix='3'",
    "trigram": "tokenize='trigram'",
}


def fts_table(path: Path, options: str, docs: list[str]) -> tuple[sqlite3.Connection, float]:
    """A one-column FTS5 table of ``docs`` (rowid = position) and its size in MiB."""
    conn = sqlite3.connect(path)
    conn.execute(f"CREATE VIRTUAL TABLE t USING fts5(body, {options})")
    conn.executemany("INSERT INTO t(rowid, body) VALUES (?, ?)", enumerate(docs))
    conn.commit()
    return conn, os.path.getsize(path) / 2**20


def top_rows(conn: sqlite3.Connection, text: str, limit: int = 10) -> list[str]:
    sql = "SELECT rowid FROM t WHERE t MATCH ? ORDER BY bm25(t) LIMIT ?"
    return [str(r[0]) for r in conn.execute(sql, (fulltext.match_expression(text), limit))]


def tokenizer_rows(catalog: dict, a: Args, tmp: Path, n: int = 4) -> list[list]:
    """Each tokenizer over the same caption text (``n`` non-query captions per image + one product),
    then over the training captions x4 (a larger table) for query times: whole captions, and the first
    3 letters of a long word (a partial code, where a prefix index could help)."""
    docs = [" ".join(other_captions(caps, a, n)) for caps in catalog.values()]
    texts = [c[a.query_caption] for c in catalog.values()]
    big = [c for caps in read_catalog(Path(a.train_data), None).values() for c in caps] * 4
    stems = [w[:3] for t in texts for w in t.split() if len(w) >= 6][:300]
    rows = []
    for number, (name, options) in enumerate(TOKENIZERS.items()):
        conn, size = fts_table(tmp / f"fts-{number}.sqlite", options, [*docs, PRODUCT])
        ranked, ms = measure(lambda i, conn=conn: top_rows(conn, texts[i]), len(texts))
        probes = ["yes" if str(len(docs)) in top_rows(conn, p, 1000) else "no" for p in CODE_PROBES]
        truth = [str(i) for i in range(len(texts))]
        conn.close()
        conn, big_size = fts_table(tmp / f"fts-big-{number}.sqlite", options, big)
        _, big_ms = measure(lambda i, conn=conn: top_rows(conn, texts[i], 100), min(300, len(texts)))
        _, stem_ms = measure(lambda i, conn=conn: top_rows(conn, stems[i], 100), len(stems))
        conn.close()
        scale = [f"{big_size:.1f}", f"{big_ms:.1f}", f"{stem_ms:.2f}"]
        rows.append(
            [name, f"{size:.2f}", *(f"{r:.1f}" for r in recall(ranked, truth)), f"{ms:.2f}", *probes, *scale]
        )
        print(" | ".join(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    a = parse_args(Args, argv, prog="bench/hybrid.py")
    catalog = read_catalog(Path(a.data), a.limit)
    load_start, started = loadavg(), time.strftime("%H:%M UTC", time.gmtime())
    from vitrine.open_index import encoder_fingerprint

    encoder, images, queries = encode(a, catalog)
    with tempfile.TemporaryDirectory(prefix="vitrine-hybrid-") as tmp:
        rows = recall_rows(a, catalog, encoder_fingerprint(encoder), images, queries, Path(tmp))
        tok_rows = tokenizer_rows(catalog, a, Path(tmp))
    recall_table = table(["captions indexed", "search", "R@1", "R@5", "R@10", "ms/query (median)"], rows)
    big = f"{sum(len(c) for c in read_catalog(Path(a.train_data), None).values()) * 4} docs"
    probes = [f"finds {p!r}" for p in CODE_PROBES]
    scale = [f"MiB at {big}", "ms/caption query", "ms/3-letter prefix"]
    tok_table = table(
        ["tokenizer", "MiB", "R@1", "R@5", "R@10", "ms/query", *probes, *scale],
        tok_rows,
    )
    body = "\n\n".join(
        [
            f"`{' '.join(['.venv/bin/python bench/hybrid.py', *(sys.argv[1:] if argv is None else argv)])}`, "
            f"{started}; load average (1/5/15 min) {load_start} at start, {loadavg()} at end.",
            f"Machine: {machine()}.",
            f"Model: `{a.model}`. Catalog: {len(catalog)} images of `{a.data}`; query = caption "
            f"#{a.query_caption} of each image (never indexed); index = the image embeddings plus the first "
            "N of its *other* captions (N per row), Flat (exact) vector search, full-text index as built by "
            "the store. Recall in percent, text→image, 1 query per image.",
            recall_table,
            f'FTS5 tokenizers on the same text (N=4 captions per image, plus one row "{PRODUCT}"), '
            "queries escaped by `fulltext.match_expression`, BM25 order; then on every training caption "
            "repeated 4 times, top 100 for 300 dev captions and for 300 three-letter prefixes:",
            tok_table,
        ]
    )
    print(body)
    if a.write_results:
        write_section(HEADING, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
