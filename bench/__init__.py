"""Benchmarks of the daemon on the real stack; see bench/README.md (run them with bench/run)."""
