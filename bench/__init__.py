"""Benchmarks: embedding throughput (embed.py) and search latency (search.py); results in RESULTS.md."""
