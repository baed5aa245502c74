"""In-process checks of the app's non-UI parts: filter parsing, item images by key, metrics, settings."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.cli import AppArgs, server_settings
from app.metrics import Metrics
from app.requests import RequestRefused, normalise_filters
from app.service import SearchService, ServiceSettings
from app.sources import ItemImages
from tests.app.live import build_index
from vitrine.config import parse_args
from vitrine.errors import VitrineError
from vitrine.index.store import IndexStore, NewItem


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, {}),
        ("", {}),
        ({"color": "red", "size": None, "n": 3, "ok": True}, {"color": "red", "n": 3, "ok": True}),
        ('{"color": "red"}', {"color": "red"}),
        ("color=red, shop=s=1", {"color": "red", "shop": "s=1"}),
        (["color=red"], {"color": "red"}),
        (["color=red", '{"n": {"$lt": 5}}'], {"$and": [{"color": "red"}, {"n": {"$lt": 5}}]}),
    ],
)
def test_filters_accept_objects_json_and_pairs(given: object, expected: dict) -> None:
    assert normalise_filters(given) == expected


@pytest.mark.parametrize("bad", ["{oops", "color", [["a"]], "[1]", 42])
def test_bad_filters_are_refused_with_a_reason(bad: object) -> None:
    with pytest.raises(RequestRefused) as info:
        normalise_filters(bad)
    assert info.value.reason == "bad_filter"


def test_item_images_are_found_by_key_and_only_indexed_regular_files_are_read(
    photo_folder: Path, tmp_path: Path, clip_path: Path
) -> None:
    secret = tmp_path / "secret.jpg"
    inside = sorted(photo_folder.rglob("*.jpg"))
    secret.write_bytes(inside[0].read_bytes())
    (photo_folder / "red" / "link.jpg").symlink_to(secret)  # indexed: its key is the real path
    build_index(photo_folder, tmp_path / "index", clip_path)
    store = IndexStore.open(str(tmp_path / "index"))
    images = ItemImages()
    try:
        key = str(inside[1].resolve())
        thumb = images.thumbnail(store, key, size=32)
        assert thumb is not None and max(thumb.size) <= 32
        refused = [
            "/etc/passwd",
            f"{photo_folder}/../secret.jpg",
            str(photo_folder),
            "",
            "a\x00b",
            ["x"],
            None,
        ]
        for bad in refused:
            assert images.thumbnail(store, bad) is None, bad
        fifo_key = str(inside[2].resolve())
        os.unlink(fifo_key)
        os.mkfifo(fifo_key)  # swapped in after indexing: refused without opening it (no hang)
        assert images.thumbnail(store, fifo_key) is None
    finally:
        store.close()


def test_service_answers_by_key_and_refuses_loose_input(
    photo_folder: Path, tmp_path: Path, clip_path: Path
) -> None:
    build_index(photo_folder, tmp_path / "index", clip_path)
    service = SearchService(ServiceSettings(index=str(tmp_path / "index"), refresh_seconds=0))
    try:
        assert service.ready and service.health()["count"] == 12
        assert "index" not in service.health()  # the server's layout is not shown to anyone
        hit = service.search_text("a photo", k=1)["hits"][0]
        assert (
            "path" not in hit and hit["url"].startswith("/api/v1/items/%2F") and hit["url"].endswith("/image")
        )
        assert hit["file"] == str(Path(service.item(hit["key"])["path"]).relative_to(photo_folder.resolve()))
        assert service.thumbnail(hit["key"]) is not None
        assert service.item("/etc/passwd") is None and service.thumbnail("/etc/passwd") is None
        for text in (["a photo"], {"a": 1}, 3):
            with pytest.raises(RequestRefused, match="text query must be a string") as info:
                service.search_text(text, k=3)
            assert info.value.reason == "bad_text"
        with pytest.raises(RequestRefused, match="text query must be a string"):
            service.search(None, ["a photo"], weight=1, k=3)
        with pytest.raises(RequestRefused, match="k must be a number, got inf"):
            service.search_text("a photo", k=float("inf"))
        with pytest.raises(RequestRefused, match="k must be a whole number"):
            service.search_text("a photo", k=2.5)
        with pytest.raises(RequestRefused, match="weight must be between 0 and 1"):
            service.search(None, "a photo", weight=2, k=3)
        long_key = r"unknown filter field\(s\) x{20,40}\.\.\.x{20,40}; known fields: filename \(string\)"
        with pytest.raises(RequestRefused, match=long_key):  # the message does not echo 100,000 x's
            service.search_text("a photo", k=3, filters={"x" * 100_000: "1"})
        assert service.refresh() is False  # nothing changed
    finally:
        service.close()


def test_service_without_index_explains_how_to_build_one(tmp_path: Path) -> None:
    service = SearchService(ServiceSettings(index=str(tmp_path / "none"), refresh_seconds=0))
    assert not service.ready and not service.health()["ok"]
    with pytest.raises(RequestRefused, match="python -m indexer build") as info:
        service.search_text("anything")
    assert info.value.reason == "no_index"


def test_metrics_count_requests_errors_and_latency() -> None:
    metrics, other = Metrics(), Metrics()  # separate registries: no duplicate-timeseries clash
    with metrics.track("search_text"):
        pass
    with pytest.raises(RequestRefused), metrics.track("search_text"):
        raise RequestRefused("empty_query", "empty")
    metrics.set_index(10, "gen-000002", "abc")
    metrics.set_model("m", "abc")
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    assert samples[("vitrine_requests_total", (("endpoint", "search_text"), ("outcome", "ok")))] == 1
    assert samples[("vitrine_errors_total", (("endpoint", "search_text"), ("reason", "empty_query")))] == 1
    assert samples[("vitrine_request_seconds_count", (("endpoint", "search_text"),))] == 2
    assert samples[("vitrine_index_items", ())] == 10
    assert b"search_text" not in other.render()[0]


def test_cli_settings_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITRINE_PORT", "9001")
    monkeypatch.setenv("VITRINE_INDEX", "/data/idx")
    args = parse_args(AppArgs, ["--auth", "ann:pw", "--max-upload-mb", "5"])
    assert (args.port, args.index, args.max_upload_mb) == (9001, "/data/idx", 5.0)
    assert server_settings(args).auth == ("ann", "pw")
    assert parse_args(AppArgs, ["--port", "7000"]).port == 7000
    with pytest.raises(VitrineError, match="USER:PASSWORD"):
        server_settings(parse_args(AppArgs, ["--auth", "nopassword"]))


def test_uploaded_photos_create_the_index(photo_folder: Path, tmp_path: Path, clip_path: Path) -> None:
    index = tmp_path / "data" / "index"
    settings = ServiceSettings(index=str(index), model=str(clip_path), refresh_seconds=0, admin=True)
    service = SearchService(settings)
    try:
        assert not service.ready
        (tmp_path / "notes.txt").write_text("not a photo")
        uploads = [str(p) for p in sorted(photo_folder.rglob("*.jpg"))] + [str(tmp_path / "notes.txt")]
        service.uploads.attach(set(uploads), str(tmp_path))  # as if Gradio had received them
        with pytest.raises(RequestRefused, match="no image files"):
            service.build_index([str(tmp_path / "notes.txt")])
        seen: list[tuple[int, int]] = []
        report = service.build_index(uploads, lambda done, total: seen.append((done, total)))
        assert report["added"] == 12 and seen[-1] == (12, 12)
        assert service.ready and service.health()["count"] == 12
        hit = service.search_text("a photo", k=1)["hits"][0]
        assert service.item(hit["key"])["path"].startswith(str((tmp_path / "data" / "uploads").resolve()))
        assert service.thumbnail(hit["key"]) is not None
    finally:
        service.close()


def test_server_settles_its_heap_and_gradio_does_not_resummarise_per_request(tmp_path: Path) -> None:
    """Gradio's default recomputes a pandas summary of up to 10,000 past events after every event
    (12.6 ms of CPU per request once the history is full); the server asks for it every 1,000. And the
    heap loaded at start-up is frozen out of the garbage collector's full collections."""
    import gc

    from gradio.queueing import Queue

    from app.server import ServerSettings, create_app

    service = SearchService(ServiceSettings(index=str(tmp_path / "none"), refresh_seconds=0))
    gc.unfreeze()  # queues of apps built by earlier tests must be seen (frozen objects are invisible)
    before = {id(o) for o in gc.get_objects() if type(o) is Queue}
    try:
        create_app(service, ServerSettings())
        # The loaded heap is frozen (full collections stalled every request in flight under load).
        assert gc.get_freeze_count() > 10_000
        gc.unfreeze()  # frozen objects are invisible to gc.get_objects()
        queues = [o for o in gc.get_objects() if type(o) is Queue and id(o) not in before]
        assert queues and all(q.ANAYLTICS_CACHE_FREQUENCY >= 1000 for q in queues)
        assert all(q.ANALYTICS_MAX_EVENTS <= 2000 for q in queues)
    finally:
        service.close()


