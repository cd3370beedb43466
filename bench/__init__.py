"""Benchmarks: scripts that print one JSON object as their last stdout line."""
