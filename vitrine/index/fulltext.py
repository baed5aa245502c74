"""The full-text index of a generation: SQLite FTS5 over captions, metadata strings and file names.

Kept in step by construction: triggers on ``items`` (insert, update, delete) rewrite an item's
``items_fts`` row inside the same transaction as the item, so every writer path (ingest, remove,
reindex's copy, a replay after ``kill -9``) updates both or neither. ``rowid`` ties the two tables.

Tokenizer (why, and the measurement: bench/RESULTS.md "Hybrid search"): ``unicode61`` with
``remove_diacritics 2`` (``café`` finds ``cafe``) splits a product code such as ``SKU-4471-B`` into
``sku 4471 b``; the user's ``SKU-4471-B`` becomes the phrase ``"sku 4471 b"``, so the exact code is
found, and a partial code (``SKU-447``) is a prefix phrase (``"sku 447"*``). FTS5 answers prefix
queries without a prefix index; one (``prefix='3'``) made the table larger without a gain that
matters next to whole-caption queries. A trigram table would also find an inner substring
(``471-B``) but is about twice the size, ranks captions slightly worse and does not fold diacritics
in this SQLite (3.40).

An index made before this module has no ``items_fts``: :func:`ensure` creates and fills it when a
writer opens the generation (a migration); readers of such an index get a clear
:class:`~vitrine.errors.QueryError` from :func:`require` (building it in memory would cost a full scan
per process and drift from the writer's later commits, while one writer open fixes it for good).
"""

from __future__ import annotations

import re
import sqlite3
import unicodedata

from vitrine.errors import QueryError

#: Bumped when the table, tokenizer or derived text changes: :func:`ensure` then rebuilds the table.
VERSION = 1
TABLE = "items_fts"
#: Named apart from the items columns, so a filter condition on items is never ambiguous in a join.
COLUMNS = ("caption_text", "metadata_text", "file_name")
#: bm25() column weights, in COLUMNS order: a caption describes the picture, metadata strings are
#: mostly labels and codes, a file name is often a camera counter.
WEIGHTS = (3.0, 2.0, 1.0)
#: Query words at least this long also match as prefixes (``dog`` finds ``dogs``, ``4471`` ``44710``).
PREFIX_MIN = 3
#: Words of a query that are used (bounds the cost of a pasted essay).
MAX_TERMS = 64
_WORD = re.compile(r"[^\W_]+")  # what unicode61 keeps as a token (it splits at '_' too)


def _derived(row: str) -> str:
    """The indexed text of an items row (``NEW``/``OLD``/``items``), in COLUMNS order, as SQL."""
    captions = f"CASE WHEN json_valid({row}.captions) THEN {row}.captions ELSE '[]' END"
    metadata = f"CASE WHEN json_valid({row}.metadata) THEN {row}.metadata ELSE '{{}}' END"
    # json_tree: strings and numbers at any depth (nested metadata too), not keys, booleans or nulls.
    return ", ".join(
        (
            f"(SELECT group_concat(value, ' ') FROM json_tree({captions}) WHERE type = 'text')",
            f"(SELECT group_concat(value, ' ') FROM json_tree({metadata}) "
            "WHERE type IN ('text', 'integer', 'real'))",
            # the part of the path after its last '/': SQLite has no basename()
            f"replace({row}.path, rtrim({row}.path, replace({row}.path, '/', '')), '')",
        )
    )


_INSERT = f"INSERT INTO {TABLE}(rowid, {', '.join(COLUMNS)}) VALUES (NEW.rowid, {_derived('NEW')});"
#: Statements one by one: executescript() would COMMIT the caller's migration transaction.
DDL = (
    f"CREATE VIRTUAL TABLE {TABLE} USING fts5({', '.join(COLUMNS)}, "
    "tokenize='unicode61 remove_diacritics 2')",
    # The DELETE before each INSERT also clears a row left by a reused rowid.
    f"CREATE TRIGGER {TABLE}_insert AFTER INSERT ON items BEGIN "
    f"DELETE FROM {TABLE} WHERE rowid = NEW.rowid; {_INSERT} END",
    f"CREATE TRIGGER {TABLE}_update AFTER UPDATE ON items BEGIN "
    f"DELETE FROM {TABLE} WHERE rowid = OLD.rowid; {_INSERT} END",
    f"CREATE TRIGGER {TABLE}_delete AFTER DELETE ON items BEGIN "
    f"DELETE FROM {TABLE} WHERE rowid = OLD.rowid; END",
)
_FILL = f"INSERT INTO {TABLE}(rowid, {', '.join(COLUMNS)}) SELECT rowid, {_derived('items')} FROM items"
_MARK = f"INSERT OR REPLACE INTO state(name, value) VALUES ('fulltext', {VERSION})"
#: Appended to a new generation's schema (:data:`vitrine.index.layout.SCHEMA`).
SCHEMA = "".join(f"{stmt};\n" for stmt in (*DDL, _MARK))


