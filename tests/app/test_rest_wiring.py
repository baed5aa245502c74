"""Issue 13's parts wired end to end over a live server: the filter language ($in, $or, operators),
pages of filtered and sorted results, the lexical and hybrid modes, and the page's service method."""

from __future__ import annotations

import httpx
from gradio_client import Client

from tests.app.live import LiveServer


def post(server: LiveServer, body: dict) -> dict:
    answer = httpx.post(f"{server.url}/api/v1/search", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def all_pages(server: LiveServer, body: dict, k: int) -> list[dict]:
    hits, offset = [], 0
    while offset is not None:
        page = post(server, {**body, "k": k, "offset": offset})
        hits += page["hits"]
        offset = page["next_offset"]
    return hits


def test_filter_language_pages_and_sort_through_the_store(live_server: LiveServer) -> None:
    either = {"$or": [{"color": {"$in": ["red", "green"]}}, {"shop": "shop1"}]}
    body = {"text": "pattern", "filters": either}
    top = post(live_server, {**body, "k": 24})["hits"]
    expected = {h for h in range(24) if h % 3 in (0, 1) or h % 2 == 1}  # COLORS = red, green, blue
    assert len(top) == len(expected)
    assert all(h["metadata"]["color"] in ("red", "green") or h["metadata"]["shop"] == "shop1" for h in top)
    assert [h["key"] for h in all_pages(live_server, body, 5)] == [h["key"] for h in top]
    not_red = post(live_server, {"text": "pattern", "k": 24, "filters": {"color": {"$ne": "red"}}})["hits"]
    assert len(not_red) == 16 and "red" not in {h["metadata"]["color"] for h in not_red}
    by_color = all_pages(live_server, {"text": "pattern", "sort": "-color"}, 7)
    assert [h["metadata"]["color"] for h in by_color] == ["red"] * 8 + ["green"] * 8 + ["blue"] * 8
    assert all(h["vector_score"] == h["score"] and h["lexical_score"] is None for h in top)


def test_lexical_finds_an_exact_code_and_hybrid_lifts_it(live_server: LiveServer) -> None:
    """Only item 17's caption holds '17': the lexical side ranks it first; fusion adds the highest
    lexical contribution to its vector rank, so it ranks at least as high as by vector alone."""
    wanted = "images/p017.jpg"
    lexical = post(live_server, {"text": "pattern number 17", "mode": "lexical", "k": 3})
    assert lexical["mode"] == "lexical" and lexical["hits"][0]["file"] == wanted
    assert lexical["hits"][0]["lexical_score"] == lexical["hits"][0]["score"]
    vector = [h["file"] for h in post(live_server, {"text": "pattern number 17", "k": 24})["hits"]]
    hybrid = post(live_server, {"text": "pattern number 17", "mode": "hybrid", "k": 24})["hits"]
    ranks = [h["file"] for h in hybrid]
    assert ranks.index(wanted) <= vector.index(wanted)
    found = hybrid[ranks.index(wanted)]
    assert found["lexical_score"] is not None and found["vector_score"] is not None and found["score"] < 0.05
    cut = post(live_server, {"text": "pattern number 17", "mode": "lexical", "k": 24, "min_score": 1e6})
    assert cut["hits"] == [] and cut["next_offset"] is None


def test_bad_filters_sorts_and_modes_are_400_json(live_server: LiveServer) -> None:
    for body, reason, words in [
        ({"text": "x", "filters": {"price": {"$lt": 5}}}, "unknown_filter", "known fields: color (string)"),
        ({"text": "x", "filters": {"color": {"$lt": 5}}}, "bad_filter", "holds string values"),
        ({"text": "x", "filters": {"color": {"$near": "red"}}}, "bad_filter", "unknown filter operator"),
        ({"text": "x", "sort": "-price"}, "bad_sort", "known fields: color (string)"),
        ({"text": "x", "k": 10, "offset": 995}, "bad_offset", "at most 1000"),
    ]:
        answer = httpx.post(f"{live_server.url}/api/v1/search", json=body, timeout=60)
        error = answer.json()["error"]
        assert answer.status_code == 400 and error["reason"] == reason and words in error["message"], error


def test_old_filter_forms_and_the_default_gradio_client_still_work(live_server: LiveServer) -> None:
    client = Client(live_server.url, verbose=False)
    for form in ({"color": "red"}, "color=red", '{"color": "red"}', {"color": {"$in": ["red"]}}):
        result = client.predict(text="pattern", k=5, filters=form, api_name="/search_text")
        assert len(result["hits"]) == 5 and {h["metadata"]["color"] for h in result["hits"]} == {"red"}
