"""Photo searches answered in batches: concurrent photo queries share one forward and one store call per
page shape, and each gets exactly the answer it would get alone.

The library function against a real tiny model and store, then the live server over real HTTP.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from tests.app.live import LiveServer
from tests.app.test_api import metric
from vitrine.index.store import IndexStore
from vitrine.model.encoder import Encoder
from vitrine.search.batch import Found, PhotoSearch, photo_only, search_photos
from vitrine.search.searcher import Searcher


def _keys(hits: list) -> list[str]:
    return [h.key if hasattr(h, "key") else h["key"] for h in hits]


def test_a_batch_of_photo_searches_answers_each_as_alone(live_server: LiveServer) -> None:
    """Mixed page shapes (k, filters) in one batch, and a plain embedding request beside them: every
    search gets its own page, equal to the same query searched on its own."""
    encoder = Encoder.from_pretrained(str(live_server.model), device="cpu")
    store = IndexStore.open(live_server.index, expected_fingerprint=encoder.fingerprint)
    try:
        searcher = Searcher(encoder, store)
        photos = [encoder.load_image(live_server.catalog / "images" / f"p{i:03d}.jpg") for i in (1, 5, 9, 14)]
        shapes = [{"k": 3}, {"k": 5}, {"k": 3, "filters": {"color": "red"}}, {"k": 3}]
        queries = [searcher.parse(image=p, **shape) for p, shape in zip(photos, shapes, strict=True)]
        assert all(photo_only(q) for q in queries)
        items: list = [PhotoSearch(searcher, q, encoder.preprocess([q.image])) for q in queries]
        items.insert(2, encoder.preprocess([photos[0]]))  # the photo part of a combined query
        out = search_photos(encoder, items)
        assert out[2].shape == (encoder.dim,)
        answers = out[:2] + out[3:]
        for query, answer in zip(queries, answers, strict=True):
            assert isinstance(answer, Found)
            alone = searcher.run(query)
            assert _keys(answer.page.hits) == _keys(alone.hits)
            scores = [h.score for h in alone.hits]
            assert [h.score for h in answer.page.hits] == pytest.approx(scores, abs=2e-2)
        assert all(h.metadata["color"] == "red" for h in answers[2].page.hits)
        assert len(answers[1].page.hits) == 5
    finally:
        store.close()


def test_concurrent_photo_queries_get_their_sequential_answers(live_server: LiveServer, tmp_path: Path):
    """16 photo searches at once over real HTTP, one of them an undecodable upload: that one is refused
    with its reason, every other gets the hits it got alone, and their forwards were shared."""
    client = Client(live_server.url, verbose=False)
    photos = [live_server.catalog / "images" / f"p{i:03d}.jpg" for i in range(0, 24, 3)]
    alone = {p: client.predict(handle_file(str(p)), 4, {}, api_name="/search_image") for p in photos}
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    calls_before = metric(live_server, "vitrine_model_batch_size_count", modality="image")
    queries_before = metric(live_server, "vitrine_model_batch_size_sum", modality="image")
    sent = [*photos, bad, *photos[:7]]
    with ThreadPoolExecutor(len(sent)) as pool:
        jobs = [
            pool.submit(client.predict, handle_file(str(p)), 4, {}, api_name="/search_image") for p in sent
        ]
        outcomes = []
        for job in jobs:
            try:
                outcomes.append(job.result(timeout=120))
            except Exception as exc:  # gradio_client raises AppError with the server's message
                outcomes.append(exc)
    for path, outcome in zip(sent, outcomes, strict=True):
        if path == bad:
            assert isinstance(outcome, Exception) and "cannot read the uploaded image" in str(outcome)
            continue
        assert _keys(outcome["hits"]) == _keys(alone[path]["hits"])
        assert outcome["hits"][0]["key"] == str(path.resolve())
    calls = metric(live_server, "vitrine_model_batch_size_count", modality="image") - calls_before
    queries = metric(live_server, "vitrine_model_batch_size_sum", modality="image") - queries_before
    assert queries == len(sent) - 1 and calls < queries  # at least one forward served several photos
