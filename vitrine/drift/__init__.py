"""Drift: reference samples, the live journal, two-sample tests and the report."""
