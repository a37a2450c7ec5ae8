"""Evaluation: the GenEval-protocol shapes scorer, metrics, latency and reports."""
