"""The training side of SCTA: what `run_retrieval.py` is built from, importable by tests, benchmarks and users."""