def available(conn: sqlite3.Connection) -> bool:
    """True when this generation has the full-text table at the current :data:`VERSION`."""
    row = conn.execute("SELECT value FROM state WHERE name = 'fulltext'").fetchone()
    return row is not None and row[0] == VERSION


def require(conn: sqlite3.Connection, where: str) -> None:
    if not available(conn):
        raise QueryError(
            f"index generation {where} has no full-text index (it was built before lexical search "
            "existed): open it once for writing, e.g. run `python -m indexer build` on it again, "
            "or use mode=vector",
            "lexical_unavailable",
        )


def ensure(conn: sqlite3.Connection) -> bool:
    """Create and fill the full-text table where it is missing or of another VERSION (a migration).

    Runs inside the caller's write transaction, so a crash leaves the old state; True when it built.
    """
    if available(conn):
        return False
    for name in ("insert", "update", "delete"):
        conn.execute(f"DROP TRIGGER IF EXISTS {TABLE}_{name}")
    conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    for stmt in DDL:
        conn.execute(stmt)
    conn.execute(_FILL)
    conn.execute(_MARK)
    return True


def match_expression(text: str) -> str | None:
    """An FTS5 query for ``text`` that is never a syntax error, or None when it has no words.

    Every whitespace-separated word becomes a quoted phrase (``"`` doubled), so operators
    (``AND``, ``NEAR(``, ``-``, ``*``, ``:``, parentheses) are searched as text; the tokenizer splits a
    phrase like ``SKU-4471-B`` into its parts in order. Words are ORed (BM25 ranks by how many rare
    words match); a word of :data:`PREFIX_MIN`+ characters also matches as a prefix, and the exact
    form is listed too so that it outranks a longer word sharing the prefix.
    """
    clean = "".join(" " if unicodedata.category(ch)[0] == "C" else ch for ch in text)  # NUL ends a query
    terms: list[str] = []
    for word in dict.fromkeys(clean.split()[:MAX_TERMS]):
        if not _WORD.search(word):
            continue
        phrase = '"' + word.replace('"', '""') + '"'
        terms.append(phrase)
        if len(_WORD.findall(word)[-1]) >= PREFIX_MIN:  # the prefix applies to the phrase's last word
            terms.append(phrase + "*")
    return " OR ".join(terms) or None


def search(
    conn: sqlite3.Connection, text: str, depth: int, where: str = "", args: tuple | list = ()
) -> list[tuple[int, float]]:
    """(vector id, lexical score) best first, at most ``depth`` vectors, for items matching ``where``.

    The score is ``-bm25()`` with :data:`WEIGHTS` (higher is better); items sharing a vector (identical
    content) count once, with their best score. Ties are broken by vector id, so pages are stable.
    """
    expression = match_expression(text)
    if expression is None:
        return []
    weights = ", ".join(str(w) for w in WEIGHTS)
    sql = (
        f"SELECT i.vector_id, bm25({TABLE}, {weights}) AS s FROM {TABLE} JOIN items AS i "
        f"ON i.rowid = {TABLE}.rowid WHERE {TABLE} MATCH ?{f' AND ({where})' if where else ''} "
        "ORDER BY s, i.vector_id"
    )
    best: dict[int, float] = {}
    for vector_id, score in conn.execute(sql, (expression, *args)):
        if vector_id not in best:
            best[vector_id] = -float(score)
            if len(best) >= depth:
                break
    return list(best.items())
