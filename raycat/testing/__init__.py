"""Tiny real models and data built in-process, for tests and benches only (not product code)."""
