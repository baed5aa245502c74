"""Searching an index: encode a query, look it up, turn ids into hits."""
