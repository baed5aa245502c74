"""Typed exceptions raised by the Vitrine core.

Library code raises these and never prints or exits; the entry points (``indexer``, ``app``,
``train_contrastive``) turn them into one-line messages and exit codes. Every error carries a message
that tells a user what to change, not just what broke.
"""

from __future__ import annotations


class VitrineError(Exception):
    """Base class: anything Vitrine raises on purpose derives from this."""


class ModelLoadError(VitrineError):
    """A checkpoint could not be loaded (unreachable hub id, missing folder, unsupported architecture)."""


class ImageDecodeError(VitrineError):
    """One image could not be decoded; ``reason`` is short and user-facing.

    Raised per item: a batch records it as a failure and goes on.
    """

    def __init__(self, reason: str, source: str = "") -> None:
        self.reason = reason
        self.source = source
        super().__init__(f"{source}: {reason}" if source else reason)


class CatalogError(VitrineError):
    """A catalog as a whole cannot be read (missing manifest, unknown column, unsupported format)."""


class StoreError(VitrineError):
    """The index directory cannot be created, opened or written."""


class IndexDamaged(StoreError):
    """An index directory is damaged; ``state`` is the :class:`vitrine.index.diagnosis.IndexState`
    (reasons and the way out), and the message is the same one line for every command that meets it."""

    def __init__(self, state: object) -> None:
        self.state = state
        super().__init__(state.message())  # type: ignore[attr-defined]


class FingerprintMismatch(StoreError):
    """An index was built with a different model or preprocessing than the encoder offered to it.

    Mixing embedding spaces gives results that look plausible and are wrong, so this is always fatal.
    """

    def __init__(self, index_fingerprint: dict, encoder_fingerprint: dict) -> None:
        self.index_fingerprint = index_fingerprint
        self.encoder_fingerprint = encoder_fingerprint
        super().__init__(
            "index was built with a different model/preprocessing: "
            f"index {_describe(index_fingerprint)} vs encoder {_describe(encoder_fingerprint)}; "
            "use the index's own model (omit --model) or build a new index (or run a reindex job)"
            + _runtime_hint(index_fingerprint, encoder_fingerprint)
        )


class ReindexError(VitrineError):
    """A reindex job or a rollback cannot run (nothing to roll back to, no catalogs recorded, bad knob)."""


class ValidationFailed(ReindexError):
    """A reindexed generation failed a check and was not published; the live generation is untouched.

    ``report`` is the job's :class:`vitrine.build.reindex.ReindexReport` (with the numbers of every check),
    so callers can print or log it; the built generation stays on disk for inspection until the next job.
    """

    def __init__(self, message: str, report: object) -> None:
        self.report = report
        super().__init__(message)


class ImportRefused(VitrineError):
    """``indexer import`` refused embeddings computed elsewhere: unreadable input, another dimension, or
    a sample re-encoded with the declared model that disagrees (``cosine`` below ``threshold``): they
    were made by another model or another preprocessing, and would look like working search."""

    def __init__(self, message: str, cosine: float | None = None, threshold: float | None = None) -> None:
        self.cosine, self.threshold = cosine, threshold
        super().__init__(message)


class QueryError(VitrineError):
    """A search request is invalid (empty text, unknown filter key, bad k).

    ``reason`` is a short stable label (``empty_query``, ``text_too_long``, ``bad_k``, ``bad_weight``…)
    that services count errors by; the message is for people.
    """

    def __init__(self, message: str, reason: str = "bad_query") -> None:
        self.reason = reason
        super().__init__(message)


def _runtime_hint(index: dict, encoder: dict) -> str:
    """int8 embeddings are their own space: say so when only the precision or runtime differs."""
    built, offered = (
        fp.get("precision", {}).get("image") if fp.get("precision") else None for fp in (index, encoder)
    )
    if built == offered or "int8" not in (built, offered):
        return ""
    return (
        f"; the index was built with {index.get('runtime')} {built}: omit --runtime/--precision to reopen "
        "it with its own"
    )


def _describe(fp: dict) -> str:
    keys = ("model", "revision", "processor_hash", "dim", "runtime", "precision", "id")
    return "{" + ", ".join(f"{k}={fp.get(k)!r}" for k in keys if k in fp) + "}"


class MissingDependency(VitrineError):
    """An optional extra is needed (e.g. Ray for ``--engine ray``); the message says what to install."""