def test_text_batch_answers_each_query_and_isolates_bad_ones(
    photo_folder: Path, tmp_path: Path, clip_path: Path
) -> None:
    """The text batcher's work (vitrine.search.batch): one forward for the batch, grouped searches, each
    query its own answer; a bad filter is that query's error only. The async endpoint agrees with the
    synchronous one."""
    import asyncio

    from vitrine.errors import QueryError
    from vitrine.search.batch import TextSearch, search_texts
    from vitrine.search.query import Query

    build_index(photo_folder, tmp_path / "index", clip_path)
    settings = ServiceSettings(index=str(tmp_path / "index"), model=str(clip_path), refresh_seconds=0)
    service = SearchService(settings)
    try:
        s = service.searcher
        assert s is not None

        def query(text: str, k: int, filters: dict | None = None) -> TextSearch:
            return TextSearch(s, Query(text=text, k=k, filters=filters))

        items = [
            query("a photo", 3),
            "plain text",
            query("stripes", 5),
            query("a photo", 3, {"colour": "red"}),  # past the edge's check: the store refuses it
            query("dots", 3),
        ]
        out = search_texts(s.encoder, items)
        for i, (text, k) in {0: ("a photo", 3), 2: ("stripes", 5), 4: ("dots", 3)}.items():
            assert [h.key for h in out[i].page.hits] == [h.key for h in s.search_text(text, k)]
        np.testing.assert_allclose(out[1], s.encoder.encode_texts(["plain text"])[0], atol=1e-6)
        assert isinstance(out[3], QueryError) and "unknown filter field" in str(out[3])

        sync = service.search_text("stripes", 4)
        by_loop = asyncio.run(service.search_text_async("stripes", 4))
        assert [h["key"] for h in by_loop["hits"]] == [h["key"] for h in sync["hits"]]
        assert by_loop["model_version"] == sync["model_version"]
        with pytest.raises(RequestRefused, match="unknown"):
            asyncio.run(service.search_text_async("stripes", 4, {"colour": "red"}))
        with pytest.raises(RequestRefused) as empty:
            asyncio.run(service.search_text_async("  ", 4))
        assert empty.value.reason == "empty_query"
    finally:
        service.close()


