"""``python -m indexer import``: embeddings computed elsewhere, verified, into an index.

    python -m indexer import FOLDER --images-root DIR --index DIR [--model M] [--sample 32]
        [--min-cosine 0.95] [--commit-every 4096] [--json]

FOLDER is clip-retrieval / img2dataset output (``img_emb/img_emb_N.npy`` + ``metadata/metadata_N.parquet``)
or a folder of Vitrine embedding shards. A random sample of the images is re-encoded with the declared
model first; the import is refused (exit 1, ``error: import refused: ... median cosine C ... below the
threshold T``) when the vectors were made by another model or preprocessing. Paths outside
``--images-root`` and anything but regular files are recorded failures of their items.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from indexer.common import INDEX_HELP, emit
from vitrine.config import DEFAULT_INDEX, EncoderSettings, arg
from vitrine.errors import VitrineError
from vitrine.files import DEFAULT_MAX_FILE_BYTES


@dataclass(kw_only=True)
class ImportArgs(EncoderSettings):
    """Import embeddings computed elsewhere (clip-retrieval / img2dataset output, or Vitrine shards) into
    an index, after checking a re-encoded random sample against them with the declared --model."""

    folder: str = arg(
        help="clip-retrieval output folder (img_emb/, metadata/) or Vitrine shards", positional=True
    )
    images_root: str = arg(help="folder the metadata's image paths resolve in; nothing outside it is read")
    index: str = arg(DEFAULT_INDEX, INDEX_HELP, env="INDEX")
    sample: int = arg(32, "images re-encoded to verify the embeddings before anything is written")
    min_cosine: float = arg(0.95, "median cosine the sample must reach against the model's own encoding")
    commit_every: int = arg(4096, "items per transaction: the most work a kill can lose")
    threads: int = arg(8, "files read and hashed at once")
    image_column: str | None = arg(None, "metadata column with image paths (default: image_path, path, ...)")
    caption_column: str | None = arg(None, "metadata column with captions (default: caption, text)")
    max_file_mb: float = arg(DEFAULT_MAX_FILE_BYTES / 2**20, "larger files are recorded failures, never read")
    progress: bool = arg(True, "show a progress bar on stderr")
    json: bool = arg(False, "print the import report as JSON")


def cmd_import(a: ImportArgs) -> int:
    from tqdm import tqdm

    from vitrine.build.imports import Importer, ImportSettings
    from vitrine.drift import reference
    from vitrine.index.layout import check_index_dir
    from vitrine.open_index import load_encoder, open_for_build

    if (
        a.sample < 1
        or not 0 < a.min_cosine <= 1
        or a.commit_every < 1
        or a.threads < 1
        or not a.max_file_mb > 0
    ):
        raise VitrineError(
            "--sample, --commit-every and --threads must be at least 1, --min-cosine in (0, 1], "
            "--max-file-mb positive"
        )
    check_index_dir(Path(a.index))
    settings = ImportSettings(
        images_root=a.images_root,
        sample=a.sample,
        min_cosine=a.min_cosine,
        commit_every=a.commit_every,
        threads=a.threads,
        image_column=a.image_column,
        caption_column=a.caption_column,
        max_file_bytes=int(a.max_file_mb * 2**20),
    )
    encoder = load_encoder(a.index, a.model, **a.encoder_kwargs())
    importer = Importer(encoder, settings)
    checked = importer.check(a.folder)  # before the index is opened: a refused import creates nothing
    store = open_for_build(a.index, encoder)
    bar = tqdm(unit="item", disable=not a.progress, file=sys.stderr, desc="importing")
    importer.progress = bar.update
    try:
        report = importer.write(store, checked)
        if report.count and reference.load(store.root, store.generation) is None:
            reference.capture(store)  # the drift reference, as a first build would take it
    finally:
        bar.close()
        store.close()
    emit(
        report.to_dict(),
        a.json,
        lambda r: (
            f"imported {r['added']} added, {r['updated']} updated, {r['unchanged']} unchanged, "
            f"{r['failed']} failed, {r['conflicted']} kept by another catalog; index holds {r['count']} "
            f"items ({r['seconds']:.1f}s); verified: median cosine {r['verification']['median_cosine']} "
            f"over {r['verification']['sampled']} images (threshold {r['verification']['threshold']})"
            + "".join(f"\n  failed: {f['path']}: {f['reason']}" for f in r["failures"][:20])
        ),
    )
    return 0