def test_the_service_rehashes_its_snapshot_lazily_and_serves_a_rebuild_when_damaged(
    tmp_path: Path, clip_path: Path
) -> None:
    """Opening compares the snapshot's recorded size and mtime only; the refresh thread's
    ``verify_snapshot`` hashes it whole and swaps in a rebuild from SQLite when the bytes changed."""
    from tests.unit.test_snapshot_integrity import _garble_unsampled_vector_keeping_mtime
    from vitrine.open_index import load_encoder, open_for_build

    root = tmp_path / "index"
    store = open_for_build(root, load_encoder(root, str(clip_path), device="cpu"))  # as the indexer does
    dim = store.dim
    vecs = np.random.default_rng(4).standard_normal((300, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    try:
        store.write(
            [NewItem(f"k{i:04d}", f"/p/{i}", f"sha{i}", 1, 1, embedding=v) for i, v in enumerate(vecs)]
        )
    finally:
        store.close()
    key = _garble_unsampled_vector_keeping_mtime(root, dim)
    service = SearchService(ServiceSettings(index=str(root), refresh_seconds=0))
    try:
        store = service.live.searcher.store
        assert store.snapshot_damage == [] and store.search(vecs[4], k=1)[0][0].key != key
        service.live.verify_snapshot()
        store = service.live.searcher.store
        assert "does not match its recorded checksum" in store.snapshot_damage[0]
        assert store.search(vecs[4], k=1)[0][0].key == key
    finally:
        service.close()
